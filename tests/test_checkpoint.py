"""WAL checkpoints on their own thread (storage/checkpoint.py): the WAL starts over under
steady writes, nothing committed is lost, and the worker falls back to SQLite's own
checkpoints if the thread fails."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from storage.checkpoint import Checkpointer
from storage.store import Store
from storage.worker import DbWorker


def _wal_frames(path: Path) -> int:
    return (path.with_name(path.name + "-wal").stat().st_size - 32) // (4096 + 24)


def _write(store: Store, ckpt: Checkpointer, until: Callable[[], bool], first: int = 0) -> int:
    """Commit 20 rows at a time, as the worker would, until `until()`; returns the next
    row number. The writer never pauses longer than its own transactions, as under load."""
    written = first
    deadline = time.monotonic() + 20
    while not until() and time.monotonic() < deadline:
        ckpt.before_transaction(store.conn)
        with store.transaction():
            for _ in range(20):
                store.record_event(f"e{written}", 0)
                written += 1
        ckpt.committed()
    return written


def _checkpointed(path: Path, restart_frames: int) -> tuple[Store, Checkpointer]:
    store = Store(path)
    store.conn.execute("PRAGMA wal_autocheckpoint=0")
    ckpt = Checkpointer(path, interval=0, restart_frames=restart_frames)
    ckpt.start()
    return store, ckpt


def test_the_wal_starts_over_under_steady_writes_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store, ckpt = _checkpointed(path, restart_frames=40)
    try:
        written = _write(store, ckpt, lambda: ckpt.restarts >= 3)
    finally:
        ckpt.stop()
    assert ckpt.restarts >= 3 and not ckpt.failed
    # the file holds the longest cycle's frames, not every write (how long a cycle grows
    # depends on when the thread gets a core, so no fixed bound here)
    assert _wal_frames(path) < ckpt.cycled_frames
    # no close(): a fresh connection, as after kill -9, sees every committed row
    other = sqlite3.connect(path)
    assert other.execute("SELECT count(*) FROM events").fetchone() == (written,)
    assert other.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_long_reader_holds_the_wal_back_until_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store, ckpt = _checkpointed(path, restart_frames=40)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        seen = reader.execute("SELECT count(*) FROM events").fetchone()
        written = _write(store, ckpt, lambda: _wal_frames(path) > 200)
        assert ckpt.restarts == 0  # the reader's snapshot still needs those frames
        assert reader.execute("SELECT count(*) FROM events").fetchone() == seen
        reader.execute("COMMIT")
        written = _write(store, ckpt, lambda: ckpt.restarts >= 1, first=written)
    finally:
        ckpt.stop()
        reader.close()
    assert ckpt.restarts >= 1
    assert sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone() == (
        written,)


async def test_the_worker_hands_checkpoints_to_the_thread(tmp_path: Path) -> None:
    store = Store(tmp_path / "w.db")
    worker = DbWorker(store)
    await worker.open()
    try:
        assert await worker.run(Store.record_event, "a", 0)
        assert worker.checkpointer is not None
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    finally:
        await worker.stop()


async def test_a_failed_checkpoint_thread_gives_checkpoints_back_to_sqlite(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "f.db")
    worker = DbWorker(store)
    await worker.open()
    try:
        assert worker.checkpointer is not None
        worker.checkpointer.failed = True  # as after an I/O error on its thread
        assert await worker.run(Store.record_event, "a", 0)
        assert worker.checkpointer is None
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
        assert await worker.run(Store.record_event, "b", 0)
    finally:
        await worker.stop()


def test_the_thread_reports_a_database_it_cannot_open(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "missing" / "x.db")
    ckpt.start()
    ckpt.stop()
    assert ckpt.failed
