"""One thread owns the SQLite connection and groups concurrent jobs into shared commits.

Each job runs in its own SAVEPOINT inside one BEGIN IMMEDIATE … COMMIT, so a job
that raises is rolled back alone, and a job's caller hears back only after the
COMMIT that made its changes durable. Under load many jobs share one commit;
idle, a job commits by itself. The event loop never waits on SQLite.

Urgent jobs (the timer's) skip the queue: they run next, even in the middle of a
batch, so an expiry is not late by the length of the queue in front of it.

COMMIT does not run SQLite's WAL checkpoints: a thread of their own does
(storage/checkpoint.py), and the worker only copies the last few frames of a WAL cycle
between two transactions, after any due expiry.

A job is `fn(store, *args)`. The same worker runs in the server's process (`run`, answers
go to asyncio futures) or inside the database process of `storage/process.py` (`submit`,
answers go back through a socket).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bot.errorlog import ErrorLog, kind
from bot.errors import StorageUnavailable
from storage.checkpoint import Checkpointer
from storage.lock import WriterLock
from storage.store import Store

log = logging.getLogger(__name__)
_errors = ErrorLog(log)  # a full disk fails every commit: one traceback a minute, counted
T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], Any]  # fn, args, where the answer goes
_Ran = tuple[_Job, bool, Any]  # the job, ok, its value or exception
_WAKE = "wake"  # queued with each urgent job, so a sleeping worker wakes up for it
TIMER = 0  # the reply of the worker's own timer passes (see DbWorker's `timer`)
TimerPass = Callable[[Any, float], tuple[Any, float | None]]  # (the store, now)
"""Fires what is due at `now` (a job); returns (its answer, when to come back or None)."""


# What SQLite says when the database, not the request, is at fault (sqlite3 error text;
# SQLITE_FULL, SQLITE_BUSY/LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN).
_UNAVAILABLE = {
    "database or disk is full": "the disk is full",
    "database is locked": "the database is locked by another program",
    "database table is locked": "the database is locked by another program",
    "attempt to write a readonly database": "the database file is read-only",
    "disk i/o error": "the disk reports an I/O error",
    "unable to open database file": "the database file cannot be opened",
}


def unavailable(exc: BaseException) -> BaseException:
    """`exc`, or a `StorageUnavailable` (503, Retry-After) when it means the database
    cannot work now (see _UNAVAILABLE) rather than that the job is wrong."""
    # SQLite may roll back the whole transaction on SQLITE_FULL, so what reaches us is the
    # "no such savepoint" of our ROLLBACK TO, with the real cause as its context
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.DatabaseError):
            text = str(seen).lower()
            for needle, reason in _UNAVAILABLE.items():
                if needle in text:
                    failed = StorageUnavailable("storage_unavailable", "The database is "
                                                f"unavailable: {reason}. Retry in a few "
                                                "seconds.", reason=reason)
                    failed.__cause__ = seen
                    return failed
        seen = seen.__cause__ or seen.__context__
    return exc


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


def _answer_futures(ran: list[_Ran]) -> None:
    """Settle each job's asyncio future: one wake-up per event loop for the whole batch,
    not one per job (each call_soon_threadsafe writes to the loop's self-pipe)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for (_, _, (fut, loop)), ok, value in ran:
        by_loop.setdefault(loop, []).append((fut, ok, value))
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, settled)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


class DbWorker:
    """`timer`: the worker keeps the deadlines itself (the database process does): it
    sleeps on its queue until the earliest one, runs `timer` as an urgent job when it is
    due (at start: the overdue ones), and answers its result with the reply TIMER (so
    its `answer` hook must know that reply, as the database process's does). New
    deadlines reach it through `Store.new_deadline`.

    `lock`: the database file whose writer lock (storage/lock.py) `start` takes and `join`
    drops; `start` raises `bot.errors.DatabaseInUse` when another process serves it."""

    def __init__(self, store: Store, max_batch: int = 512,
                 answer: Callable[[list[_Ran]], None] = _answer_futures,
                 timer: TimerPass | None = None, lock: Path | None = None) -> None:
        self.store = store
        self.lock = lock
        self._held: WriterLock | None = None
        self.max_batch = max_batch
        self._answer = answer
        self._timer = timer
        self._due = -math.inf if timer else math.inf
        self._queue: queue.SimpleQueue[_Job | str | None] = queue.SimpleQueue()
        self._urgent: deque[_Job] = deque()  # append/popleft are atomic across threads
        self._thread: threading.Thread | None = None
        self.checkpointer: Checkpointer | None = None
        self.commits = 0
        self.jobs = 0

    async def open(self) -> None:
        self.start()

    def start(self) -> None:
        if self.lock is not None:
            self._held = WriterLock.acquire(self.lock)
        self._start_checkpoints()  # before the thread: nobody else uses the store yet
        self._thread = threading.Thread(target=self._loop, name="flowbot-db", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.join)

    def join(self) -> None:
        """Run what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._held is not None:
            self._held.release()
            self._held = None

    async def run(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """Run `fn(store, *args)` in a transaction; return once its changes are committed.
        `urgent`: run it before every job already queued, and commit right after it (with
        whatever already ran in the open transaction, not waiting for the rest)."""
        if self._thread is None:
            raise RuntimeError("the database worker is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self.submit(fn, args, (fut, loop), urgent=urgent)
        return await fut

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], reply: Any, *,
               urgent: bool = False) -> None:
        """Queue a job from any thread; its answer goes to the worker's `answer` hook."""
        if urgent:
            self._urgent.append((fn, args, reply))
            self._queue.put(_WAKE)
        else:
            self._queue.put((fn, args, reply))

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            if self.checkpointer is not None:
                self.checkpointer.stop()

    def _start_checkpoints(self) -> None:
        """WAL checkpoints on a thread of their own (storage/checkpoint.py)."""
        conn = self.store.conn
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return
        conn.execute("PRAGMA wal_autocheckpoint=0")
        self.checkpointer = Checkpointer(self.store.path)
        self.checkpointer.start()

    def _before_transaction(self) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if ckpt.failed:  # back to SQLite's own checkpoints, in COMMIT
            ckpt.stop()
            self.store.conn.execute("PRAGMA wal_autocheckpoint=1000")
            self.checkpointer = None
            return
        ckpt.before_transaction(self.store.conn)

    def _serve(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._sleep())
            except queue.Empty:
                item = _WAKE  # a deadline
            if item is None:
                return
            batch: list[_Job] = [] if isinstance(item, str) else [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                if not isinstance(more, str):
                    batch.append(more)
            self._check_due()
            if batch or self._urgent:
                self._run_batch(batch)
            if stop:
                return

    # -- the worker's own timer -----------------------------------------------------------

    def _sleep(self) -> float | None:
        return None if self._due == math.inf else max(0.0, self._due - time.time())

    def _check_due(self) -> None:
        if self._timer is not None and time.time() >= self._due:
            self._due = math.inf  # the pass sets the next one
            self._urgent.append((self._fire, (), TIMER))

    def _fire(self, store: Store) -> Any:
        assert self._timer is not None
        now = time.time()
        self._due = now + 1.0  # if the pass fails: again in a second
        value, nxt = self._timer(store, now)
        self._due = math.inf if nxt is None else nxt
        return value

    def _note_deadlines(self) -> None:
        """A job wrote waits: wake up for the earliest if it is sooner than planned (a job
        rolled back later only costs an early wake-up that finds nothing due)."""
        if self.store.new_deadline < self._due:
            self._due = self.store.new_deadline
        self.store.new_deadline = math.inf

    def _run_batch(self, batch: list[_Job]) -> None:
        i = 0
        while True:
            i, ran = self._run_segment(batch, i)
            self._answer(ran)
            if i >= len(batch) and not self._urgent:
                return

    def _run_segment(self, batch: list[_Job], i: int) -> tuple[int, list[_Ran]]:
        """Run jobs from batch[i:] in one transaction; an urgent job, which runs as soon as
        it arrives, ends the transaction early so its own commit is not delayed either."""
        conn = self.store.conn
        ran: list[_Ran] = []
        self._check_due()
        if not self._urgent:  # an expiry does not wait for the WAL's catch-up either
            self._before_transaction()
        try:
            self.store.begin()
            while True:
                self._check_due()
                urgent = bool(self._urgent)
                if urgent:
                    job = self._urgent.popleft()
                elif i < len(batch):
                    job, i = batch[i], i + 1
                else:
                    break
                ran.append((job, False, None))
                conn.execute("SAVEPOINT job")
                try:
                    value = job[0](self.store, *job[1])
                except Exception as exc:  # the job's own failure: undo it alone
                    conn.execute("ROLLBACK TO job")
                    ran[-1] = (job, False, unavailable(exc))
                else:
                    ran[-1] = (job, True, value)
                conn.execute("RELEASE job")
                if self._timer is not None:
                    self._note_deadlines()
                if urgent and not self._urgent:
                    break
            self.store.commit()
            if self.checkpointer is not None:
                self.checkpointer.committed()
            self.commits += 1
            self.jobs += len(ran)
        except Exception as exc:
            if not ran:  # the transaction did not even start: fail the rest, do not spin
                while self._urgent:
                    ran.append((self._urgent.popleft(), False, None))
                ran += [(job, False, None) for job in batch[i:]]
                i = len(batch)
            _errors.error(kind(exc), f"database commit failed; {len(ran)} job(s) rolled "
                          "back", exc)
            self.store.rollback()
            if self._timer is not None:  # a rolled-back pass's waits are due again
                self._due = min(self._due, time.time() + 1.0)
            failed = unavailable(exc)
            ran = [(job, False, failed) for job, _, _ in ran]
        return i, ran
