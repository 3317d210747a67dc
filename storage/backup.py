"""A consistent copy of a live SQLite database, through SQLite's online backup API."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BackupInfo:
    """What was copied: bytes of the copy, seconds it took, and its row counts."""

    size: int
    seconds: float
    conversations: int
    pending_waits: int


def backup(src: Path, out: Path) -> BackupInfo:
    """Copy the database at `src` to `out` (which must not exist) while a server may be
    writing to it. The copy is one read transaction's snapshot (WAL mode: the server goes
    on writing meanwhile), written to a temporary file beside `out`, checked, and renamed
    into place, so `out` is never a half-written database. Raises FileExistsError,
    FileNotFoundError, or sqlite3.Error."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new name (a backup never "
                              "overwrites)")
    if not out.parent.is_dir():  # else SQLite says only "unable to open database file"
        raise FileNotFoundError(f"the folder {out.parent} does not exist; create it first "
                                "(mkdir -p) or write the backup elsewhere")
    if not src.exists():
        raise FileNotFoundError(f"there is no database at {src} (storage.path)")
    began = time.monotonic()
    tmp = out.with_name(f".{out.name}.partial")
    tmp.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)  # all pages in one step: one snapshot, never restarted
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            check = target.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy failed its check: {check}")
            conversations = target.execute("SELECT count(*) FROM conversations").fetchone()[0]
            pending = target.execute(
                "SELECT count(*) FROM waits WHERE state = 'pending'").fetchone()[0]
        finally:
            target.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    return BackupInfo(out.stat().st_size, time.monotonic() - began, conversations, pending)
