"""Which store a config asks for, and the worker that runs its jobs: the one place the
server learns about concrete backends."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping

from bot.config import Config
from bot.ledger import Ledger, WebViewCheck
from bot.runtime import Worker
from storage.process import ProcessWorker
from storage.store import SQLiteLedger, read_counts
from storage.worker import DbWorker


def open_worker(config: Config, checks: Mapping[str, WebViewCheck], *,
                db_timer: bool) -> Worker:
    """The worker for `config.storage` (not started: `await worker.open()`). `checks` is
    filled by the channels before that. `db_timer`: the database process fires due waits
    on its own clock (only with `worker = "process"`)."""
    if config.storage.worker == "thread":
        return DbWorker(SQLiteLedger(config.storage.path, config, checks),
                        lock=config.storage.path)
    # one writer per file: a second server on this database refuses to start (storage/lock.py)
    return ProcessWorker(functools.partial(SQLiteLedger, config.storage.path, config, checks),
                         timer=Ledger.timer_pass if db_timer else None,
                         lock=config.storage.path)


def close_worker(worker: Worker) -> None:
    """After `await worker.stop()`: release what the worker's store holds in this process."""
    if isinstance(worker, DbWorker):
        worker.store.close()


async def counts(config: Config) -> dict[str, int]:
    """Waits and outbox rows by state, and conversations, without going through the
    worker: the scans take 0.3 s at 1M waits and would hold up every callback."""
    return await asyncio.to_thread(read_counts, config.storage.path)
