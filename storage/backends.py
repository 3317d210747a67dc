"""Which store a config asks for, and the worker that runs its jobs: the one place the
server learns about concrete backends. PostgreSQL's modules are imported only when a
config names it."""

from __future__ import annotations

import asyncio
import functools
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import Config
from bot.errors import StorageUnavailable
from bot.ledger import Ledger, WebViewCheck
from bot.runtime import Worker
from storage.preflight import storage_url
from storage.process import ProcessWorker
from storage.store import SQLiteLedger, SQLiteStore, read_counts, read_pending_waits
from storage.worker import DbWorker, TimerPass

if TYPE_CHECKING:
    from storage.pg_worker import PgWorker


MIN_FREE_BYTES = 1 << 20  # less than this under the database: "the disk is full"
PROBE_TIMEOUT = 10.0  # seconds for /healthz's write probe
def open_worker(config: Config, checks: Mapping[str, WebViewCheck], *,
                db_timer: bool, caller_clock: bool = False) -> Worker:
    """The worker for `config.storage` (not started: `await worker.open()`). `checks` is
    filled by the channels before that. `db_timer`: the database process fires due waits
    on its own clock (only with `worker = "process"`). `caller_clock`: PostgreSQL takes
    the time jobs are given instead of its own (tests with an injected clock)."""
    factory: Callable[[], Ledger]
    if config.storage.backend == "postgresql":
        from storage.postgres import PgLedger

        factory = functools.partial(PgLedger, storage_url(config), config, checks,
                                    caller_clock=caller_clock)
    else:
        factory = functools.partial(SQLiteLedger, config.storage.path, config, checks)
    if config.storage.worker == "thread":
        if config.storage.backend == "postgresql":
            return worker_for(factory())
        return DbWorker(SQLiteLedger(config.storage.path, config, checks),
                        lock=config.storage.path)
    # one writer per SQLite file: a second server on it refuses to start (storage/lock.py)
    return ProcessWorker(factory, timer=Ledger.timer_pass if db_timer else None,
                         lock=config.storage.path if config.storage.backend == "sqlite" else None)


def worker_for(store: Any, **kwargs: Any) -> DbWorker | PgWorker:
    """The worker that runs jobs on `store`: `DbWorker` for SQLite, `PgWorker` for
    PostgreSQL (the same interface; `kwargs`: its `answer` and `timer`)."""
    if isinstance(store, SQLiteStore):
        return DbWorker(store, **kwargs)
    from storage.pg_worker import PgWorker

    return PgWorker(store, **kwargs)


def close_worker(worker: Worker) -> None:
    """After `await worker.stop()`: release what the worker's store holds in this process."""
    store = getattr(worker, "store", None)
    if store is not None:
        store.close()


async def counts(config: Config) -> dict[str, int]:
    """Waits and outbox rows by state, and conversations, on a connection of their own:
    the scans take 0.3 s at 1M waits and would hold up every callback as a job."""
    if config.storage.backend == "postgresql":
        from storage import postgres

        return await asyncio.to_thread(postgres.read_counts, storage_url(config),
                                       config.storage.prepared_statements)
    return await asyncio.to_thread(read_counts, config.storage.path)


def _probe_write(store: Any) -> None:
    """A database job: take the write lock and allocate a page, then undo it (a real
    write that leaves nothing behind). Fails while the database is locked, read-only
    or full."""
    conn = store.conn
    conn.execute("SAVEPOINT probe")
    try:
        conn.execute("CREATE TABLE flowbot_probe (x integer)")  # valid on both backends
    finally:
        conn.execute("ROLLBACK TO probe")
        conn.execute("RELEASE probe")


async def probe(worker: Worker, config: Config) -> None:
    """Raise `StorageUnavailable` if the storage cannot take a write now: the disk under
    the database has no room, or a write job fails (locked past its timeout, read-only,
    full, its process gone). For /healthz while storage is in trouble."""
    folder: Path | None = config.storage.path.parent
    if config.storage.backend == "postgresql":  # its disk is the database server's
        folder = None
    try:
        free = shutil.disk_usage(folder).free if folder is not None else MIN_FREE_BYTES
    except OSError as exc:
        raise StorageUnavailable("storage_unavailable", f"The database folder {folder} "
                                 f"cannot be read ({exc.strerror}).",
                                 reason="the database folder cannot be read") from None
    if free < MIN_FREE_BYTES:
        raise StorageUnavailable("storage_unavailable", f"The disk under {folder} has "
                                 f"{free} bytes free.", reason="the disk is full")
    try:  # not wait_for: on Python 3.11 it swallows a cancel that meets the answer
        async with asyncio.timeout(PROBE_TIMEOUT):
            await worker.run(_probe_write)
    except TimeoutError:
        raise StorageUnavailable("storage_unavailable", "The database did not answer a "
                                 f"write within {PROBE_TIMEOUT:g} s.",
                                 reason="the database does not answer") from None


async def pending_waits(config: Config) -> dict[str, int]:
    """Pending waits by kind for the metrics' gauges, counted on each scrape of /metrics
    (never at start-up) without going through the worker (a scan of the pending rows)."""
    if config.storage.backend == "postgresql":
        from storage import postgres

        return await asyncio.to_thread(postgres.read_pending_waits, storage_url(config))
    return await asyncio.to_thread(read_pending_waits, config.storage.path)


__all__ = ["TimerPass", "close_worker", "counts", "open_worker", "pending_waits", "probe",
           "storage_url", "worker_for"]
