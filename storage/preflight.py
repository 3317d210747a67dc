"""What `flowbot serve` checks about its database before it opens it (the SQLite file can
be written, no other server holds it), and what the CLI needs to know about drivers
without importing them itself: storage/ is the only place that imports a database driver.

Each failure is a `bot.startup.StartupError` (exit 1: the environment is wrong)."""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Config
from bot.errors import DatabaseInUse, FlowbotError, StorageUnavailable
from bot.startup import ENVIRONMENT, StartupError

if TYPE_CHECKING:
    from storage.pg_lock import ServerLock


def storage_url(config: Config) -> str:
    """The PostgreSQL URL of `config.storage` (`url`, or the variable `url_env` names).
    Raises FlowbotError when that variable is not set."""
    storage = config.storage
    if storage.url:
        return checked_url(storage.url, "storage.url")
    url = os.environ.get(storage.url_env, "")
    if not url:
        raise FlowbotError(f"storage.url_env: the environment variable {storage.url_env} is "
                           "not set (it should hold the postgresql:// URL)")
    return checked_url(url, f"storage.url_env: the URL in {storage.url_env}")


def checked_url(url: str, what: str) -> str:
    """`url` if libpq can parse it. Raises FlowbotError starting with `what`, with libpq's
    reason and the password masked: libpq quotes the piece it choked on, which may be
    the password ("unexpected spaces found in \"se cret\""), and that message would
    otherwise reach logs, terminals and monitoring."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except Exception as exc:
        raise FlowbotError(f"{what} is not a valid PostgreSQL URL: "
                           f"{mask_secrets(str(exc).strip(), url)}") from None
    return url


def mask_secrets(text: str, url: str) -> str:
    """`text` with every password `url` may carry (between `user:` and `@`, or a
    `password=` parameter; as written and percent-decoded) replaced by `***`. Works on
    URLs libpq refuses too: it is for the messages about them."""
    for secret in url_passwords(url):
        text = text.replace(secret, "***")
    return text


def url_passwords(url: str) -> list[str]:
    """The passwords a PostgreSQL URL may carry (between `user:` and `@`, or a `password=`
    parameter), as written and percent-decoded, longest first: for `mask_secrets` and the
    log's redaction."""
    from urllib.parse import unquote

    rest = url.split("://", 1)[-1]
    userinfo = rest.rsplit("@", 1)[0] if "@" in rest else ""
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
    for part in re.split(r"[?&\s]", url):
        if part.lower().startswith("password="):
            found.append(part[len("password="):])
    return sorted({s for f in found for s in (f, unquote(f)) if s}, key=len, reverse=True)


def where(config: Config) -> str:
    """How messages name the database: the SQLite file, or the PostgreSQL database and
    server (never the URL: it may carry a password)."""
    if config.storage.backend == "sqlite":
        return str(config.storage.path)
    try:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(storage_url(config))
    except Exception:  # an unparsable URL is reported where it is used
        return "PostgreSQL database (storage.url)"
    return (f"PostgreSQL database {info.get('dbname', '?')} on "
            f"{info.get('host', 'localhost')}:{info.get('port', 5432)}")


def hold_server_lock(config: Config) -> ServerLock:
    """PostgreSQL: take the one-server lock (storage/pg_lock.py) for this process's life;
    the caller releases it when serving ends. Raises StartupError (exit 1) naming the
    server that holds it, or saying the database cannot be reached."""
    from storage.pg_lock import ServerLock

    try:
        return ServerLock.acquire(storage_url(config), where(config))
    except (DatabaseInUse, StorageUnavailable) as exc:
        raise StartupError(str(exc), ENVIRONMENT) from None


def check_single_writer(path: Path) -> None:
    """No other process serves this SQLite file (one writer per file; the server takes the
    lock for good when its database worker starts). Raises StartupError (exit 1) naming
    the other process."""
    from storage.lock import WriterLock

    if not path.exists():  # nobody serves it yet; the worker's own lock settles a tie
        return
    try:
        WriterLock.acquire(path).release()
    except DatabaseInUse as exc:
        raise StartupError(str(exc), ENVIRONMENT) from None


def check_database(path: Path) -> None:
    """The SQLite file can be opened for writing, or created where it should be; without
    creating it. Raises StartupError (exit 1)."""
    where = path.parent
    if not path.exists():
        if not where.is_dir():
            raise StartupError(f"the database directory {where} does not exist — create it, "
                               "or change storage.path", ENVIRONMENT)
        if not os.access(where, os.W_OK | os.X_OK):
            raise StartupError(f"cannot create the database {path}: no permission to write "
                               f"in {where} — fix its permissions or change storage.path",
                               ENVIRONMENT)
        return
    if path.is_dir():
        # the path names something on this machine that is not what it must be: the
        # environment's (exit 1, as a missing or unwritable folder), not the config's syntax
        raise StartupError(f"the database {path} is a directory — storage.path must name a "
                           f"file (e.g. {path / 'flowbot.db'}), or remove that directory",
                           ENVIRONMENT)
    if not os.access(path, os.R_OK | os.W_OK):
        raise StartupError(f"cannot open the database {path} for writing: permission denied — "
                           f"make it readable and writable by this user ({_user()})",
                           ENVIRONMENT)
    if not os.access(where, os.W_OK | os.X_OK):
        # SQLite's WAL mode needs the -wal and -shm files next to the database
        raise StartupError(f"cannot write in {where}, where the database keeps its -wal and "
                           "-shm files — make the directory writable by this user "
                           f"({_user()})", ENVIRONMENT)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StartupError(f"the database {path} is unreadable ({exc}) — restore it from a "
                           "backup or move it away to start with an empty one", ENVIRONMENT)\
            from None


def is_database_error(exc: BaseException) -> bool:
    """`exc` is a driver's error (sqlite3's, or psycopg's when it is loaded): the database
    could not be opened or used, as opposed to a bug."""
    if isinstance(exc, sqlite3.Error):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


def software(config: Config) -> str:
    """The database library this server runs on, for the start-up log line: "SQLite
    3.40.1", or "psycopg 3.2.3 (libpq 15.8)"."""
    if config.storage.backend == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    import psycopg

    libpq = psycopg.pq.version()
    return (f"psycopg {psycopg.__version__} "
            f"(libpq {libpq // 10000}.{libpq % 10000})")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())
