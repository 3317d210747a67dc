"""`flowbot migrate-storage`: copy a stopped SQLite database into an empty PostgreSQL one.

What moves: every conversation (with its variables, key and place), every wait (pending
ones with their deadlines; resolved ones too, so a late callback still gets its 409/410
rather than a 404), the outbox rows not yet delivered, the web chat's delivered rows (a
reconnecting page asks for them by id), early delivery statuses, webhook calls kept for
their block, the old addresses of moved chats, and the inbound event ids of the
`EVENT_WINDOW` seconds before the newest one (a platform that redelivers an event after
the move is still recognised). Ids are kept, and PostgreSQL's sequences continue after
them. All of it in one PostgreSQL transaction, then the counts are compared table by table.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bot.errors import DatabaseInUse, FlowbotError
from storage.lock import WriterLock
from storage.pg_lock import ServerLock
from storage.postgres import PgStore, _text
from storage.store import SQLiteStore

EVENT_WINDOW = 7 * 86400.0  # s of inbound event ids copied (platforms redeliver for ~1 day)

_CONVERSATIONS = ("id", "channel", "user_id", "key", "flow", "block", "wait_id", "variables",
                  "version", "created", "updated", "webhook_ended")
_WAITS = ("id", "conversation_id", "kind", "flow", "block", "deadline", "blocking", "state",
          "request", "created", "resolved_at")
_OUTBOX = ("id", "conversation_id", "channel", "user_id", "message", "state", "attempts",
           "next_attempt", "error", "created", "sent_at", "platform_id", "platform_status")
# table, columns, which rows (SQLite), columns whose SQLite integers are PostgreSQL booleans
_PLAN: list[tuple[str, tuple[str, ...], str, tuple[str, ...]]] = [
    ("conversations", _CONVERSATIONS, "1", ()),
    ("waits", _WAITS, "1", ("blocking",)),
    ("outbox", _OUTBOX, "state = 'pending' OR (channel = 'web' AND state = 'sent')", ()),
    ("events", ("id", "at"), "at >= :since", ()),
    ("early_statuses", ("platform_id", "status", "error", "at", "resend"), "1", ("resend",)),
    ("early_webhooks", ("id", "conversation_id", "payload", "schemes", "received", "expires"),
     "1", ()),
    ("chat_aliases", ("channel", "old_user_id", "new_user_id", "created"), "1", ()),
]


class MigrationError(FlowbotError):
    """The copy could not be made; nothing was written to PostgreSQL."""


@dataclass(frozen=True)
class Copied:
    """Rows copied per table, and the pending waits and outbox rows among them."""

    rows: dict[str, int]
    pending_waits: int
    pending_outbox: int


def copy_sqlite_to_postgres(path: str | Path, url: str, *, now: float | None = None
                            ) -> Copied:
    """Copy the SQLite database at `path` into the empty PostgreSQL database at `url`.
    Raises MigrationError (and writes nothing) when the file is missing, the target holds
    data, or the counts disagree after the copy."""
    path = Path(path)
    if not path.is_file():
        raise MigrationError(f"{path}: no such SQLite file")
    try:  # a server still on the file would go on answering 200 for what is not copied
        lock = WriterLock.acquire(path)
    except DatabaseInUse as exc:
        raise MigrationError(f"{exc} — migrate-storage copies a stopped server's database, "
                             "so that no callback it accepts afterwards is left behind") \
            from None
    try:  # held to the end: a server started meanwhile refuses the file
        try:  # and a server on the target would write beside the copy (ids collide, its
            # timer knows nothing of the copied waits): its one-server lock, taken too
            target_lock = ServerLock.acquire(url, _where(url))
        except DatabaseInUse as exc:
            raise MigrationError(f"{exc} — migrate-storage copies into a database no "
                                 "server uses yet") from None
        try:
            return _copy_all(path, url, now)
        finally:
            target_lock.release()
    finally:
        lock.release()


def _where(url: str) -> str:
    info = conninfo_to_dict(url)
    return (f"PostgreSQL database {info.get('dbname', '?')} on "
            f"{info.get('host', 'localhost')}:{info.get('port', 5432)}")


def _copy_all(path: Path, url: str, now: float | None) -> Copied:
    SQLiteStore(path).close()  # brings an older file's schema up to date, as a start would
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        target = PgStore(url, pool_size=1)  # creates the schema
    except BaseException:
        source.close()
        raise
    try:
        source.execute("BEGIN")  # one snapshot of the file for the whole copy
        if now is None:  # the window ends at the last event the stopped server saw
            now = source.execute("SELECT max(at) FROM events").fetchone()[0] or time.time()
        since = now - EVENT_WINDOW
        with target.pool.connection() as conn, conn.transaction():
            _refuse_data(conn)
            rows = {table: _copy(source, conn, table, columns, where, booleans, since)
                    for table, columns, where, booleans in _PLAN}
            for table in ("conversations", "outbox", "early_webhooks"):
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                             f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")
            copied = _verify(source, conn, rows, since)
        source.rollback()
        return copied
    except psycopg.Error as exc:  # the transaction rolled back: nothing was written
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise MigrationError(f"PostgreSQL refused the copy, so nothing was written: "
                             f"{type(exc).__name__}: {first}") from None
    finally:
        source.close()
        target.close()


def _refuse_data(conn: psycopg.Connection[Any]) -> None:
    for table, *_ in _PLAN:
        row = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()  # noqa: S608
        if row and row[0]:
            raise MigrationError(
                f"the PostgreSQL database already has rows in {table}: migrate-storage copies "
                "into an empty database only (create a new one, or drop flowbot's tables)")


def _copy(source: sqlite3.Connection, conn: psycopg.Connection[Any], table: str,
          columns: tuple[str, ...], where: str, booleans: tuple[str, ...], since: float) -> int:
    cols = ", ".join(columns)
    flags = [c in booleans for c in columns]
    cur = source.execute(f"SELECT {cols} FROM {table} WHERE {where}",  # noqa: S608
                         {"since": since})
    n = 0
    with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
        for row in cur:
            copy.write_row([bool(v) if flag and v is not None else
                            _text(v) if isinstance(v, str) else v
                            for v, flag in zip(row, flags, strict=True)])
            n += 1
    return n


def _verify(source: sqlite3.Connection, conn: psycopg.Connection[Any], rows: dict[str, int],
            since: float) -> Copied:
    """Counts on both sides agree: every table, and the pending waits and outbox rows."""
    problems = []
    for table, _, where, _ in _PLAN:
        want = source.execute(f"SELECT count(*) FROM {table} WHERE {where}",  # noqa: S608
                              {"since": since}).fetchone()[0]
        have = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
        if not (want == rows[table] == (have[0] if have else -1)):
            problems.append(f"{table}: {want} in SQLite, {have} in PostgreSQL")
    pending: dict[str, int] = {}
    for table in ("waits", "outbox"):
        want = source.execute(
            f"SELECT count(*) FROM {table} WHERE state = 'pending'").fetchone()[0]  # noqa: S608
        have = conn.execute(
            f"SELECT count(*) FROM {table} WHERE state = 'pending'").fetchone()  # noqa: S608
        if want != (have[0] if have else -1):
            problems.append(f"pending {table}: {want} in SQLite, {have} in PostgreSQL")
        pending[table] = want
    if problems:
        raise MigrationError("the copy does not match its source, so nothing was written: "
                             + "; ".join(problems))
    return Copied(rows, pending["waits"], pending["outbox"])
