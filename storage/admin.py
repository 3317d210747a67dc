"""The CLI's operator commands on either backend (`check`'s stranded conversations,
`conversations`, `conversation`, `backup`): each opens a read-only connection of its own
and turns a driver's error into `bot.errors.StorageError`, so bot/cli_data.py needs no
driver and no backend's name."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from bot.config import Config
from bot.errors import NoDatabase, StorageError
from bot.stranded import Stranded
from storage import inspect
from storage.backup import BackupInfo
from storage.preflight import storage_url, where

T = TypeVar("T")


@contextmanager
def reading(config: Config) -> Iterator[inspect.Rows]:
    """`rows(sql, args)` on a read-only connection of its own (`?` placeholders on both
    backends). Raises NoDatabase when there is no database (or no flowbot tables) yet,
    StorageError when it cannot be read."""
    if config.storage.backend == "postgresql":
        with _pg_reading(config) as rows:
            yield rows
        return
    path = config.storage.path
    if not path.exists():
        raise NoDatabase(f"there is no database at {path} (storage.path); it is created at "
                         "the first start")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {path}: {exc}") from None
    try:
        yield lambda sql, args: conn.execute(sql, tuple(args)).fetchall()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()


@contextmanager
def _pg_reading(config: Config) -> Iterator[inspect.Rows]:
    import psycopg
    from psycopg import errors

    from storage.postgres import connect_kwargs

    name = where(config)
    try:
        conn = psycopg.connect(storage_url(config), connect_timeout=10,
                               **connect_kwargs(config.storage.prepared_statements))
    except psycopg.Error as exc:
        raise StorageError(f"cannot reach the {name}: {_first_line(exc)}") from None
    try:
        conn.execute("BEGIN READ ONLY")

        def rows(sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(sql.replace("?", "%s"), tuple(args)).fetchall()

        yield rows
    except errors.UndefinedTable:
        raise NoDatabase(f"the {name} has no flowbot tables yet; they are created at the "
                         "first start (or by flowbot migrate-storage)") from None
    except psycopg.Error as exc:
        raise StorageError(f"cannot read the {name}: {_first_line(exc)}") from None
    finally:
        conn.close()  # the read-only transaction ends with it


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def stranded(config: Config, live: list[tuple[str, str, str]]) -> list[Stranded]:
    """The stranded conversations and orphaned waits (bot/stranded.py) of the configured
    database, read-only. Raises NoDatabase, StorageError."""
    if config.storage.backend == "postgresql":
        from storage.pg_stranded import find_stranded

        return _pg_job(config, lambda conn: find_stranded(conn, live))
    from storage.stranded import read_stranded

    if not config.storage.path.exists():
        raise NoDatabase(f"{config.storage.path}: no database yet (it is created at the "
                         "first start)")
    try:
        return read_stranded(str(config.storage.path), live)
    except sqlite3.Error as exc:
        raise StorageError(str(exc)) from None


def _pg_job(config: Config, job: Callable[[Any], T]) -> T:
    """`job(conn)` in a read-only transaction on a PostgreSQL connection of its own."""
    import psycopg
    from psycopg import errors

    from storage.postgres import connect_kwargs

    try:
        with psycopg.connect(storage_url(config), connect_timeout=10,
                             **connect_kwargs(config.storage.prepared_statements)) as conn:
            conn.execute("BEGIN READ ONLY")
            try:
                return job(conn)
            finally:
                conn.execute("ROLLBACK")
    except errors.UndefinedTable:
        raise NoDatabase(f"the {where(config)} has no flowbot tables yet (they are created "
                         "at the first start)") from None
    except psycopg.Error as exc:
        raise StorageError(_first_line(exc)) from None


def list_conversations(config: Config, **filters: Any) -> list[dict[str, Any]]:
    """storage/inspect.py's `list_conversations` on the configured database."""
    with reading(config) as rows:
        return inspect.list_conversations(rows, **filters)


def find_conversations(config: Config, key_or_user: str) -> list[tuple[int, str, str]]:
    """storage/inspect.py's `find_conversations` on the configured database."""
    with reading(config) as rows:
        return inspect.find_conversations(rows, key_or_user)


def conversation_detail(config: Config, conversation_id: int, messages: int
                        ) -> dict[str, Any]:
    """storage/inspect.py's `conversation_detail` on the configured database."""
    with reading(config) as rows:
        return inspect.conversation_detail(rows, conversation_id, messages)


def backup(config: Config, out: Path) -> tuple[BackupInfo, str]:
    """A consistent copy of the configured database into `out` (a SQLite file, or a
    pg_dump archive), and how to restore it (a sentence). Raises FileExistsError and
    FileNotFoundError (bad `out`, exit 2 in the CLI), StorageError (exit 1)."""
    if config.storage.backend == "postgresql":
        from storage import pg_backup

        info = pg_backup.backup(storage_url(config), out)
        return info, ("Restore: stop the server, then pg_restore --no-owner --dbname=URL "
                      f"{out} into an empty database, and point storage.url at it "
                      "(docs/postgresql.md).")
    from storage.backup import backup as sqlite_backup

    try:
        info = sqlite_backup(config.storage.path, out)
    except (sqlite3.Error, OSError) as exc:
        if isinstance(exc, FileExistsError | FileNotFoundError):
            raise
        raise StorageError(f"cannot back up {config.storage.path} to {out}: {exc}") from None
    return info, ("Restore: stop the server, copy it to storage.path (delete that file's "
                  "-wal and -shm), start.")
