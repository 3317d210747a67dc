"""`flowbot backup` on PostgreSQL: pg_dump's custom format, of one snapshot that the row
counts printed are read from too, written beside the target and renamed into place (the
target is never half a dump). Without pg_dump on PATH it says what to do instead (the
PostgreSQL client tools, or the provider's point-in-time recovery) and copies nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bot.errors import StorageError
from storage.backup import BackupInfo

NO_PG_DUMP = (
    "cannot back up PostgreSQL: pg_dump is not on PATH. Install the PostgreSQL client "
    "tools of the server's major version or newer (Debian: apt-get install "
    "postgresql-client), or rely on the server's own backups (point-in-time recovery: "
    "pg_basebackup and WAL archiving, or your provider's) — see docs/postgresql.md")


def backup(url: str, out: Path, pg_dump: str | None = None) -> BackupInfo:
    """Dump the database at `url` into `out` (which must not exist) while a server may be
    writing to it: pg_dump runs on a snapshot exported by a REPEATABLE READ transaction
    that also counts the conversations and pending waits, so the counts are the dump's.
    `pg_dump`: its path (default: the one on PATH). Raises FileExistsError,
    FileNotFoundError (the folder), StorageError (no pg_dump, unreachable server, pg_dump
    failed; its first lines in the message). The password travels in PGPASSWORD, never
    on pg_dump's command line."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new name (a backup never "
                              "overwrites)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder {out.parent} does not exist; create it first "
                                "(mkdir -p) or write the backup elsewhere")
    tool = pg_dump or shutil.which("pg_dump")
    if tool is None:
        raise StorageError(NO_PG_DUMP)
    info = conninfo_to_dict(url)
    password = info.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    began = time.monotonic()
    tmp = out.with_name(f".{out.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot = _one(conn, "SELECT pg_export_snapshot()")
            conversations = _one(conn, "SELECT count(*) FROM conversations")
            pending = _one(conn, "SELECT count(*) FROM waits WHERE state = 'pending'")
            # the snapshot lives as long as this transaction: pg_dump runs inside it
            done = subprocess.run(  # noqa: S603 - our arguments, no shell
                [tool, "--format=custom", f"--snapshot={snapshot}", "--no-owner",
                 f"--file={tmp}", f"--dbname={make_conninfo('', **info)}"],
                env=env, capture_output=True, text=True, check=False)
            conn.execute("ROLLBACK")
        if done.returncode != 0:
            lines = " / ".join(done.stderr.strip().splitlines()[:3]) or "no message"
            raise StorageError(f"pg_dump failed (exit {done.returncode}): {lines}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except psycopg.errors.UndefinedTable:
        raise StorageError("the database has no flowbot tables yet (nothing to back up; "
                           "they are created at the first start)") from None
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise StorageError(f"cannot back up PostgreSQL: {type(exc).__name__}: {first}"
                           ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return BackupInfo(out.stat().st_size, time.monotonic() - began, int(conversations),
                      int(pending))


def _one(conn: psycopg.Connection[tuple[Any, ...]], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]
