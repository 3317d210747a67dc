"""Runs jobs against PostgreSQL: a few threads, each taking a pooled connection for one job
at a time, one transaction per job (so a transition's lock order is the whole
transaction's, and no two transactions can deadlock on our rows).

Same interface as storage.worker.DbWorker (`run`, `submit`, `start`, `join`, the `answer`
hook and the optional `timer`), so storage/process.py runs either in the database process.
Urgent jobs (the timer's) are taken before queued ones by the next free thread.

A job runs speculative first (storage/postgres.py: its writes deferred to COMMIT, guarded
in the database, so a callback is two round trips); one whose speculation did not hold (a
lost claim, a stale conversation, any failing write) runs again at once, not speculative.
A job failing on a deadlock or serialization error is retried (it was rolled back whole);
one failing because the database is unreachable or slow answers `StorageUnavailable` (503).
A connection lost at COMMIT is looked up (`PgStore.commit`): a transition that committed
answers as committed, one rolled back runs again, one whose outcome is unknown answers
503 and never runs again.

Callbacks (and http blocks' answers) queued together run as one batch, one transaction
(`_run_batch`): a thread that takes one takes those queued behind it, up to BATCH; a job
of another kind it meets on the way runs next, in this thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from bot.errors import StorageUnavailable
from storage.postgres import NotCommitted, PgStore, SpeculationLost, first_wait, learns_xid
from storage.worker import TIMER, TimerPass, _answer_futures

log = logging.getLogger(__name__)
T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], Any]
_WAKE = "wake"
RETRIES = 3  # attempts of a job that lost a deadlock or serialization race
ANSWER_GROUP = 8  # answers sent together at most while jobs are queued (see _answered)
ANSWER_WAIT = 0.005  # s an answer waits at most for others to go with it
BATCH = 32  # jobs at most in one transaction (see _run_batch)
MIN_SLEEP = 0.005  # s between timer passes at least, so a pass that leaves work never spins


class PgWorker:
    """`store`: a `PgStore` (a `PgLedger` for the server); each thread works on a copy of it
    (`PgStore.for_thread`). `threads` defaults to the store's pool size, less one for the
    timer's own connection when there is a `timer`."""

    def __init__(self, store: PgStore, max_batch: int = 512,
                 answer: Callable[[list[Any]], None] = _answer_futures,
                 timer: TimerPass | None = None, threads: int | None = None, *,
                 wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """`wall`: this node's clock, only for a store with `caller_clock` (tests);
        `monotonic`: what the timer sleeps by (both injectable for tests)."""
        self.store = store
        self._wall = wall
        self._monotonic = monotonic
        self._answer = answer
        self._timer = timer
        # the pool's connections: one for each thread, and the timer's own
        self._threads_n = threads or max(1, store.pool_size - (timer is not None))
        self._queue: queue.SimpleQueue[_Job | str | None] = queue.SimpleQueue()
        self._urgent: deque[_Job] = deque()
        self._threads: list[threading.Thread] = []
        self._due = -math.inf if timer else math.inf  # on `monotonic`'s clock
        self.passes = 0  # timer passes run (tests: no busy loop)
        self._offset = time.time() - monotonic()  # the database's clock minus `monotonic`'s,
        # till the first pass (at start) measures it
        self._timer_wake = threading.Condition()
        self._stopping = False
        self._count_lock = threading.Lock()
        self._done: list[tuple[_Job, bool, Any]] = []  # answers not sent yet
        self._done_since = 0.0  # monotonic time the oldest of them was made
        self.commits = 0
        self.jobs = 0

    async def open(self) -> None:
        self.start()

    def start(self) -> None:
        for i in range(self._threads_n):
            t = threading.Thread(target=self._loop, args=(self.store.for_thread(),),
                                 name=f"flowbot-pg-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self._timer is not None:
            t = threading.Thread(target=self._timer_loop, name="flowbot-pg-timer", daemon=True)
            t.start()
            self._threads.append(t)

    async def stop(self) -> None:
        await asyncio.to_thread(self.join)

    def join(self) -> None:
        """Run what is queued, then end the threads."""
        if not self._threads:
            return
        with self._timer_wake:
            self._stopping = True
            self._timer_wake.notify_all()
        for _ in range(self._threads_n):
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    async def run(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """Run `fn(store, *args)` in a transaction; return once it is committed."""
        if not self._threads:
            raise RuntimeError("the database worker is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self.submit(fn, args, (fut, loop), urgent=urgent)
        return await fut

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], reply: Any, *,
               urgent: bool = False) -> None:
        if urgent:
            self._urgent.append((fn, args, reply))
            self._queue.put(_WAKE)
        else:
            self._queue.put((fn, args, reply))

    # -- the threads ----------------------------------------------------------------------

    def _loop(self, store: PgStore) -> None:
        later: deque[_Job | str | None] = deque()  # taken from the queue by a batch
        while True:
            item = later.popleft() if later else self._queue.get()
            if item is None:
                with self._count_lock:
                    done, self._done = self._done, []
                if done:
                    self._answer(done)
                return
            while self._urgent:
                try:
                    job = self._urgent.popleft()
                except IndexError:
                    break
                self._answer([self._run(store, job)])  # urgent: not held back
            if isinstance(item, str):
                continue
            if first_wait(item[0], item[1]) is None:
                self._answered(self._run(store, item))
                continue
            batch = [item]
            while len(batch) < BATCH and not later:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or isinstance(nxt, str) or first_wait(nxt[0], nxt[1]) is None:
                    later.append(nxt)
                else:
                    batch.append(nxt)
            done, alone = self._run_batch(store, batch)
            for ran in done:  # answered before the jobs left over run
                self._answered(ran)
            for job in alone:
                self._answered(self._run(store, job))

    def _answered(self, ran: tuple[_Job, bool, Any]) -> None:
        """Send a job's answer, together with others while more jobs are queued: in the
        database process each send is a frame to the server and a wake-up of its event
        loop, which under load cost more than the few ms an answer waits here for the
        next jobs to finish (at most ANSWER_GROUP answers, ANSWER_WAIT seconds). The
        thread that finds the queue empty sends what is there."""
        now = time.monotonic()
        with self._count_lock:
            if not self._done:
                self._done_since = now
            self._done.append(ran)
            if (len(self._done) < ANSWER_GROUP and not self._queue.empty()
                    and now - self._done_since < ANSWER_WAIT):
                return
            done, self._done = self._done, []
        self._answer(done)

    def _run_batch(self, store: PgStore, jobs: list[_Job]
                   ) -> tuple[list[tuple[_Job, bool, Any]], list[_Job]]:
        """Jobs that each read a wait first (callbacks, http answers), in one transaction:
        their waits and conversations read and locked in one round trip
        (`PgStore.begin_batch`), each job in a savepoint of its own (one raising is undone
        alone, as alone it would be), all their writes sent with COMMIT. A batch costs
        two round trips and one WAL flush whatever its size, where each statement and
        each commit cost both processes CPU (bench/README.md, "SQLite vs PostgreSQL").
        Returns the jobs that ran and their answers, and the jobs to run alone after it
        (`_run`): those whose conversation the batch could not take, or all of a batch
        whose speculation did not hold."""
        if len(jobs) == 1:
            return [], jobs
        ids = [str(first_wait(fn, args)) for fn, args, _ in jobs]

        def body(conn: psycopg.Connection[tuple[Any, ...]]
                 ) -> tuple[list[tuple[_Job, bool, Any]], list[_Job]]:
            held = store.begin_batch(conn, ids)
            done: list[tuple[_Job, bool, Any]] = []
            alone: list[_Job] = []
            for job, wait_id in zip(jobs, ids, strict=True):
                if wait_id not in held:
                    alone.append(job)
                    continue
                held.discard(wait_id)
                fn, args, _ = job
                try:
                    with store.savepoint():
                        done.append((job, True, fn(store, *args)))
                except psycopg.Error:
                    raise
                except Exception as exc:  # the job's own failure (an ApiError, a bug)
                    done.append((job, False, exc))
            return done, alone

        try:
            done, alone = self._transaction(store, body, f"batch of {len(jobs)}")
        except SpeculationLost:
            return [], jobs
        except StorageUnavailable as exc:
            return [(job, False, exc) for job in jobs], []
        except Exception:  # a bug outside the jobs: each runs alone and hears its own error,
            # rather than the thread ending with none of them answered
            log.exception("a batch of %d jobs failed; running them one by one", len(jobs))
            return [], jobs
        self._committed(store, len(done))
        return done, alone

    def _run(self, store: PgStore, job: _Job) -> tuple[_Job, bool, Any]:
        """The job in a transaction of its own: speculative first (see storage/postgres.py:
        a callback in 2 round trips), again not speculative if that did not hold."""
        fn, args, _ = job
        xid = learns_xid(fn) or fn == self._fire  # this timer's pass is a transition too
        what = getattr(fn, "__qualname__", str(fn))
        speculative = True

        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> Any:
            store.begin(conn, first_wait(fn, args), speculative=speculative, xid=xid)
            return fn(store, *args)

        try:
            try:
                value = self._transaction(store, body, what)
            except SpeculationLost:
                speculative = False
                value = self._transaction(store, body, what)
        except Exception as exc:  # StorageUnavailable; the job's own failure (an ApiError)
            return job, False, exc
        self._committed(store, 1)
        return job, True, value

    def _transaction(self, store: PgStore,
                     body: Callable[[psycopg.Connection[tuple[Any, ...]]], T], what: str) -> T:
        """`body(conn)` (it begins the store's transaction on a pooled connection and runs
        the job or jobs), then COMMIT. Run again after a deadlock or serialization error
        (it was rolled back whole), and after a pooled connection turned out dead before
        COMMIT was sent or was lost at a COMMIT the database says it rolled back. Raises
        SpeculationLost (nothing kept), StorageUnavailable (the database unreachable,
        slow or failing: 503) or the body's own exception (rolled back)."""
        attempt = 0
        reconnects = 0
        while True:
            conn = None
            committing = False
            try:
                with store.pool.connection() as conn:
                    try:
                        value = body(conn)
                    except BaseException:
                        store.rollback()
                        raise
                    committing = True
                    store.commit()
                    return value
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                attempt += 1
                if attempt < RETRIES:
                    continue
                raise _unavailable(exc) from None
            except (psycopg.Error, NotCommitted) as exc:
                never_sent = not committing and conn is not None and conn.broken
                if (never_sent or isinstance(exc, NotCommitted)) and (
                        reconnects < store.pool_size):
                    # a pooled connection had died (the server restarted, the session was
                    # ended) and the pool may hold more: COMMIT was never sent, or the
                    # database says it rolled back, so nothing of the job is kept. Again
                    # on the next one (each dead one is dropped; a new one that cannot
                    # connect ends it) rather than a 503 per dead connection. A COMMIT
                    # whose outcome is unknown raises a psycopg.Error: a 503, not again.
                    reconnects += 1
                    continue
                log.error("database job %s failed: %s: %s", what,
                          type(exc).__name__, str(exc).strip()[:300])
                raise _unavailable(exc) from None

    def _committed(self, store: PgStore, jobs: int) -> None:
        with self._count_lock:
            self.commits += 1
            self.jobs += jobs
        self._note_deadlines(store)

    # -- the worker's own timer -----------------------------------------------------------

    def _note_deadlines(self, store: PgStore) -> None:
        if store.new_deadline == math.inf:
            return
        deadline, store.new_deadline = store.new_deadline, math.inf
        self._set_due(self._due_at(deadline))

    def _due_at(self, deadline: float) -> float:
        """When to run the pass for `deadline` (the database's clock), on the monotonic
        clock, through the offset between the two measured at the last pass. Never on
        this node's wall clock, which may differ from the database's or jump (NTP), and
        never less than MIN_SLEEP from now (a deadline that is due but still pending is
        retried, not spun on)."""
        return max(self._monotonic() + MIN_SLEEP, deadline - self._offset)

    def _measure_offset(self, store: PgStore, now: float) -> None:
        """The ledger's clock minus the monotonic clock: the database's `clock_timestamp()`
        against the middle of the round trip that read it (or this node's wall clock, for
        a store with `caller_clock`)."""
        if store.caller_clock:
            self._offset = now - self._monotonic()
            return
        conn = store.conn  # sends BEGIN first (deferred): this round trip alone is timed
        before = self._monotonic()
        row = conn.execute("SELECT extract(epoch from clock_timestamp())::float8").fetchone()
        after = self._monotonic()
        if row is not None:
            self._offset = float(row[0]) - (before + after) / 2

    def _timer_loop(self) -> None:
        """Sleeps until the earliest deadline, then runs the pass itself, on a connection of
        its own, and answers with the reply TIMER: queued as an urgent job it waited for a
        worker thread to finish its batch, under load one more wait at every pass
        (bench/README.md, timers on PostgreSQL)."""
        store = self.store.for_thread()
        while True:
            with self._timer_wake:
                while not self._stopping:
                    delay = self._due - self._monotonic()
                    if delay <= 0:
                        break
                    self._timer_wake.wait(None if self._due == math.inf else delay)
                if self._stopping:
                    return
                self._due = math.inf  # the pass sets the next one
            self._answer([self._run(store, (self._fire, (), TIMER))])

    def _fire(self, store: PgStore) -> Any:
        assert self._timer is not None
        self.passes += 1
        now = self._wall()  # used only by a store with `caller_clock`
        try:
            self._measure_offset(store, now)
            value, nxt = self._timer(store, now)
        except BaseException:
            self._set_due(self._monotonic() + 1.0)  # again in a second
            raise
        if nxt is not None:
            self._set_due(self._due_at(nxt))
        return value

    def _set_due(self, due: float) -> None:
        with self._timer_wake:
            if due < self._due:
                self._due = due
                self._timer_wake.notify()


def _unavailable(exc: Exception) -> StorageUnavailable:
    """A database error the caller can act on (and that pickles: psycopg's may not)."""
    return StorageUnavailable(
        "storage_unavailable",
        f"The database could not run this request ({type(exc).__name__}); try again shortly.")
