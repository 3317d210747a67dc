"""`flowbot migrate-storage`: a SQLite database made by the real app (waiting users, odd
variables, undelivered messages, seen event ids) is copied into PostgreSQL, and a server
on PostgreSQL carries on exactly where the SQLite one stopped."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from bot import jobs
from bot.cli import main
from bot.messages import Inbound
from tests.postgres import empty
from tests.support import Harness, harness, write_config

FLOWS = """
[flows.main]
start = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Name?"
variable = "name"
next = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "Pay, {{name}}"
expiration = 60
on_success = "paid"
on_error = "paid"
on_expired = "late"
[flows.main.blocks.paid]
type = "end"
text = "paid {{name}}"
[flows.main.blocks.late]
type = "end"
text = "expired {{name}}"
"""
ODD = "Zoë 👩‍💻 שלום \x00 end"


def execution_id(h: Harness, user: str) -> str:
    link = [m for m in h.channel.messages(user) if m.link][-1].link
    assert link is not None
    return parse_qs(urlsplit(link.url).query)["executionId"][0]


@pytest.fixture
def pg_url(pg_database: str) -> str:
    empty(pg_database)
    return pg_database


async def test_a_sqlite_database_moves_and_the_flows_carry_on(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FLOWBOT_TEST_STORAGE", raising=False)
    sqlite_config = write_config(tmp_path, FLOWS)
    async with harness(sqlite_config) as h:
        for user in ("ann", "bob", "cid"):
            await h.say("hi", user, event_id=f"rec:{user}:1")
            await h.say(ODD if user == "ann" else user.title(), user, event_id=f"rec:{user}:2")
        eids = {u: execution_id(h, u) for u in ("ann", "bob", "cid")}
        assert (await h.post("/webview/callback", json={"executionId": eids["cid"],
                                                        "success": True}))[0] == 200
        # dan's question is committed but not delivered when the server stops
        await h.runtime.handle_inbound(Inbound("rec", "dan", "hi", event_id="rec:dan:1"))
        clock_at_stop = h.clock.now()
        before = await h.runtime.worker.run(jobs.counts)
    assert before["waits_pending"] == 2 and before["outbox_pending"] == 1

    monkeypatch.setenv("FLOWBOT_TEST_PG", pg_url)
    code = main(["migrate-storage", "--from", f"sqlite:{tmp_path / 'flowbot.db'}",
                 "--to", "env:FLOWBOT_TEST_PG"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "2 pending wait(s) and 1 undelivered message(s); counts verified" in out.out

    monkeypatch.setenv("FLOWBOT_TEST_STORAGE", pg_url)
    (tmp_path / "pg").mkdir()
    pg_config = write_config(tmp_path / "pg", FLOWS)
    assert pg_config.storage.backend == "postgresql"
    async with harness(pg_config) as h:
        h.clock.t = clock_at_stop
        # everything but the delivered messages (only the web chat's history moves)
        del before["outbox_sent"]
        assert await h.runtime.worker.run(jobs.counts) == before
        await h.flush()  # the message committed before the move is delivered after it
        assert [m.text for m in h.new_messages("dan")] == ["Name?"]
        # a redelivered event is still recognised; a new one goes on with the flow
        assert not await h.runtime.handle_inbound(Inbound("rec", "dan", "hi",
                                                          event_id="rec:dan:1"))
        assert [m.text for m in await h.say("Dan", "dan", event_id="rec:dan:2")] == [
            "Pay, Dan"]
        # the waits kept their ids, deadlines and variables
        status, body = await h.post("/webview/callback", json={"executionId": eids["ann"],
                                                               "success": True})
        assert (status, body["outcome"]) == (200, "success")
        assert [m.text for m in h.new_messages("ann")][-1] == f"paid {ODD}"
        status, body = await h.post("/webview/callback", json={"executionId": eids["cid"],
                                                               "success": True})
        assert (status, body["error"]) == (409, "already_resolved")
        assert await h.advance(61) == 2  # bob's wait, and dan's new one, expire on time
        assert [m.text for m in h.new_messages("bob")][-1] == "expired Bob"
        # new rows continue after the copied ids
        conv = await h.runtime.worker.run(jobs.conversation, "rec", "eve", "K-eve", 0)
        assert conv.id == 5

    # a second copy into a database that has data refuses and writes nothing
    code = main(["migrate-storage", "--from", f"sqlite:{tmp_path / 'flowbot.db'}",
                 "--to", pg_url])
    assert code == 2
    assert "already has rows in conversations" in capsys.readouterr().err
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM conversations").fetchone() == (5,)


def test_bad_arguments_say_what_to_give(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_URL", raising=False)
    for argv, said in [
        (["--from", "flowbot.db", "--to", "postgresql://x/y"], "--from must be sqlite:PATH"),
        (["--from", "sqlite:a.db", "--to", "mysql://x/y"], "--to must be a postgresql://"),
        (["--from", "sqlite:a.db", "--to", "env:NOPE_URL"], "NOPE_URL, which is not set"),
        (["--from", f"sqlite:{tmp_path / 'none.db'}", "--to", "postgresql://127.0.0.1:1/x"],
         "no such SQLite file"),
    ]:
        assert main(["migrate-storage", *argv]) == 2
        assert said in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none.db")


async def test_a_running_server_s_database_is_refused(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A callback the SQLite server answers 200 after the copy would be lost in the move."""
    monkeypatch.delenv("FLOWBOT_TEST_STORAGE", raising=False)
    async with harness(write_config(tmp_path, FLOWS)) as h:
        await h.say("hi", "ann")
        code = main(["migrate-storage", "--from", f"sqlite:{tmp_path / 'flowbot.db'}",
                     "--to", pg_url])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "already served by another flowbot process (pid" in err
        assert "copies a stopped server's database" in err
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM conversations").fetchone() == (0,)
    # stopped: the copy goes through, and a server can take the file again afterwards
    assert main(["migrate-storage", "--from", f"sqlite:{tmp_path / 'flowbot.db'}",
                 "--to", pg_url]) == 0
    async with harness(write_config(tmp_path, FLOWS)):
        pass


def test_nul_characters_in_sqlite_text_are_copied_as_the_store_writes_them(
        tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """SQLite text may hold NUL (a library's error text, an odd user id), PostgreSQL text
    cannot: the copy maps it as the PostgreSQL store maps what it is given (U+FFFD)."""
    import sqlite3

    from storage.store import SQLiteStore

    db = tmp_path / "flowbot.db"
    SQLiteStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO conversations (channel, user_id, key, created, updated) "
                     "VALUES ('web', ?, 'k1', 1, 1)", ("u\x00x",))
        conn.execute("INSERT INTO outbox (conversation_id, channel, user_id, message, state, "
                     "next_attempt, error, created) VALUES (1, 'web', ?, '{}', 'pending', 1, "
                     "?, 1)", ("u\x00x", "boom\x00"))
        conn.execute("INSERT INTO events (id, at) VALUES (?, 1)", ("ev\x00",))
        conn.execute("INSERT INTO chat_aliases VALUES ('telegram', '-1', '-1001', 1)")
    code = main(["migrate-storage", "--from", f"sqlite:{db}", "--to", pg_url])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Traceback" not in out.err
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT user_id FROM conversations").fetchone() == ("u\ufffdx",)
        assert conn.execute("SELECT user_id, error FROM outbox").fetchone() == (
            "u\ufffdx", "boom\ufffd")
        assert conn.execute("SELECT id FROM events").fetchone() == ("ev\ufffd",)
        assert conn.execute("SELECT * FROM chat_aliases").fetchall() == [
            ("telegram", "-1", "-1001", 1.0)]


def test_every_sqlite_table_and_column_is_copied_or_deliberately_left(tmp_path: Path) -> None:
    """A migration that adds a table or a column to SQLite must say whether it moves:
    otherwise migrate-storage would drop that data silently."""
    import sqlite3

    from storage.migrate import _PLAN
    from storage.store import SQLiteStore

    left = {"_sqlite_migrations", "settings"}  # each backend's own bookkeeping
    db = tmp_path / "flowbot.db"
    SQLiteStore(db).close()
    plan = {table: set(columns) for table, columns, *_ in _PLAN}
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")} - left
        assert tables == set(plan)
        for table in tables:
            columns = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            assert columns == plan[table], table


def test_a_target_a_server_already_runs_on_is_refused(
        tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A server on the (still empty) target would write beside the copy: ids collide, and
    its timer knows nothing of the copied waits."""
    from storage.pg_lock import ServerLock
    from storage.store import SQLiteStore

    db = tmp_path / "flowbot.db"
    SQLiteStore(db).close()
    running = ServerLock.acquire(pg_url, "the database")
    try:
        code = main(["migrate-storage", "--from", f"sqlite:{db}", "--to", pg_url])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "already served by another flowbot process" in err
        assert "copies into a database no server uses yet" in err
    finally:
        running.release()
    assert main(["migrate-storage", "--from", f"sqlite:{db}", "--to", pg_url]) == 0
