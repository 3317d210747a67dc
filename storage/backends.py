"""Which store a config asks for, and the worker that runs its jobs: the one place the
server learns about concrete backends."""

from __future__ import annotations

import asyncio
import functools
import shutil
from collections.abc import Mapping
from typing import Any

from bot.config import Config
from bot.errors import StorageUnavailable
from bot.ledger import Ledger, WebViewCheck
from bot.runtime import Worker
from storage.process import ProcessWorker
from storage.store import SQLiteLedger, read_counts, read_pending_waits
from storage.worker import DbWorker

MIN_FREE_BYTES = 1 << 20  # less than this under the database: "the disk is full"
PROBE_TIMEOUT = 10.0  # seconds for /healthz's write probe


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


def _probe_write(store: Any) -> None:
    """A database job: take the write lock and allocate a page, then undo it (a real
    write that leaves nothing behind). Fails while the database is locked, read-only
    or full."""
    conn = store.conn
    conn.execute("SAVEPOINT probe")
    try:
        conn.execute("CREATE TABLE flowbot_probe (x)")
    finally:
        conn.execute("ROLLBACK TO probe")
        conn.execute("RELEASE probe")


async def probe(worker: Worker, config: Config) -> None:
    """Raise `StorageUnavailable` if the storage cannot take a write now: the disk under
    the database has no room, or a write job fails (locked past its timeout, read-only,
    full, its process gone). For /healthz while storage is in trouble."""
    folder = config.storage.path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise StorageUnavailable("storage_unavailable", f"The database folder {folder} "
                                 f"cannot be read ({exc.strerror}).",
                                 reason="the database folder cannot be read") from None
    if free < MIN_FREE_BYTES:
        raise StorageUnavailable("storage_unavailable", f"The disk under {folder} has "
                                 f"{free} bytes free.", reason="the disk is full")
    try:
        await asyncio.wait_for(worker.run(_probe_write), PROBE_TIMEOUT)
    except TimeoutError:
        raise StorageUnavailable("storage_unavailable", "The database did not answer a "
                                 f"write within {PROBE_TIMEOUT:g} s.",
                                 reason="the database does not answer") from None


async def pending_waits(config: Config) -> dict[str, int]:
    """Pending waits by kind, counted once at start-up for the metrics' gauges, without
    going through the worker (a scan of the pending rows)."""
    return await asyncio.to_thread(read_pending_waits, config.storage.path)
