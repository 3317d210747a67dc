"""`flowbot backup` on PostgreSQL: a pg_dump archive of one snapshot, taken while rows are
being written, whose printed counts are the archive's and which pg_restore turns into a
database a server starts on; without pg_dump, a sentence saying what to do and exit 1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

from storage.postgres import PgStore
from tests.postgres import empty
from tests.prereq import require

FLOWS = """
[flows.main]
start = "hi"
[flows.main.blocks.hi]
type = "message"
text = "hi"
"""


def config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "pg.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n[channels.web]\nenabled = false\n' + FLOWS)
    return path


def cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def need_client_tools() -> None:
    require(shutil.which("pg_dump") and shutil.which("pg_restore"), "pg_dump and pg_restore",
            "apt-get install postgresql-client")


def rows(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def test_a_dump_under_writes_has_the_counts_it_prints_and_restores(
        pg_database: str, pg_scratch: str, tmp_path: Path) -> None:
    need_client_tools()
    PgStore(pg_database).close()  # the schema, as a server's first start makes it
    empty(pg_database)
    stop = threading.Event()

    def writer() -> None:  # a conversation and its pending wait per transaction
        with psycopg.connect(pg_database) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                with conn.transaction():
                    cid = conn.execute(
                        "INSERT INTO conversations (channel, user_id, key, created, updated) "
                        "VALUES ('web', %s, %s, 0, 0) RETURNING id",
                        (f"u{i}", f"k{i}")).fetchone()
                    assert cid is not None
                    conn.execute("INSERT INTO waits (id, conversation_id, kind, flow, block, "
                                 "deadline, blocking, created) VALUES (%s, %s, 'webview', "
                                 "'main', 'hi', 1e10, true, 0)", (f"w{i}", cid[0]))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while rows(pg_database, "SELECT count(*) FROM waits") < 50:
            time.sleep(0.01)
        out = tmp_path / "flowbot.dump"
        done = cli("backup", "--config", str(config(tmp_path, pg_database)), str(out))
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split(" — ")[1]
    convs, waits = int(printed.split()[0]), int(printed.split("), ")[1].split()[0])
    assert convs == waits and convs >= 50 and "pg_restore" in done.stdout
    assert convs < rows(pg_database, "SELECT count(*) FROM conversations"), "not under load"
    assert not list(tmp_path.glob(".*partial"))

    restored = subprocess.run(["pg_restore", "--no-owner", f"--dbname={pg_scratch}",
                               str(out)], capture_output=True, text=True, timeout=120)
    assert restored.returncode == 0, restored.stderr
    assert rows(pg_scratch, "SELECT count(*) FROM conversations") == convs
    assert rows(pg_scratch, "SELECT count(*) FROM waits WHERE state = 'pending'") == waits
    assert rows(pg_scratch, "SELECT count(*) FROM conversations c WHERE NOT EXISTS "
                "(SELECT 1 FROM waits w WHERE w.conversation_id = c.id)") == 0  # not torn
    PgStore(pg_scratch).close()  # a server opens it: the migrations are all there

    again = cli("backup", "--config", str(config(tmp_path, pg_database)), str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_without_pg_dump_it_says_what_to_do(pg_database: str, tmp_path: Path) -> None:
    PgStore(pg_database).close()
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)  # a PATH with no PostgreSQL client tools
    out = tmp_path / "flowbot.dump"
    done = cli("backup", "--config", str(config(tmp_path, pg_database)), str(out),
               path=str(bare))
    assert done.returncode == 1
    assert done.stderr.startswith("flowbot: cannot back up PostgreSQL: pg_dump is not on "
                                  "PATH."), done.stderr
    assert "point-in-time recovery" in done.stderr and "docs/postgresql.md" in done.stderr
    assert not out.exists() and "Traceback" not in done.stderr


def test_an_unreachable_server_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    need_client_tools()
    out = tmp_path / "flowbot.dump"
    done = cli("backup", "--config", str(config(tmp_path, "postgresql://x@127.0.0.1:1/none")),
               str(out))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot back up PostgreSQL: OperationalError" in done.stderr
    assert not out.exists()
