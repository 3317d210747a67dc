"""One `flowbot serve` per PostgreSQL database (and schema), as storage/lock.py is for a
SQLite file: an advisory lock held for the server's life on a connection of its own.

The lock is taken inside a transaction that stays open (`pg_try_advisory_xact_lock`), not
as a session lock: behind PgBouncer in transaction mode a session lock would stay with a
pooled server connection after flowbot ended (and refuse every later start), while an
open transaction pins the server connection to us and ends with our client. Either way
the lock ends with the connection, so `kill -9` frees the database: PostgreSQL ends the
session when the socket closes. The transaction writes nothing and holds no snapshot
between statements, so it does not hold back VACUUM; it turns its idle-in-transaction
timeout off for itself alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from bot.errors import DatabaseInUse, StorageUnavailable

CONNECT_TIMEOUT = 10  # s to reach the server before start-up gives up
CHECK_EVERY = 10.0  # s between checks that the lock's connection still answers
log = logging.getLogger(__name__)


def lock_key(schema: str) -> int:
    """The advisory lock's key for flowbot's tables in `schema`: a signed 64-bit number
    (pg_advisory_xact_lock's bigint), apart from the migrations' key (pg_schema.py)."""
    digest = hashlib.blake2b(f"flowbot serve {schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class ServerLock:
    """The held lock: its connection, kept open (and idle) until `release`."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], url: str, where: str
                 ) -> None:
        self.conn = conn
        self.url = url
        self.where = where
        self._stop = threading.Event()

    @classmethod
    def acquire(cls, url: str, where: str) -> ServerLock:
        """Take the lock at once or raise `DatabaseInUse` naming the holder (its
        application name `flowbot serve (pid N)`, host and backend pid, as far as this
        role may see them). `where` names the database in messages (never the URL: it may
        hold a password). Raises `StorageUnavailable` when the server cannot be reached."""
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                   prepare_threshold=None,
                                   application_name=f"flowbot serve (pid {os.getpid()})")
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise StorageUnavailable("storage_unavailable",
                                     f"cannot reach the {where}: {first}") from None
        try:
            conn.execute("BEGIN")
            conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            row = conn.execute("SELECT coalesce(current_schema(), '')").fetchone()
            key = lock_key(row[0] if row else "")
            got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
            if got and got[0]:
                return cls(conn, url, where)
            holder = _holder(conn, key)
        except BaseException:
            conn.close()
            raise
        conn.close()
        raise DatabaseInUse(f"the {where} is already served by another flowbot process "
                            f"({holder}); stop it first, or give this one another database "
                            "(storage.url)")

    def alive(self) -> bool:
        """The lock is still ours: its connection answers (False once the server or a
        pooler ended it)."""
        try:
            self.conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def watch(self, on_lost: Callable[[str], None], every: float = CHECK_EVERY
              ) -> threading.Thread:
        """`check` every `every` s on a thread of its own, until the lock is released or
        lost (then `on_lost(sentence)` was called once: the caller stops serving, since
        two servers must not run on one database)."""
        def loop() -> None:
            while not self._stop.wait(every) and self.check(on_lost):
                pass

        thread = threading.Thread(target=loop, name="flowbot-pg-lock", daemon=True)
        thread.start()
        return thread

    def check(self, on_lost: Callable[[str], None]) -> bool:
        """Whether the lock is still ours. When its connection no longer answers (the
        database restarted, an administrator or a pooler's timeout ended the session),
        take it again on a new connection; when another process took it meanwhile, call
        `on_lost(sentence)` and answer False. A database that cannot be reached now is
        tried again at the next check (True)."""
        if self.alive():
            return True
        try:
            again = ServerLock.acquire(self.url, self.where)
        except DatabaseInUse as exc:
            on_lost(f"lost the one-server lock on the {self.where}: {exc}")
            return False
        except StorageUnavailable as exc:
            log.warning("the one-server lock's connection is gone and the database cannot "
                        "be reached to take it again: %s", exc)
            return True
        old, self.conn = self.conn, again.conn
        old.close()
        log.warning("the one-server lock's connection was ended; the lock is held again on "
                    "a new one")
        return True

    def release(self) -> None:
        """Stop watching; end the transaction and the connection (the lock goes with
        them)."""
        self._stop.set()
        if not self.conn.closed:
            self.conn.close()


def _holder(conn: psycopg.Connection[tuple[Any, ...]], key: int) -> str:
    """Who holds `key`: from pg_locks and pg_stat_activity (another role's details read
    as NULL without pg_read_all_stats; then only the backend pid)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(
        "SELECT l.pid, a.application_name, host(a.client_addr) FROM pg_locks l "
        "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid",
        (unsigned >> 32, unsigned & 0xFFFFFFFF)).fetchone()
    if row is None:  # it ended between the two queries: a restart may simply retry
        return "which has just stopped; start this one again"
    pid, app, host = row
    who = app if app and app.startswith("flowbot serve") else "PostgreSQL backend"
    return f"{who}{' on ' + host if host else ''}, backend pid {pid}"

