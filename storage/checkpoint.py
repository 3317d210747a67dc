"""WAL checkpoints off the writer's path.

SQLite's own checkpoints run inside a COMMIT every ~1,000 WAL pages and wait there for
two fsyncs and the random writes between them: at 1M waits that put 30 to 40 % of the
database worker's time in COMMIT, and one COMMIT in a hundred took 30 to 150 ms, which
every callback and expiry queued behind it waited too.

Here a thread with a connection of its own copies the WAL into the database file at
most every `interval` seconds while there are commits (PASSIVE: it never holds up the
writer) and flushes the database file itself. SQLite starts the WAL over only after a
checkpoint that copied all of it, which never happens while the writer keeps adding; so
once the WAL is past `restart_frames`, the thread copies until a few hundred frames are
left, flushes the WAL, and leaves those last frames to the writer: between two
transactions it copies them (5 to 20 ms here: there is little left to flush) and its
next transaction starts the WAL over.

Durability is SQLite's, unchanged: synchronous=NORMAL on both connections, and the WAL is
never started over before a checkpoint that copied and flushed all of it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

INTERVAL = 0.1  # s between passes: 20 ms cost ~8 % of the callback path, 0.25 s won nothing
RESTART_FRAMES = 8000  # ~32 MB of WAL with 4 KiB pages
CATCH_UP_FRAMES = 200  # what the writer copies itself before the WAL starts over
CATCH_UP_PASSES = 5


class Checkpointer:
    def __init__(self, path: Path, interval: float = INTERVAL,
                 restart_frames: int = RESTART_FRAMES) -> None:
        self.path = path
        self.interval = interval
        self.restart_frames = restart_frames
        self.passes = 0
        self.restarts = 0
        self.cycled_frames = 0  # WAL frames written in the cycles that ended
        self.failed = False  # the thread stopped on an error: the writer checkpoints again
        self._wake = threading.Event()
        self._restart_due = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flowbot-checkpoint",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def committed(self) -> None:
        """The writer committed: there is WAL to copy."""
        self._wake.set()

    def before_transaction(self, conn: sqlite3.Connection) -> None:
        """The writer, between two transactions: finish the WAL's cycle if it is due."""
        if not self._restart_due:
            return
        try:
            _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if copied == frames:  # all of it: the next transaction starts the WAL over
                self.restarts += 1
                self.cycled_frames += frames
        except sqlite3.Error:  # the jobs go on; the next cycle tries again
            log.exception("WAL checkpoint before a transaction failed")
        self._restart_due = False
        self._wake.set()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False)
            db_fd = os.open(self.path, os.O_RDONLY)
            try:
                conn.execute("PRAGMA synchronous=NORMAL")
                self._loop(conn, db_fd)
            finally:
                os.close(db_fd)
                conn.close()
        except (sqlite3.Error, OSError):
            log.exception("WAL checkpoints failed on their thread; the database worker "
                          "takes them over")
            self.failed = True

    def _loop(self, conn: sqlite3.Connection, db_fd: int) -> None:
        last = -self.interval
        while True:
            self._wake.wait()
            time.sleep(max(0.0, last + self.interval - time.monotonic()))
            self._wake.clear()
            if self._stopping:
                return
            last = time.monotonic()
            if self._restart_due:
                continue  # the writer copies the rest
            frames, copied = self._pass(conn, db_fd)
            if frames < self.restart_frames:
                continue
            for _ in range(CATCH_UP_PASSES):
                if frames - copied <= CATCH_UP_FRAMES:
                    break
                before = copied
                frames, copied = self._pass(conn, db_fd)
                if copied <= before:
                    break  # a reader holds older frames (a long read elsewhere): next time
            if frames - copied <= CATCH_UP_FRAMES:
                _fsync(f"{self.path}-wal")
                self._restart_due = True

    def _pass(self, conn: sqlite3.Connection, db_fd: int) -> tuple[int, int]:
        """One PASSIVE checkpoint, then the database file flushed, so the writer's own
        checkpoint at the end of the cycle has little left to wait for."""
        _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        os.fsync(db_fd)
        self.passes += 1
        return frames, copied


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
