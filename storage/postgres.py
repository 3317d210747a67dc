"""The PostgreSQL store (the contract of bot/store.py) on psycopg 3 and psycopg_pool.

A store object is bound to one pooled connection for one transaction at a time
(`storage.pg_worker.PgWorker` gives each of its threads a copy). The connection is in
autocommit mode and the store sends BEGIN/COMMIT itself, pipelined with other statements:
BEGIN travels with the query that reads the database clock and sets the transaction's
timeouts (`SET LOCAL`, so it works behind PgBouncer in transaction mode) and with the job's
first read; in the worker, a transition's writes travel with COMMIT ("transactions" below).

Guarantees (see bot/store.py): a transition locks its conversation (`FOR UPDATE`; a new
one is created with `INSERT … ON CONFLICT DO NOTHING`) before its wait; a wait is claimed
by one conditional `UPDATE … WHERE state = 'pending'`; event ids are deduplicated with
`ON CONFLICT DO NOTHING` in the same transaction; deadlines are compared with the
database's `now()` (the transaction's start), which the ledger also hands the engine.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from bot import store as contract
from bot.config import Config
from bot.errors import StaleState, StorageUnavailable
from bot.ledger import Ledger, WebViewCheck
from bot.messages import Delivery, Message
from bot.state import Conversation, EarlyWebhook, OutboxRow, Step, Wait
from bot.store import PER_CONVERSATION, status_advances
from bot.stranded import REMOVED, Stranded
from storage import pg_schema
from storage.pg_stranded import find_stranded, find_stranded_part

log = logging.getLogger(__name__)
STATEMENT_TIMEOUT = "30s"  # a statement running longer is cancelled (its job fails)
IDLE_IN_TRANSACTION_TIMEOUT = "60s"  # a transaction left open (a stuck client) is ended
EARLY_STATUS_TTL = 86400.0  # s a status for an unknown message id is kept
# s a job waits for a pooled connection before its request answers 503 (psycopg_pool's
# default, 30 s, outlasts the caller: a browser or a webhook sender gives up first). A
# worker thread has a connection of its own, so only a database that cannot be reached
# makes one wait that long.
POOL_TIMEOUT = 5.0
# s psycopg_pool retries one lost connection (backing off 1, 2, 4… s) before it gives up
# and the next request starts afresh; its default, 5 min, backs off so far that after an
# outage the server stayed on 503 for about as long again once the database was back
RECONNECT_TIMEOUT = 5.0

_CLOCK = (  # sent with BEGIN; SET LOCAL's effect, so it works behind PgBouncer too
    "SELECT extract(epoch from now())::float8,"  # noqa: S608 - constants
    f" set_config('statement_timeout', '{STATEMENT_TIMEOUT}', true),"
    f" set_config('idle_in_transaction_session_timeout', '{IDLE_IN_TRANSACTION_TIMEOUT}', true)"
)
# The clock for a transition (see learns_xid): with the transaction's id, so that a COMMIT
# whose answer is lost with its connection can be looked up (PgStore.commit). It gives
# the transaction an id at once; a transition's first read locks its conversation, which
# assigns one anyway, so this costs nothing there. Other jobs (the outbox's reads, the web
# chat's history, polled all the time) do not ask: an id would cost each a commit record
# in the WAL (not flushed at COMMIT when nothing else was written; no difference measured
# with pgbench) and one of the 2^31 ids that anti-wraparound vacuums are paced by.
_CLOCK_XID = _CLOCK + ", pg_current_xact_id()::text"
_CONV = "id, channel, user_id, key, flow, block, wait_id, variables, version"
_WAIT = "id, kind, flow, block, deadline, blocking, request, conversation_id, state"
_WAIT_W = ", ".join(f"w.{c}" for c in _WAIT.split(", "))
_CONV_C = ", ".join(f"c.{c}" for c in _CONV.split(", "))
_WAIT_AND_CONV = (  # the wait, with its conversation locked (see PgStore.wait)
    f"SELECT {_WAIT_W}, {_CONV_C} FROM waits w "  # noqa: S608 - fixed fragments
    "JOIN conversations c ON c.id = w.conversation_id WHERE w.id = %s FOR UPDATE OF c")
# a batch's waits (PgStore.begin_batch), their conversations locked in id order (so two
# batches never wait for each other in a cycle); one another transaction holds is skipped,
# not waited for: its job runs alone after the batch
_WAITS_AND_CONVS = (
    f"SELECT {_WAIT_W}, {_CONV_C} FROM waits w "  # noqa: S608 - fixed fragments
    "JOIN conversations c ON c.id = w.conversation_id WHERE w.id = ANY(%s) "
    "ORDER BY c.id FOR UPDATE OF c SKIP LOCKED")
_DUE_AND_CONVS = (  # the timer's (see PgStore.due_waits); never waits for a lock either
    f"SELECT {_WAIT_W}, {_CONV_C} FROM waits w "  # noqa: S608 - fixed fragments
    "JOIN conversations c ON c.id = w.conversation_id WHERE w.state = 'pending' "
    "AND w.deadline <= %s ORDER BY w.deadline LIMIT %s FOR UPDATE OF c SKIP LOCKED")
_RELEASE = "RELEASE SAVEPOINT part"
_CLAIM = ("UPDATE waits SET state = %s, resolved_at = %s "
          "WHERE id = %s AND state = 'pending' AND {deadline_test}")
_SAVE = ("UPDATE conversations SET flow = %s, block = %s, wait_id = %s, variables = %s, "
         "version = version + 1, updated = %s WHERE id = %s AND version = %s")


def _guarded(update: str) -> str:
    """`update`, failing with an error (division_by_zero) when it changes no row: in a
    pipeline the error skips every statement after it, COMMIT included."""
    return f"WITH changed AS ({update} RETURNING 1) SELECT 1 / count(*) FROM changed"  # noqa: S608


_CLAIM_GUARDED = {due: _guarded(_CLAIM.format(deadline_test="deadline <= %s" if due
                                              else "deadline > %s")) for due in (False, True)}
_SAVE_GUARDED = _guarded(_SAVE)
_WAIT_COLUMNS = "id, conversation_id, kind, flow, block, deadline, blocking, request, created"
_INSERT_WAITS = f"INSERT INTO waits ({_WAIT_COLUMNS}) VALUES ({', '.join(['%s'] * 9)})"  # noqa: S608
_OUTBOX_COLUMNS = "conversation_id, channel, user_id, message, next_attempt, created"
_INSERT_OUTBOX = f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) VALUES ({', '.join(['%s'] * 6)})"  # noqa: S608


def _set_based(update: str, types: str, columns: str, where: str) -> str:
    """One guarded UPDATE for many rows: `update` (`SET …` of table `t` from source `v`)
    joined to the rows, given as one array per column (`types`, `columns`: v's), failing
    like `_guarded` unless every row (the last parameter: how many) changed one row."""
    arrays = ", ".join(f"%s::{t}[]" for t in types.split())
    return (f"WITH changed AS ({update} FROM unnest({arrays}) AS v({columns}) "  # noqa: S608
            f"WHERE {where} RETURNING 1) SELECT 1 / (count(*) = %s)::int FROM changed")


def _set_insert(table: str, columns: str, types: str) -> str:
    """One INSERT for many rows given as one array per column, inserted in their order."""
    arrays = ", ".join(f"%s::{t}[]" for t in types.split())
    return (f"INSERT INTO {table} ({columns}) SELECT {columns} FROM unnest({arrays}) "  # noqa: S608
            f"WITH ORDINALITY AS v({columns}, n) ORDER BY n")


# the set-based form of a statement a batch sends once per job (see _grouped), and for
# a guarded one the place of the row's key among its parameters (a key that comes
# twice is left to executemany, which changes that row twice, in order); None: no guard
_SET_FORMS: dict[str, tuple[str, int | None]] = {
    **{_CLAIM_GUARDED[due]: (_set_based(
        "UPDATE waits t SET state = v.outcome, resolved_at = v.at", "text float8 text float8",
        "outcome, at, id, now", "t.id = v.id AND t.state = 'pending' AND t.deadline "
        + ("<= v.now" if due else "> v.now")), 2) for due in (False, True)},
    _SAVE_GUARDED: (_set_based(
        "UPDATE conversations t SET flow = v.flow, block = v.block, wait_id = v.wait_id, "
        "variables = v.variables, version = t.version + 1, updated = v.at",
        "text text text text float8 int8 int4", "flow, block, wait_id, variables, at, id, version",
        "t.id = v.id AND t.version = v.version"), 5),
    _INSERT_WAITS: (_set_insert("waits", _WAIT_COLUMNS,
                                "text int8 text text text float8 bool text float8"), None),
    _INSERT_OUTBOX: (_set_insert("outbox", _OUTBOX_COLUMNS,
                                 "int8 text text text float8 float8"), None),
}
_WRITE = object()  # a deferred write (no reader)
_MANY = object()  # a deferred write sent with executemany


class _Mark:
    """Stands in `_deferred` for a savepoint's SAVEPOINT until it is sent."""


class NotCommitted(Exception):
    """COMMIT was lost with its connection, and the database says the transaction was rolled
    back: nothing of it is kept, so the job may run again."""


class SpeculationLost(BaseException):
    """A speculative transaction (see PgStore) found that a deferred write did not hold
    (a lost claim, a stale conversation) or failed: nothing of it is kept and the worker
    runs the job again, not speculative. A BaseException, so the ledger's handlers that
    let one failing part of a job go on with the rest do not catch it."""


_PRUNE = {  # (cutoff, limit) → rows deleted, as storage/store.py's
    "events": "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < %s LIMIT %s)",
    "delivered": "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created < %s "
                 "AND state = 'sent' AND channel != 'web' LIMIT %s)",
    "web_history": "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created < %s "
                   "AND state = 'sent' AND channel = 'web' LIMIT %s)",
    "failed": "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created < %s "
              "AND state = 'failed' LIMIT %s)",
    "ended_waits": "DELETE FROM waits WHERE id IN (SELECT id FROM waits WHERE created < %s "
                   "AND state != 'pending' LIMIT %s)",
    "early_statuses": "DELETE FROM early_statuses WHERE platform_id IN (SELECT platform_id "
                      "FROM early_statuses WHERE at < %s LIMIT %s)",
    "chat_aliases": "DELETE FROM chat_aliases WHERE (channel, old_user_id) IN (SELECT "
                    "channel, old_user_id FROM chat_aliases WHERE created < %s LIMIT %s)",
}


def _grouped(deferred: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """Deferred writes (nothing reads them) merged into one statement each, in the order
    each statement first came: a batch's (see `PgStore.begin_batch`) or a timer pass's
    sent in a few psycopg calls instead of several per job, and the hot ones (claims,
    steps, new waits, messages) run by the server as one set-based statement over arrays
    (`_SET_FORMS`), the others as executemany. Only writes of different conversations
    are reordered by this (a job's writes and a later job's of the same conversation
    are never deferred together: that job reads its conversation first, which sends
    them). What comes before the first write and after the last one (BEGIN, a read,
    COMMIT) stays there; with a read or a savepoint between writes nothing is merged."""
    at = [i for i, d in enumerate(deferred) if d[2] is _WRITE or d[2] is _MANY]
    if len(at) < 2:
        return deferred
    middle = deferred[at[0]:at[-1] + 1]
    if any(d[2] is not None for d in middle if d[2] is not _WRITE and d[2] is not _MANY):
        return deferred
    merged: dict[str, list[Any]] = {}
    for sql, params, then in middle:
        if then is None:  # RELEASE: nothing can be undone to it any more
            continue
        rows = merged.setdefault(sql, [])
        if then is _MANY:
            rows.extend(params)
        else:
            rows.append(params)
    grouped = deferred[:at[0]] + [d for d in middle if d[2] is None]
    for sql, rows in merged.items():
        form, key = _SET_FORMS.get(sql, (None, None))
        columns = [list(column) for column in zip(*rows, strict=True)]
        if form is None or len(rows) < 2 or (
                key is not None and len(set(columns[key])) < len(rows)):
            grouped.append((sql, rows, _MANY))
        else:  # the server runs one statement for all rows, not one per row
            grouped.append((form, columns if key is None else [*columns, len(rows)], _WRITE))
    return grouped + deferred[at[-1] + 1:]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text(value: str) -> str:
    """PostgreSQL text holds no NUL character; error texts from libraries may."""
    return value.replace("\x00", "\ufffd")


def connect_kwargs(prepared_statements: bool) -> dict[str, Any]:
    """psycopg connection options: autocommit (the store sends BEGIN itself) and, behind a
    PgBouncer that does not keep prepared statements, none (`prepare_threshold=None`)."""
    return {"autocommit": True, "prepare_threshold": 5 if prepared_statements else None}


class PgStore(contract.Store):
    """`url`: a libpq connection URL. `pool_size`: connections kept (one per transaction
    running at once). `caller_clock`: take the caller's `now` instead of the database's
    (tests that move time by hand; never in production)."""

    def __init__(self, url: str, *, pool_size: int = 8, prepared_statements: bool = True,
                 caller_clock: bool = False) -> None:
        kwargs = with_connect_timeout(url, connect_kwargs(prepared_statements))
        try:
            with psycopg.connect(url, **kwargs) as conn:
                pg_schema.apply(conn)
        except psycopg.OperationalError as exc:  # unreachable, refused, no such database
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise StorageUnavailable(
                "storage_unavailable", f"cannot reach PostgreSQL: {first}") from None
        self.pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs=kwargs, open=True, name="flowbot",
            timeout=POOL_TIMEOUT, reconnect_timeout=RECONNECT_TIMEOUT)
        self.pool_size = pool_size
        self._url = url
        self.caller_clock = caller_clock
        self.new_deadline = math.inf  # the earliest deadline save() wrote; the worker resets it
        self.db_time = 0.0  # the database's clock at the start of the bound transaction
        self.xid: str | None = None  # the bound transaction's id, once read (see begin())
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._locked: Conversation | None = None  # see wait()
        # wait id → its row with its conversation's (locked), or None (no such wait, or
        # its conversation is gone), read ahead for `wait` (begin, begin_batch, due_waits)
        self._read: dict[str, tuple[Any, ...] | None] = {}
        # (sql, params, what reads its cursor: None, a _Mark, _MANY); see _flush()
        self._deferred: list[tuple[str, Any, Any]] = []
        self._speculative = False  # see begin()
        self._doomed = False  # a speculative flush failed: the job runs again
        self._seen: dict[str, tuple[str, float]] = {}  # wait id → (state, deadline) read

    def for_thread(self) -> PgStore:
        """A copy sharing the pool (and, for a ledger, the engine) with a connection slot of
        its own: one per worker thread."""
        twin = copy.copy(self)
        twin._conn = None
        twin._locked = None
        twin._read = {}
        twin._deferred = []
        twin._seen = {}
        twin.new_deadline = math.inf
        return twin

    @property
    def conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The bound connection, the deferred statements (see below) sent first, so a
        caller using it directly finds the transaction as the store left it."""
        self._flush()
        return self._bound()

    def _bound(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None:
            raise RuntimeError("PgStore used outside a transaction")
        return self._conn

    def close(self) -> None:
        self.pool.close()

    # -- transactions (used by PgWorker) ----------------------------------------------
    #
    # A statement costs this process (psycopg's Python) and a postgres backend more CPU
    # than most of ours take to run, and each round trip two context switches on top, on
    # a machine whose two cores the server shares with them (bench/README.md, "SQLite vs
    # PostgreSQL"). So a transition sends few, in few round trips: statements whose
    # answer nobody reads now wait in `_deferred` and go out in one pipeline with the
    # next statement that is read, or with COMMIT: BEGIN and the clock with the job's
    # first read (for a callback, its wait: `first_wait`), and savepoints.
    #
    # `speculative` (the worker's first attempt at a job) defers the writes of a
    # transition too: the claim of a wait this transaction read as pending, the step's
    # writes, the outbox marks. They go out with COMMIT, each guarded in the database
    # (the claim and the conversation's version check fail with an error when they
    # match no row, and an error in a pipeline skips everything after it, COMMIT
    # included), so a callback is 2 round trips: BEGIN + clock + wait, then claim + step
    # + COMMIT. If anything in a pipeline that carried deferred writes fails, nothing
    # of the job is kept and it raises `SpeculationLost`; the worker runs the job again
    # not speculative (every statement sent where it is made), which answers exactly as
    # before: a lost race (the claim) or a stale conversation costs one more transaction.

    def begin(self, conn: psycopg.Connection[tuple[Any, ...]],
              first_wait: str | None = None, *, speculative: bool = False,
              xid: bool = False) -> None:
        """Bind `conn` and open a transaction on it (sent with its first statement);
        `first_wait`: the id of the wait the job reads first, sent at once with BEGIN
        and the clock (one round trip) for `wait` to find; `xid`: read the transaction's
        id with the clock (see `_CLOCK_XID` and `commit`)."""
        self._conn = conn
        self._locked = None
        self._read = {}
        self._seen = {}
        self._doomed = False
        self._speculative = speculative
        self.db_time = math.nan
        self.xid = None
        self._deferred = [("BEGIN", None, None),
                          (_CLOCK_XID if xid else _CLOCK, None, self._set_clock)]
        if first_wait is not None:
            def keep(cur: psycopg.Cursor[tuple[Any, ...]]) -> None:
                self._read[first_wait] = cur.fetchone()

            self._deferred.append((_WAIT_AND_CONV, (_text(first_wait),), keep))
            try:
                self._flush()
            except BaseException:
                self.rollback()
                raise

    def begin_batch(self, conn: psycopg.Connection[tuple[Any, ...]],
                    wait_ids: Sequence[str]) -> set[str]:
        """Open one speculative transaction for several jobs that each read a wait first
        (callbacks, http answers; see PgWorker): BEGIN, the clock and all their waits with
        their conversations locked, in one round trip. Returns the ids of the waits whose
        conversation this transaction now holds, one wait per conversation: the first in
        `wait_ids` (the jobs' order); a job of another wait (its conversation locked
        elsewhere, a later wait of the same conversation, no such wait) does not belong in
        the batch."""
        self.begin(conn, speculative=True, xid=True)  # callbacks write: see learns_xid
        cur = self._execute(_WAITS_AND_CONVS, ([_text(w) for w in wait_ids],))
        self._read_ahead(cur, wait_ids)
        return set(self._read)

    def _read_ahead(self, cur: psycopg.Cursor[tuple[Any, ...]], asked: Sequence[str]) -> None:
        """Keep rows of waits with their locked conversations for `wait` to find, for each
        conversation only the wait asked for first (`asked`: the ids in the order the jobs
        will ask for them): a job that changes a conversation would leave a second row of
        it stale (that wait is read again when asked for), and the jobs of a conversation
        must run in the order they came, whatever order the database returned its rows in."""
        rows = {row[0]: row for row in cur}
        held: set[int] = set()
        for wait_id in asked:
            row = rows.get(wait_id)
            if row is not None and row[9] not in held:  # the conversation's id
                held.add(row[9])
                self._read[wait_id] = row

    def _set_clock(self, cur: psycopg.Cursor[tuple[Any, ...]]) -> None:
        row = cur.fetchone()
        self.db_time = float(row[0]) if row else 0.0
        self.xid = row[3] if row and len(row) > 3 else None

    def broken(self) -> bool:
        """Whether the bound connection is lost (and its transaction with it)."""
        return self._conn is None or self._conn.closed or self._conn.broken

    def commit(self) -> None:
        """Send COMMIT (with the deferred writes); return once the transaction committed.

        If the connection is lost on the way, the answer to COMMIT is lost, not
        necessarily its effect. For a transaction whose id was read before (`begin`'s
        `xid`, read in an earlier round trip) the database is asked, on a connection of
        its own: committed → this returns, as if the answer had come; rolled back →
        `NotCommitted` (nothing kept; the job may run again). Otherwise (still in
        progress, the database unreachable, no id) the outcome is unknown and the
        connection's error is raised: the job must not run again."""
        try:
            if len(self._deferred) == 2 and self._deferred[0][0] == "BEGIN":
                self._deferred = []  # BEGIN and the clock, nothing else: nothing to send
            else:
                self._deferred.append(("COMMIT", None, None))
                try:
                    self._flush()
                except psycopg.Error as exc:
                    if self.xid is None or not self.broken():
                        raise
                    status = self._status_elsewhere(self.xid)
                    log.warning("connection lost at COMMIT; transaction %s: %s", self.xid,
                                status or "status unknown")
                    if status == "committed":
                        return
                    if status == "aborted":
                        raise NotCommitted(f"{type(exc).__name__}: {exc}") from exc
                    raise
        finally:
            self._conn = None
            self._deferred = []

    def _status_elsewhere(self, xid: str) -> str | None:
        """`pg_xact_status` of transaction `xid` ('committed', 'aborted', 'in progress'),
        asked on a new connection; None if that cannot be done."""
        try:
            with side_connection(self._url, autocommit=True) as conn:
                row = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
        except psycopg.Error:
            return None
        return str(row[0]) if row and row[0] is not None else None

    def rollback(self) -> None:
        conn, self._conn = self._conn, None
        self._deferred = []
        if conn is not None and not conn.closed and (
                conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE):
            conn.execute("ROLLBACK")

    def transaction_time(self, now: float) -> float:
        if self.caller_clock:
            return now
        if self.db_time != self.db_time:  # nan: the clock is still deferred
            self._flush()
        return self.db_time

    def _defer(self, sql: str, params: Any = None, *, many: bool = False) -> None:
        """A write whose answer is not read: sent now, or with the next statement if
        speculative (so only a write guarded in the database, see above)."""
        self._deferred.append((sql, params, _MANY if many else _WRITE))
        if not self._speculative:
            self._flush()

    def _execute(self, sql: str, params: Any = None) -> psycopg.Cursor[tuple[Any, ...]]:
        """`conn.execute`, the deferred statements in the same round trip."""
        got: list[psycopg.Cursor[tuple[Any, ...]]] = []
        self._deferred.append((sql, params, got.append))
        self._flush()
        return got[0]

    def _flush(self) -> None:
        """Send the deferred statements in one round trip (a pipeline if several), then
        hand each reader its cursor."""
        deferred, self._deferred = _grouped(self._deferred), []
        if not deferred:
            return
        if self._doomed:
            raise SpeculationLost("this transaction's speculation already failed")
        conn = self._bound()
        done: list[tuple[Any, psycopg.Cursor[tuple[Any, ...]]]] = []
        # the error of a guard may surface while a later statement is queued (psycopg
        # reads results when its buffer fills), so what the pipeline carries is known first
        writes = any(then is _WRITE or then is _MANY for _, _, then in deferred)
        try:
            if len(deferred) == 1 and deferred[0][2] is not _MANY:  # no pipeline needed
                sql, params, then = deferred[0]
                done.append((then, conn.execute(sql, params)))
            else:
                with conn.pipeline():
                    for sql, params, then in deferred:
                        if then is _MANY:
                            conn.cursor().executemany(sql, params)
                        else:
                            done.append((then, conn.execute(sql, params)))
        except Exception as exc:  # a failed guard; or a value psycopg could not send (a
            # lone surrogate) after it sent others: the writes are gone either way, and the
            # error may be another job's than the one whose read sent them
            if writes and self._speculative and not self.broken():
                self._doomed = True
                raise SpeculationLost(f"{type(exc).__name__}: {exc}") from exc
            raise
        for then, cur in done:
            if callable(then):
                then(cur)

    @contextmanager
    def transaction(self) -> Iterator[PgStore]:
        """One transaction outside the worker (CLI, tests, benchmarks' setup): nothing
        speculative, every statement sent where it is made."""
        with self.pool.connection() as conn:
            self.begin(conn)
            try:
                yield self
            except BaseException:
                self.rollback()
                raise
            self.commit()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a job: undo only this block if it raises. Its SAVEPOINT is sent only
        with a statement the block has to send (a read); a block that ends before that
        costs nothing, and one that raises before it just drops what it deferred."""
        mark = _Mark()
        self._deferred.append(("SAVEPOINT part", None, mark))
        try:
            yield
        except BaseException:
            at = next((i for i, d in enumerate(self._deferred) if d[2] is mark), None)
            if at is not None:  # never sent: neither was anything after it
                del self._deferred[at:]
            elif not self._doomed:
                # all made in this block since its last round trip, so dropped; but an
                # inner savepoint that was sent is released first, or ROLLBACK TO would
                # find it instead of this block's
                self._deferred = [d for d in self._deferred if d[0] == _RELEASE]
                conn = self.conn
                conn.execute("ROLLBACK TO SAVEPOINT part")
                conn.execute(_RELEASE)
            raise
        at = next((i for i, d in enumerate(self._deferred) if d[2] is mark), None)
        if at is not None:  # never sent: what it deferred joins the enclosing block
            del self._deferred[at]
        else:
            self._deferred.append((_RELEASE, None, None))

    # -- inbound events ---------------------------------------------------------------

    def record_event(self, event_id: str, now: float) -> bool:
        cur = self.conn.execute(
            "INSERT INTO events (id, at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (_text(event_id), now))
        return cur.rowcount == 1

    # -- conversations ----------------------------------------------------------------

    def conversation(self, channel: str, user_id: str, new_key: str, now: float) -> Conversation:
        select = (f"SELECT {_CONV} FROM conversations "  # noqa: S608 - fixed fragments
                  "WHERE channel = %s AND user_id = %s FOR UPDATE")
        row = self.conn.execute(select, (channel, user_id)).fetchone()
        if row is None:  # the old address of a moved chat? (looked up only when new)
            alias = self.conn.execute(
                "SELECT new_user_id FROM chat_aliases WHERE channel = %s AND old_user_id = %s",
                (channel, _text(user_id))).fetchone()
            if alias is not None:
                user_id = alias[0]
                row = self.conn.execute(select, (channel, user_id)).fetchone()
        if row is None:
            row = self.conn.execute(
                "INSERT INTO conversations (channel, user_id, key, created, updated) "  # noqa: S608
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (channel, user_id) DO NOTHING "
                f"RETURNING {_CONV}", (channel, user_id, new_key, now, now)).fetchone()
        if row is None:  # created by a transaction that committed after our SELECT
            row = self.conn.execute(select, (channel, user_id)).fetchone()
        assert row is not None
        return self._conversation(row)

    def conversation_by_id(self, conversation_id: int) -> Conversation | None:
        locked, self._locked = self._locked, None
        if locked is not None and locked.id == conversation_id:  # read (and locked) by wait()
            return locked
        row = self.conn.execute(
            f"SELECT {_CONV} FROM conversations WHERE id = %s FOR UPDATE",  # noqa: S608
            (conversation_id,)).fetchone()
        return self._conversation(row) if row else None

    def conversation_by_key(self, key: str) -> Conversation | None:
        row = self.conn.execute(
            f"SELECT {_CONV} FROM conversations WHERE key = %s FOR UPDATE",  # noqa: S608
            (_text(key),)).fetchone()
        return self._conversation(row) if row else None

    def move_conversation(self, channel: str, old_user_id: str, new_user_id: str,
                          now: float) -> bool:
        """As SQLite's; both rows are locked at once, in id order (no deadlock with
        another move). The alias is written first, in this transaction."""
        if old_user_id == new_user_id:
            return False
        self.conn.execute(
            "INSERT INTO chat_aliases (channel, old_user_id, new_user_id, created) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (channel, old_user_id) DO UPDATE SET "
            "new_user_id = excluded.new_user_id, created = excluded.created",
            (channel, _text(old_user_id), _text(new_user_id), now))
        rows = {user: (cid, variables) for cid, user, variables in self.conn.execute(
            "SELECT id, user_id, variables FROM conversations WHERE channel = %s "
            "AND user_id IN (%s, %s) ORDER BY id FOR UPDATE",
            (channel, _text(old_user_id), _text(new_user_id)))}
        if old_user_id not in rows:
            return False
        if new_user_id in rows and rows[new_user_id][0] < rows[old_user_id][0]:
            # the older one, at the new id, is the real one (see SQLite's)
            cid = rows[old_user_id][0]
            self.conn.execute("UPDATE conversations SET user_id = %s, updated = %s WHERE id = %s",
                              (f"{old_user_id}~replaced~{cid}", now, cid))
            return False
        if new_user_id in rows:
            there = rows[new_user_id][0]
            self.conn.execute("UPDATE conversations SET user_id = %s, updated = %s WHERE id = %s",
                              (f"{new_user_id}~replaced~{there}", now, there))
        cid, raw = rows[old_user_id]
        variables = json.loads(raw)
        if "user_id" in variables:
            variables["user_id"] = new_user_id
        self.conn.execute(
            "UPDATE conversations SET user_id = %s, updated = %s, version = version + 1, "
            "variables = %s WHERE id = %s", (_text(new_user_id), now, _dumps(variables), cid))
        self.conn.execute("UPDATE outbox SET user_id = %s WHERE conversation_id = %s AND "
                          "state = 'pending'", (_text(new_user_id), cid))
        return True

    @staticmethod
    def _conversation(row: tuple[Any, ...]) -> Conversation:
        cid, channel, user_id, key, flow, block, wait_id, variables, version = row
        return Conversation(id=cid, channel=channel, user_id=user_id, key=key, flow=flow,
                            block=block, wait_id=wait_id, variables=json.loads(variables),
                            version=version)

    def save(self, conv: Conversation, step: Step, now: float) -> None:
        """Persist one step: the conversation, its new and cancelled waits, its messages,
        in one round trip (a pipeline); speculative (see above), deferred to COMMIT's,
        the version check then failing in the database."""
        self._locked = None
        values = (conv.flow, conv.block, conv.wait_id, _dumps(conv.variables), now, conv.id,
                  conv.version)
        checked: list[psycopg.Cursor[tuple[Any, ...]]] = []
        add = self._deferred.append
        if self._speculative:
            add((_SAVE_GUARDED, values, _WRITE))
        else:
            add((_SAVE, values, checked.append))
        if step.cancelled_wait:
            add(("UPDATE waits SET state = 'cancelled', resolved_at = %s "
                 "WHERE id = %s AND state = 'pending'", (now, step.cancelled_wait), _WRITE))
            self._seen.pop(step.cancelled_wait, None)
        if step.waits:
            self.new_deadline = min(self.new_deadline, *(w.deadline for w in step.waits))
            add((_INSERT_WAITS,
                 [(w.id, conv.id, w.kind, w.flow, w.block, w.deadline, w.blocking,
                   _dumps(w.request) if w.request is not None else None, now)
                  for w in step.waits], _MANY))
        if step.messages:
            add((_INSERT_OUTBOX,
                 [(conv.id, conv.channel, conv.user_id, m.to_json(), now, now)
                  for m in step.messages], _MANY))
        if not self._speculative:
            self._flush()
            if checked[0].rowcount != 1:
                raise StaleState(f"conversation {conv.id} changed under us")
        conv.version += 1

    # -- waits ------------------------------------------------------------------------

    def wait(self, wait_id: str) -> Wait | None:
        """The wait, read together with its conversation, which this locks (the lock order:
        conversation first; the wait row itself is not locked here). The conversation is
        kept for the `conversation_by_id` that a transition asks next, saving it a round
        trip; `save` and a new transaction drop it."""
        if wait_id in self._read:  # read ahead (begin, begin_batch, due_waits)
            row = self._read.pop(wait_id)
        else:
            row = self._execute(_WAIT_AND_CONV, (_text(wait_id),)).fetchone()
        if row is None:  # a wait whose conversation is gone (or no such wait)
            row = self.conn.execute(
                f"SELECT {_WAIT} FROM waits WHERE id = %s", (_text(wait_id),)).fetchone()  # noqa: S608
            if row is None:
                return None
        else:
            conv = self._conversation(row[9:])
            self._locked = conv
        wid, kind, flow, block, deadline, blocking, request, cid, state = row[:9]
        self._seen[wid] = (state, deadline)
        return Wait(wid, kind, flow, block, deadline, bool(blocking),
                    json.loads(request) if request else None, cid, state)

    def claim(self, wait_id: str, outcome: str, now: float, *, due: bool) -> bool:
        """The one conditional UPDATE that decides; `now` is the database's `now()` (see
        `transaction_time`), so a node's clock decides nothing. Speculative, a claim of a
        wait this transaction read as pending, in time, is deferred to COMMIT, failing
        there (and the job running again) if the row did not change after all."""
        seen = self._seen.get(wait_id)
        if self._speculative and seen is not None and seen[0] == "pending" and (
                seen[1] <= now if due else seen[1] > now):
            self._defer(_CLAIM_GUARDED[due], (outcome, now, wait_id, now))
            self._seen[wait_id] = (outcome, seen[1])
            return True
        deadline_test = "deadline <= %s" if due else "deadline > %s"
        cur = self._execute(_CLAIM.format(deadline_test=deadline_test),
                            (outcome, now, wait_id, now))
        if cur.rowcount == 1 and seen is not None:
            self._seen[wait_id] = (outcome, seen[1])
        return cur.rowcount == 1

    def due_waits(self, now: float, limit: int) -> list[tuple[str, str]]:
        """The due waits, earliest first; in the same round trip those whose conversation
        no other transaction holds are read with it locked (`_DUE_AND_CONVS`), so that
        firing them (`wait`, `conversation_by_id`, then writes deferred to COMMIT) costs
        no round trip each: a timer pass is a few round trips, not one per wait."""
        locked: list[psycopg.Cursor[tuple[Any, ...]]] = []
        self._deferred.append((_DUE_AND_CONVS, (now, limit), locked.append))
        due = [(r[0], r[1]) for r in self._execute(
            "SELECT id, kind FROM waits WHERE state = 'pending' AND deadline <= %s "
            "ORDER BY deadline LIMIT %s", (now, limit))]
        self._read_ahead(locked[0], [wait_id for wait_id, _ in due])  # fired in this order
        return due

    def next_deadline(self) -> float | None:
        row = self._execute(  # with the pass's writes
            "SELECT least((SELECT min(deadline) FROM waits WHERE state = 'pending'), "
            "(SELECT min(expires) FROM early_webhooks))").fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def pending_http_waits(self) -> list[Wait]:
        ids = [r[0] for r in self.conn.execute(
            "SELECT id FROM waits WHERE state = 'pending' AND kind = 'http'")]
        return [w for w in map(self.wait, ids) if w is not None]

    # -- config changes (bot/stranded.py) ---------------------------------------------

    def stranded(self, live: list[tuple[str, str, str]], limit: int) -> list[Stranded]:
        return find_stranded(self.conn, live, limit)

    def stranded_part(self, live: list[tuple[str, str, str]], cursor: tuple[int, str],
                      span: int, limit: int
                      ) -> tuple[list[Stranded], tuple[int, str] | None]:
        return find_stranded_part(self.conn, live, cursor, span, limit)

    def end_removed(self, wait_id: str, now: float) -> None:
        self.conn.execute("UPDATE waits SET state = %s, resolved_at = %s "
                          "WHERE id = %s AND state = 'pending'", (REMOVED, now, wait_id))

    def setting(self, name: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE name = %s",
                                (name,)).fetchone()
        return str(row[0]) if row else None

    def set_setting(self, name: str, value: str) -> None:
        self.conn.execute("INSERT INTO settings (name, value) VALUES (%s, %s) ON CONFLICT "
                          "(name) DO UPDATE SET value = excluded.value", (name, value))

    def has_removed_webhook(self, conversation_id: int, since: float | None = None) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM waits WHERE conversation_id = %s AND state = 'removed' "
            "AND kind = 'webhook' AND (%s::float8 IS NULL OR resolved_at >= %s) LIMIT 1",
            (conversation_id, since, since)).fetchone() is not None

    # -- webhooks that came before their block (as storage/store.py's) -----------------

    def keep_early_webhook(self, conversation_id: int, payload: Any, schemes: list[str],
                           now: float, expires: float) -> None:
        self.conn.execute(
            "INSERT INTO early_webhooks (conversation_id, payload, schemes, received, expires) "
            "VALUES (%s, %s, %s, %s, %s)",
            (conversation_id, _dumps(payload), _dumps(schemes), now, expires))
        self.new_deadline = min(self.new_deadline, expires)

    def early_webhook_count(self, conversation_id: int, now: float) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM early_webhooks WHERE conversation_id = %s AND expires > %s",
            (conversation_id, now)).fetchone()
        return int(row[0]) if row else 0

    def take_early_webhook(self, conversation_id: int, scheme: str | None,
                           now: float) -> EarlyWebhook | None:
        rows = self.conn.execute(
            "SELECT id, payload, schemes, received FROM early_webhooks "
            "WHERE conversation_id = %s AND expires > %s ORDER BY id FOR UPDATE",
            (conversation_id, now)).fetchall()
        for row_id, payload, schemes, received in rows:
            if scheme is None or scheme in json.loads(schemes):
                self.conn.execute("DELETE FROM early_webhooks WHERE id = %s", (row_id,))
                return EarlyWebhook(conversation_id, json.loads(payload), received)
        return None

    def drop_expired_early_webhooks(self, now: float, limit: int) -> list[EarlyWebhook]:
        rows = self._execute(  # with BEGIN: the timer pass's first round trip
            "DELETE FROM early_webhooks WHERE id IN (SELECT id FROM early_webhooks "
            "WHERE expires <= %s ORDER BY expires LIMIT %s) RETURNING conversation_id, received",
            (now, limit)).fetchall()
        return [EarlyWebhook(cid, None, received) for cid, received in rows]

    def mark_webhook_ended(self, conversation_id: int, now: float) -> None:
        self._defer("UPDATE conversations SET webhook_ended = %s WHERE id = %s",
                    (now, conversation_id))

    def webhook_ended(self, conversation_id: int) -> float | None:
        row = self.conn.execute("SELECT webhook_ended FROM conversations WHERE id = %s",
                                (conversation_id,)).fetchone()
        return row[0] if row else None

    # -- retention (life15's pruning) -------------------------------------------------

    def prune(self, category: str, cutoff: float, limit: int, cursor: int = 0
              ) -> tuple[int, int]:
        """As SQLite's: at most `limit` finished rows older than `cutoff` per call."""
        if category == "idle_conversations":
            return self._prune_idle(cutoff, limit, cursor)
        return self.conn.execute(_PRUNE[category], (cutoff, limit)).rowcount, 0

    def _prune_idle(self, cutoff: float, limit: int, cursor: int) -> tuple[int, int]:
        window = self.conn.execute(
            "SELECT id, updated, wait_id FROM conversations WHERE id > %s ORDER BY id LIMIT %s",
            (cursor, limit * 10)).fetchall()
        if not window:
            return 0, 0
        idle = [cid for cid, updated, wait_id in window
                if updated < cutoff and wait_id is None][:limit]
        deleted = 0
        for cid in idle:  # messages still to send keep it
            deleted += self.conn.execute(
                "DELETE FROM conversations WHERE id = %s AND NOT EXISTS (SELECT 1 FROM outbox "
                "WHERE conversation_id = %s AND state = 'pending') AND NOT EXISTS (SELECT 1 "
                "FROM early_webhooks WHERE conversation_id = %s)", (cid, cid, cid)).rowcount
        if len(idle) == limit:
            return deleted, idle[-1]
        return deleted, (window[-1][0] if len(window) == limit * 10 else 0)

    # -- outbox -----------------------------------------------------------------------

    def pending_deliveries(self, now: float, limit: int, channel: str | None = None,
                           skip: Sequence[int] = (), per_conversation: int = PER_CONVERSATION
                           ) -> list[OutboxRow]:
        """Due rows in id order, at most `per_conversation` of each conversation, leaving
        out the conversations in `skip` (being delivered) and every conversation's rows
        after its first one that waits for a retry (per-conversation order is kept)."""
        by_channel = "AND o.channel = %(channel)s " if channel is not None else ""
        rows = self.conn.execute(
            "WITH held AS ("  # noqa: S608 - fixed fragments
            "  SELECT conversation_id, min(id) AS first_id FROM outbox"
            "  WHERE state = 'pending' AND next_attempt > %(now)s GROUP BY conversation_id) "
            "SELECT id, channel, conversation_id, user_id, message, attempts FROM ("
            "  SELECT o.id, o.channel, o.conversation_id, o.user_id, o.message, o.attempts,"
            "   row_number() OVER (PARTITION BY o.conversation_id ORDER BY o.id) AS n"
            "  FROM outbox o LEFT JOIN held h ON h.conversation_id = o.conversation_id"
            f"  WHERE o.state = 'pending' AND o.next_attempt <= %(now)s {by_channel}"
            "  AND o.conversation_id <> ALL(%(skip)s::bigint[])"
            "  AND (h.first_id IS NULL OR o.id < h.first_id)) due "
            "WHERE n <= %(per)s ORDER BY id LIMIT %(limit)s",
            {"now": now, "channel": channel, "skip": list(skip), "per": per_conversation,
             "limit": limit}).fetchall()
        return [OutboxRow(oid, ch, cid, user_id, Message.from_json(message), attempts)
                for oid, ch, cid, user_id, message, attempts in rows]

    def pending_by_channel(self, channels: list[str], now: float, limit: int,
                           skip: Sequence[int] = ()) -> list[OutboxRow]:
        return [row for name in channels
                for row in self.pending_deliveries(now, limit, name, skip)]

    def next_delivery_time(self, now: float) -> float | None:
        row = self.conn.execute(
            "SELECT min(next_attempt) FROM outbox WHERE state = 'pending' AND next_attempt > %s",
            (now,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def mark_sent(self, outbox_id: int, now: float, platform_id: str | None = None) -> None:
        self.conn.execute(
            "UPDATE outbox SET state = 'sent', sent_at = %s, attempts = attempts + 1, "
            "platform_id = %s WHERE id = %s", (now, platform_id, outbox_id))
        if platform_id is None:
            return
        early = self.conn.execute(
            "DELETE FROM early_statuses WHERE platform_id = %s RETURNING status, error, resend",
            (platform_id,)).fetchall()
        if early and early[0][2]:  # the file failed before we knew the id: text again
            self.resend_without_media(platform_id, early[0][0], early[0][1], now)
        elif early:
            self.set_platform_status(platform_id, early[0][0], early[0][1], now)

    def mark_all_sent(self, rows: list[tuple[int, float, str | None]]) -> None:
        if all(platform_id is None for _, _, platform_id in rows):
            self._defer(  # pipelined, with COMMIT when speculative
                "UPDATE outbox SET state = 'sent', sent_at = %s, attempts = attempts + 1 "
                "WHERE id = %s", [(now, outbox_id) for outbox_id, now, _ in rows], many=True)
            return
        for outbox_id, now, platform_id in rows:
            self.mark_sent(outbox_id, now, platform_id)

    def mark_retry(self, outbox_id: int, next_attempt: float, error: str) -> None:
        self.conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt = %s, error = %s "
            "WHERE id = %s", (next_attempt, _text(error), outbox_id))

    def mark_failed(self, outbox_id: int, error: str) -> None:
        self.conn.execute(
            "UPDATE outbox SET state = 'failed', attempts = attempts + 1, error = %s "
            "WHERE id = %s", (_text(error), outbox_id))

    def set_platform_status(self, platform_id: str, status: str, error: str | None,
                            now: float) -> bool:
        """As SQLite's: never moves a message's status backwards (`status_advances`); a
        status for an id no row has yet is kept a day for the "sent" commit."""
        platform_id, status = _text(platform_id), _text(status)
        error = _text(error) if error is not None else None
        rows = self.conn.execute(
            "SELECT id, platform_status FROM outbox WHERE platform_id = %s FOR UPDATE",
            (platform_id,)).fetchall()
        if rows:
            for outbox_id, current in rows:
                if status_advances(current, status):
                    self.conn.execute(
                        "UPDATE outbox SET platform_status = %s, error = coalesce(%s, error) "
                        "WHERE id = %s", (status, error, outbox_id))
            return True
        self.conn.execute("DELETE FROM early_statuses WHERE at < %s", (now - EARLY_STATUS_TTL,))
        kept = self.conn.execute(
            "SELECT status FROM early_statuses WHERE platform_id = %s FOR UPDATE",
            (platform_id,)).fetchone()
        if kept is None or status_advances(kept[0], status):
            self.conn.execute(
                "INSERT INTO early_statuses (platform_id, status, error, at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (platform_id) DO UPDATE "
                "SET status = excluded.status, error = excluded.error, at = excluded.at",
                (platform_id, status, error, now))
        return False

    def resend_without_media(self, platform_id: str, status: str, error: str | None,
                             now: float) -> int | None:
        """As SQLite's: the rows locked first, so a callback Twilio repeats at once waits
        for this one and then finds the row final (nothing sent twice)."""
        rows = self.conn.execute(
            "SELECT platform_status, conversation_id, message FROM outbox "
            "WHERE platform_id = %s FOR UPDATE", (_text(platform_id),)).fetchall()
        if not self.set_platform_status(platform_id, status, error, now):
            # kept as an early status: the "sent" commit resends (mark_sent)
            self.conn.execute(
                "UPDATE early_statuses SET resend = true WHERE platform_id = %s "
                "AND status = %s AND at = %s", (_text(platform_id), _text(status), now))
            return None
        added = 0
        for cid, message in contract.text_resends(rows, status):
            row = self.conn.execute(
                "INSERT INTO outbox (conversation_id, channel, user_id, message, next_attempt, "
                "created) SELECT id, channel, user_id, %s, %s, %s FROM conversations "
                "WHERE id = %s RETURNING id", (message.to_json(), now, now, cid)).fetchone()
            added = row[0] if row else added
        return added

    def web_history(self, user_id: str, after_id: int, limit: int = 200,
                    newest: bool = False) -> list[Delivery]:
        order = "DESC" if newest else "ASC"
        rows = self.conn.execute(
            "SELECT id, conversation_id, message FROM outbox WHERE channel = 'web' "  # noqa: S608
            f"AND user_id = %s AND id > %s AND state = 'sent' ORDER BY id {order} LIMIT %s",
            (_text(user_id), after_id, limit)).fetchall()
        if newest:
            rows.reverse()
        return [Delivery(oid, cid, user_id, Message.from_json(m)) for oid, cid, m in rows]

    # -- operators --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return count_rows(self.conn)


_READS_A_WAIT_FIRST = (Ledger.webview_callback, Ledger.http_answer)
_TRANSITIONS = (Ledger.inbound, Ledger.webview_callback, Ledger.webhook, Ledger.http_answer,
                Ledger.fire_due, Ledger.move_stranded)


def first_wait(fn: Any, args: Sequence[Any]) -> str | None:
    """The id of the wait a job reads first (`PgStore.begin` reads it along with BEGIN):
    a callback's and an http block's answer's; None for other jobs."""
    if fn in _READS_A_WAIT_FIRST and args and isinstance(args[0], str):
        return args[0]
    return None


def learns_xid(fn: Any) -> bool:
    """Whether a job reads its transaction's id with BEGIN (`_CLOCK_XID`), so that a COMMIT
    whose answer is lost can be looked up (`PgStore.commit`): the ledger's transitions,
    whose caller must get the committed answer, not a 503 or a 409 for its own change."""
    return fn in _TRANSITIONS


class PgLedger(Ledger, PgStore):
    """The ledger's jobs over PostgreSQL."""

    def __init__(self, url: str, config: Config,
                 checks: Mapping[str, WebViewCheck] | None = None, *,
                 caller_clock: bool = False) -> None:
        PgStore.__init__(self, url, pool_size=config.storage.pool_size,
                         prepared_statements=config.storage.prepared_statements,
                         caller_clock=caller_clock)
        Ledger.__init__(self, config, checks)


def count_rows(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, int]:
    """Waits and outbox rows by state, and conversations."""
    out: dict[str, int] = {}
    for table in ("waits", "outbox"):
        for state, n in conn.execute(
                f"SELECT state, count(*) FROM {table} GROUP BY state"):  # noqa: S608
            out[f"{table}_{state}"] = n
    row = conn.execute("SELECT count(*) FROM conversations").fetchone()
    out["conversations"] = row[0] if row else 0
    return out


# s a new connection (the pool's, or one of its own: the metrics' counts) may take to
# open when the URL says no connect_timeout: libpq's default is none (psycopg's 130 s), so
# against a server that accepts and never answers (a stuck host, PgBouncer waiting for a
# dead server) every /metrics scrape held a thread of the event loop's executor for two
# minutes, and the pool's reconnection stayed stuck as long after the host came back
SIDE_CONNECT_TIMEOUT = 5


def with_connect_timeout(url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for `psycopg.connect(url, …)`, with SIDE_CONNECT_TIMEOUT unless `url` sets
    a connect_timeout of its own."""
    if "connect_timeout" not in conninfo_to_dict(url):
        return {**kwargs, "connect_timeout": SIDE_CONNECT_TIMEOUT}
    return kwargs


def side_connection(url: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
    """`psycopg.connect(url, **kwargs)`, with SIDE_CONNECT_TIMEOUT unless `url` sets one."""
    return psycopg.connect(url, **with_connect_timeout(url, kwargs))


def read_counts(url: str, prepared_statements: bool = True) -> dict[str, int]:
    """`count_rows` on a connection of its own (run it on a thread)."""
    with side_connection(url, **connect_kwargs(prepared_statements)) as conn:
        return count_rows(conn)


def read_pending_waits(url: str) -> dict[str, int]:
    """Pending waits by kind, on a connection of its own (the metrics' gauges, per scrape)."""
    with side_connection(url, autocommit=True) as conn:
        return {kind: n for kind, n in conn.execute(
            "SELECT kind, count(*) FROM waits WHERE state = 'pending' GROUP BY kind")}
