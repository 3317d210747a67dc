"""One writer per SQLite file: an OS lock on a file beside the database (`flowbot.db.lock`),
held for the life of the process that serves it, and released by the kernel however that
process ends (kill -9 included)."""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time
from pathlib import Path

from bot.errors import DatabaseInUse

WAIT = 0.6  # s a new server waits for a lock whose holder is ending (a restart after kill -9)


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


class WriterLock:
    """An exclusive `flock` on `<database>.lock`, whose content names the holder (pid and
    command) for the message a second server prints."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, db: Path, wait: float = WAIT) -> WriterLock:
        """Take the lock, waiting up to `wait` s for a holder that is ending. Raises
        `DatabaseInUse` naming the holder when another process keeps it."""
        path = lock_path(db)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DatabaseInUse(f"cannot open the lock file {path}: {exc.strerror}") from None
        end = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    holder = _holder(path)
                    os.close(fd)
                    raise DatabaseInUse(
                        f"{db} is already served by another flowbot process ({holder}); "
                        "stop it first, or give this one another storage.path") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command_line()[:200]}\n".encode(), 0)
        return cls(fd, path)

    @classmethod
    def adopt(cls, fd: int, db: Path) -> WriterLock:
        """The lock a parent took and handed down (the database process): checks that this
        descriptor holds it, which it does unless the parent lied."""
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: returns at once
        return cls(fd, lock_path(db))

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = -1


def command_line() -> str:
    """This process's command line, for other processes to read, with the password of any
    URL in it masked (`migrate-storage --to postgresql://user:pass@…` takes one)."""
    text = " ".join(sys.argv)
    text = re.sub(r"(://[^\s/@:]*:)\S*@", r"\1***@", text)  # to the last @: the host
    return re.sub(r"(password=)[^\s&]*", r"\1***", text, flags=re.IGNORECASE)


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "pid unknown"
