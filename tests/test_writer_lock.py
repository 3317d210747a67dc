"""One server per database: a second `flowbot serve` on a SQLite file or a PostgreSQL
database already served refuses to start, at once, naming the other process; kill -9
frees it."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bot.errors import DatabaseInUse
from storage import lock as lock_module
from storage.lock import WriterLock
from storage.pg_lock import ServerLock
from storage.process import ProcessWorker
from storage.store import Store
from storage.worker import DbWorker
from tests.postgres import empty
from tests.reliability.common import Server, _free_port

FLOWS = """
[flows.main]
start = "hi"
[flows.main.blocks.hi]
type = "message"
text = "hi"
"""


@pytest.fixture(params=["process", "thread"])
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    srv = Server(tmp_path, flows=FLOWS)
    if request.param == "thread":
        srv.config.write_text(srv.config.read_text().replace(
            "[storage]\n", '[storage]\nworker = "thread"\n'))
    yield srv
    srv.stop()


SLOW_PART = {"aiohttp", "bot.server", "storage.store", "telegram", "twilio"}


def second_serve(server: Server) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """The same config on another port: what an admin who starts it twice gets, and the
    modules it imported (run with `-X importtime`, whose lines are taken out of stderr)."""
    other = server.config.with_name("second.toml")
    port = _free_port()
    other.write_text(server.config.read_text().replace(f"port = {server.port}",
                                                       f"port = {port}"))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "bot.cli", "serve",
                           "--config", str(other)], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines(keepends=True)
    imported = {line.rsplit("|", 1)[1].strip() for line in lines
                if line.startswith("import time:")}
    proc.stderr = "".join(line for line in lines if not line.startswith("import time:"))
    return proc, imported


def test_a_second_serve_is_refused_at_once_and_kill_9_frees_the_file(server: Server) -> None:
    server.start()
    assert server.proc is not None
    proc, imported = second_serve(server)
    assert proc.returncode != 0
    refusal = [x for x in proc.stderr.splitlines() if "already served" in x]
    assert len(refusal) == 1, proc.stderr
    assert f"pid {server.proc.pid}" in refusal[0] and str(server.db) in refusal[0]
    assert "Traceback" not in proc.stderr
    # "at once", whatever the machine's speed: refused before the slow part of a start
    # (the web server, the database, the channels are not even imported), after a lock
    # wait bounded by storage.lock.WAIT (test below)
    assert "storage.lock" in imported
    assert not imported & SLOW_PART
    # the first one goes on serving
    assert server.sql("SELECT count(*) FROM conversations") == [(0,)]

    server.kill9()  # the kernel drops the lock with the process (and its database process)
    server.start()


def test_a_held_lock_is_waited_for_at_most_wait_seconds(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for a holder that is ending (a restart right after a kill -9) is bounded by
    WAIT on the lock's own clock: a second server is refused that soon, never later."""
    db = tmp_path / "t.db"
    held = WriterLock.acquire(db, wait=0)  # another open file: flock conflicts in-process too
    now = [1000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(lock_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(lock_module.time, "sleep", sleep)
    try:
        with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()}"):
            WriterLock.acquire(db)
    finally:
        held.release()
    assert lock_module.WAIT <= sum(slept) <= lock_module.WAIT + max(slept) + 1e-9
    WriterLock.acquire(db, wait=0).release()  # free once its holder let go


async def test_the_database_process_holds_the_lock_its_server_took(tmp_path: Path) -> None:
    """A database process that outlives its server keeps a new one out until it ends."""
    db = tmp_path / "p.db"
    worker = ProcessWorker(functools.partial(Store, db), lock=db)
    await worker.open()
    try:
        with pytest.raises(DatabaseInUse, match=r"already served .*pid \d+"):
            await ProcessWorker(functools.partial(Store, db), lock=db).open()
        worker._release()  # the server's own descriptor gone, as after a kill -9
        with pytest.raises(DatabaseInUse):
            WriterLock.acquire(db, wait=0)
    finally:
        await worker.stop()
    WriterLock.acquire(db, wait=0).release()  # free once the database process ended


def test_the_thread_worker_takes_the_lock_and_drops_it_when_it_stops(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    first = DbWorker(Store(db), lock=db)
    first.start()
    try:
        with pytest.raises(DatabaseInUse, match="already served"):
            DbWorker(Store(db), lock=db).start()
    finally:
        first.join()
    second = DbWorker(Store(db), lock=db)
    second.start()
    second.join()


def test_postgresql_one_server_per_database_and_kill_9_frees_it(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on PostgreSQL: an advisory lock on a connection of the server's own, which
    PostgreSQL drops with the session when the process is killed."""
    empty(pg_database)
    monkeypatch.setenv("FLOWBOT_TEST_STORAGE", pg_database)
    server = Server(tmp_path)
    try:
        server.start()
        assert server.proc is not None
        proc, imported = second_serve(server)
        assert proc.returncode == 1, proc.stderr
        assert not imported & SLOW_PART  # at once: before the slow part of a start
        name = pg_database.rsplit("/", 1)[1]
        assert proc.stderr.splitlines() == [
            f"flowbot: the PostgreSQL database {name} on 127.0.0.1:5432 is already served by "
            f"another flowbot process (flowbot serve (pid {server.proc.pid}) on 127.0.0.1, "
            f"backend pid {holder_backend(pg_database)}); stop it first, or give this one "
            "another database (storage.url)"], proc.stderr
        assert proc.stdout == ""

        server.kill9()  # PostgreSQL ends the session, and the lock, with the socket
        server.start()
        again, _ = second_serve(server)
        assert again.returncode == 1 and "already served" in again.stderr
    finally:
        server.stop()
    with pytest.raises(DatabaseInUse):  # a held lock, seen from this process too
        first = ServerLock.acquire(pg_database, "db")
        try:
            ServerLock.acquire(pg_database, "db")
        finally:
            first.release()
    ServerLock.acquire(pg_database, "db").release()  # free once the holder ended


def test_the_postgresql_lock_is_per_schema(pg_database: str) -> None:
    """Two flowbots may share a database in schemas of their own (search_path)."""
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS other")
    first = ServerLock.acquire(pg_database, "db")
    try:
        other = ServerLock.acquire(pg_database + "?options=-csearch_path%3Dother", "db")
        other.release()
        assert first.alive()
    finally:
        first.release()
    assert not first.alive()


def holder_backend(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE "
                           "'flowbot serve (pid %%' AND datname = current_database()"
                           ).fetchone()
    assert row is not None
    return int(row[0])


def terminate(url: str, lock: ServerLock) -> None:
    """End the lock's session from outside, as an administrator (or a pooler) would."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (lock.conn.info.backend_pid,))


def test_a_lock_whose_session_was_ended_is_taken_again_or_reported_lost(
        pg_database: str) -> None:
    lost: list[str] = []
    lock = ServerLock.acquire(pg_database, "db")
    try:
        first = lock.conn.info.backend_pid
        terminate(pg_database, lock)
        assert lock.check(lost.append) and lost == []  # taken again, on a new session
        assert lock.conn.info.backend_pid != first and lock.alive()
        with pytest.raises(DatabaseInUse):
            ServerLock.acquire(pg_database, "db")

        terminate(pg_database, lock)
        other = ServerLock.acquire(pg_database, "db")  # another server got in first
        try:
            assert not lock.check(lost.append)
            assert len(lost) == 1 and lost[0].startswith(
                "lost the one-server lock on the db: the db is already served by another "
                "flowbot process"), lost
        finally:
            other.release()
    finally:
        lock.release()


def test_the_watch_thread_retakes_the_lock(pg_database: str) -> None:
    lock = ServerLock.acquire(pg_database, "db")
    try:
        thread = lock.watch(lambda sentence: None, every=0.02)
        first = lock.conn.info.backend_pid
        terminate(pg_database, lock)
        end = time.monotonic() + 10
        # a broken connection reads backend pid 0 until the thread swaps in the new one
        while lock.conn.info.backend_pid in (first, 0) and time.monotonic() < end:
            time.sleep(0.01)
        assert lock.conn.info.backend_pid not in (first, 0) and lock.alive()
    finally:
        lock.release()
    thread.join(5)
    assert not thread.is_alive()
