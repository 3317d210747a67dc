"""One thread owns the SQLite connection and groups concurrent jobs into shared commits.

Each job runs in its own SAVEPOINT inside one BEGIN IMMEDIATE … COMMIT, so a job
that raises is rolled back alone, and a job's caller hears back only after the
COMMIT that made its changes durable. Under load many jobs share one commit;
idle, a job commits by itself. The event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from storage.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
_Job = tuple[Callable[[Store], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in settled:
        _settle(fut, ok, value)


class DbWorker:
    def __init__(self, store: Store, max_batch: int = 512) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.jobs = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flowbot-db", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def run(self, fn: Callable[[Store], T]) -> T:
        """Run `fn(store)` in a transaction; return once its changes are committed."""
        if self._thread is None:
            raise RuntimeError("the database worker is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, loop))
        return await fut

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Job]) -> None:
        conn = self.store.conn
        results: list[tuple[bool, Any]] = []
        try:
            self.store.begin()
            for fn, _, _ in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(self.store)
                except Exception as exc:  # the job's own failure: undo it alone
                    conn.execute("ROLLBACK TO job")
                    results.append((False, exc))
                else:
                    results.append((True, value))
                conn.execute("RELEASE job")
            self.store.commit()
            self.commits += 1
            self.jobs += len(batch)
        except Exception as exc:
            log.exception("database commit failed; %d job(s) rolled back", len(batch))
            self.store.rollback()
            results = [(False, exc)] * len(batch)
        # One wake-up per event loop for the whole batch, not one per job: each
        # call_soon_threadsafe writes to the loop's self-pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (ok, value), (_, fut, loop) in zip(results, batch, strict=True):
            by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
