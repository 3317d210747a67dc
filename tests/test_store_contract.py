"""The storage contract (bot/store.py) on both backends: the same cases against a SQLite
file and a PostgreSQL database, then what only PostgreSQL has to prove (the database's
clock, timeouts, migrations under an advisory lock, PgBouncer mode, lock order)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bot.config import load_config
from bot.errors import FlowbotError, StaleState
from bot.messages import Button, Inbound, Media, Message
from bot.state import Step, Wait
from bot.store import Store
from storage import backends
from storage.postgres import PgLedger, PgStore
from storage.store import SQLiteStore
from tests.postgres import empty
from tests.support import PAY_FLOW, query


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
        empty(url)
        s = PgStore(url, pool_size=2)
    else:
        s = SQLiteStore(tmp_path / "t.db")
    try:
        yield s
    finally:
        s.close()


def _wait(store: Store, wid: str = "W", deadline: float = 100) -> None:
    with store.transaction():
        conv = store.conversation("tg", "1", "K", 0)
        store.save(conv, Step(waits=[Wait(wid, "webview", "main", "pay", deadline, True)]), 0)


def test_conversation_created_once_with_a_random_key(store: Store) -> None:
    with store.transaction():
        a = store.conversation("tg", "1", "KEY-A", 0)
        b = store.conversation("tg", "1", "KEY-B", 0)
        c = store.conversation("tg", "2", "KEY-C", 0)
        assert a.id == b.id != c.id
        assert b.key == "KEY-A"
        assert store.conversation_by_key("KEY-C") is not None
        assert store.conversation_by_key("nope") is None
        assert store.conversation_by_id(c.id) == c


def test_a_conversation_moves_to_a_new_address(store: Store) -> None:
    with store.transaction():
        old = store.conversation("telegram", "-100", "K-old", 0)
        old.variables = {"user_id": "-100", "x": 1}
        store.save(old, Step(messages=[Message("pending")]), 0)
        early = store.conversation("telegram", "-200", "K-early", 0)
        assert store.move_conversation("telegram", "-100", "-200", 5)
        assert not store.move_conversation("telegram", "-100", "-200", 6)  # moved already
    with store.transaction():
        moved = store.conversation("telegram", "-200", "unused", 7)
        assert (moved.id, moved.key, moved.variables) == (old.id, "K-old",
                                                         {"user_id": "-200", "x": 1})
        assert store.conversation_by_key("K-early").user_id == f"-200~replaced~{early.id}"  # type: ignore[union-attr]
        assert [r.user_id for r in store.pending_deliveries(10, 10)] == ["-200"]


def test_a_move_never_sets_aside_the_conversation_that_moved_first(store: Store) -> None:
    """The group moved (one migration notice), then a late update from the old address
    started a conversation there: the other notice must not move that one over the real
    one. The older conversation stays at the new address; the younger is set aside."""
    with store.transaction():
        real = store.conversation("telegram", "-100", "K-real", 0)
        assert store.move_conversation("telegram", "-100", "-200", 1)
        query(store, "DELETE FROM chat_aliases")  # as a database from before m012 would
        late = store.conversation("telegram", "-100", "K-late", 2)
        assert not store.move_conversation("telegram", "-100", "-200", 3)
    with store.transaction():
        assert store.conversation("telegram", "-200", "unused", 4).key == real.key
        assert store.conversation_by_key("K-late").user_id == f"-100~replaced~{late.id}"  # type: ignore[union-attr]


def test_the_old_address_of_a_moved_chat_leads_to_its_conversation(store: Store) -> None:
    """The alias is written with the move, in its transaction, and read by `conversation`
    (a late update from an upgraded group, whichever process gets it); rolled back with the
    move; pruned with the idle conversations."""
    with pytest.raises(RuntimeError), store.transaction():
        store.conversation("telegram", "-100", "K-real", 0)
        assert store.move_conversation("telegram", "-100", "-200", 1)
        raise RuntimeError("the move rolls back")
    with store.transaction():
        assert query(store, "SELECT * FROM chat_aliases") == []
        real = store.conversation("telegram", "-100", "K-real", 0)
        assert store.move_conversation("telegram", "-100", "-200", 1)
        assert not store.move_conversation("telegram", "-300", "-400", 1)  # nothing there
    with store.transaction():
        late = store.conversation("telegram", "-100", "K-late", 2)
        assert (late.id, late.key, late.user_id) == (real.id, "K-real", "-200")
        assert store.conversation("whatsapp", "-100", "K-other", 2).id != real.id
        fresh = store.conversation("telegram", "-300", "K-new", 2)  # nothing had moved
        assert (fresh.key, fresh.user_id) == ("K-new", "-400")
        assert store.prune("chat_aliases", 1, 10) == (0, 0)
        assert store.prune("chat_aliases", 1.5, 10) == (2, 0)
        assert store.conversation("telegram", "-100", "K-after", 3).key == "K-after"


def test_save_is_optimistic(store: Store) -> None:
    with store.transaction():
        conv = store.conversation("tg", "1", "K", 0)
        stale = store.conversation("tg", "1", "K", 0)
        store.save(conv, Step(), 1)
    with pytest.raises(StaleState), store.transaction():
        store.save(stale, Step(), 2)


def test_variables_keep_odd_text(store: Store) -> None:
    odd = {"nul": "a\x00b", "rtl": "שלום", "emoji": "👩‍💻", "nested": {"k": [1, 2.5, None]}}
    with store.transaction():
        conv = store.conversation("web", "u\u202e", "K", 0)
        conv.variables = odd
        store.save(conv, Step(messages=[Message("x\x00y 🎉")]), 0)
    with store.transaction():
        again = store.conversation("web", "u\u202e", "other", 0)
        assert again.variables == odd and again.version == 1
        assert [r.message.text for r in store.pending_deliveries(0, 10)] == ["x\x00y 🎉"]


def test_claim_is_exactly_once_and_respects_the_deadline(store: Store) -> None:
    _wait(store)
    with store.transaction():
        assert not store.claim("W", "expired", 99, due=True)  # not due yet
        assert store.claim("W", "success", 99, due=False)
        assert not store.claim("W", "error", 99, due=False)
        assert not store.claim("W", "expired", 200, due=True)
        wait = store.wait("W")
        assert wait is not None and wait.state == "success" and wait.blocking is True
    _wait(store, "V")
    with store.transaction():
        assert store.next_deadline() == 100
        assert store.due_waits(100, 10) == [("V", "webview")]
        assert not store.claim("V", "success", 100, due=False)  # at the deadline: too late
        assert store.claim("V", "expired", 100, due=True)
        assert store.due_waits(1e9, 10) == []
        assert store.next_deadline() is None
        assert store.counts()["waits_expired"] == 1


def test_events_are_recorded_once(store: Store) -> None:
    with store.transaction():
        assert store.record_event("telegram:1", 0)
        assert not store.record_event("telegram:1", 1)
    with store.transaction():
        assert not store.record_event("telegram:1", 2)


def test_a_failing_savepoint_is_undone_alone(store: Store) -> None:
    with store.transaction():
        store.record_event("kept", 0)
        with pytest.raises(ValueError), store.savepoint():
            store.record_event("undone", 0)
            raise ValueError("this part fails")
        assert not store.record_event("kept", 0)
        assert store.record_event("undone", 0)


def test_outbox_keeps_order_per_conversation(store: Store) -> None:
    with store.transaction():
        a = store.conversation("web", "a", "KA", 0)
        b = store.conversation("web", "b", "KB", 0)
        store.save(a, Step(messages=[Message("a1"), Message("a2")]), 0)
        store.save(b, Step(messages=[Message("b1")]), 0)
        rows = store.pending_deliveries(0, 10)
        assert [r.message.text for r in rows] == ["a1", "a2", "b1"]
        store.mark_retry(rows[0].id, 50, "429")  # a1 waits for a retry
    with store.transaction():
        assert store.next_delivery_time(10) == 50
        assert [r.message.text for r in store.pending_deliveries(10, 10)] == ["b1"]
        assert [r.message.text for r in store.pending_deliveries(50, 10)] == ["a1", "a2", "b1"]
        assert [r.message.text for r in store.pending_by_channel(["tg"], 50, 10)] == []
        store.mark_all_sent([(rows[0].id, 51, None)])
        store.mark_failed(rows[1].id, "403: blocked \x00")
        store.mark_sent(rows[2].id, 52, "m1")
    with store.transaction():
        assert [d.message.text for d in store.web_history("a", 0)] == ["a1"]
        assert [d.message.text for d in store.web_history("a", 0, 1, newest=True)] == ["a1"]
        counts = store.counts()
        assert (counts["outbox_failed"], counts["outbox_sent"], counts["conversations"]) == (
            1, 2, 2)
        assert store.next_delivery_time(0) is None


def test_one_conversations_backlog_does_not_hide_the_others(store: Store) -> None:
    with store.transaction():
        stuck = store.conversation("tg", "stuck", "KS", 0)
        other = store.conversation("tg", "other", "KO", 0)
        store.save(stuck, Step(messages=[Message(f"s{i}") for i in range(30)]), 0)
        store.save(other, Step(messages=[Message("o1")]), 0)
        first = store.pending_deliveries(0, 1)[0]
        store.mark_retry(first.id, 100, "429")
    with store.transaction():
        assert [r.message.text for r in store.pending_deliveries(10, 5)] == ["o1"]


def test_a_backlog_being_delivered_or_over_its_share_leaves_room_for_the_others(
        store: Store) -> None:
    with store.transaction():
        busy = store.conversation("tg", "busy", "KB", 0)
        fresh = store.conversation("tg", "fresh", "KF", 0)
        store.save(busy, Step(messages=[Message(f"b{i}") for i in range(600)]), 0)
        store.save(fresh, Step(messages=[Message("f1")]), 0)
    with store.transaction():
        assert [r.message.text for r in store.pending_deliveries(0, 500, skip=[busy.id])] == [
            "f1"]
        window = store.pending_deliveries(0, 500, per_conversation=50)
        assert [r.message.text for r in window] == [f"b{i}" for i in range(50)] + ["f1"]
        assert store.next_delivery_time(0) is None  # all due: the outbox needs no timer
        store.mark_retry(window[0].id, 30, "429")
    with store.transaction():
        assert store.next_delivery_time(0) == 30
        assert [r.message.text for r in store.pending_by_channel(["tg"], 0, 500)] == ["f1"]


def test_an_early_status_waits_for_its_message(store: Store) -> None:
    with store.transaction():
        conv = store.conversation("whatsapp", "u", "K", 0)
        store.save(conv, Step(messages=[Message("a"), Message("b")]), 0)
        first, second = store.pending_deliveries(0, 10)
        assert not store.set_platform_status("SM1", "delivered", None, 10)
        assert not store.set_platform_status("SM1", "sent", None, 10)  # late: kept back
        store.mark_sent(first.id, 12, "SM1")  # applies "delivered"
        assert store.set_platform_status("SM1", "queued", None, 13)  # backwards: ignored
        assert store.set_platform_status("SM1", "read", None, 13)
        assert not store.set_platform_status("SM2", "failed", "63016", 11 + 86401)
        store.mark_sent(second.id, 11 + 86402, "SM2")
        assert store.set_platform_status("SM2", "delivered", None, 11 + 86403)  # final stays
        assert store.counts()["outbox_sent"] == 2
    with store.transaction():
        assert query(store, "SELECT platform_id, platform_status, error FROM outbox "
                     "ORDER BY id") == [("SM1", "read", None), ("SM2", "failed", "63016")]


def test_a_file_the_platform_could_not_send_goes_again_as_text_once(store: Store) -> None:
    photo = Message("Pick one", (Button("A", "p:1"),), media=Media("image", "https://x/p.png"))
    with store.transaction():
        conv = store.conversation("whatsapp", "u", "K", 0)
        store.save(conv, Step(messages=[photo, Message("plain")]), 0)
        first, second = store.pending_deliveries(0, 10)
        store.mark_sent(first.id, 1, "SM1")
        store.mark_sent(second.id, 1, "SM2")
        assert store.resend_without_media("SM0", "failed", "63019", 2) is None  # unknown yet
        added = store.resend_without_media("SM1", "failed", "63019", 2)
        assert added
        assert store.resend_without_media("SM1", "failed", "63019", 3) == 0  # repeated
        assert store.resend_without_media("SM1", "undelivered", "63019", 3) == 0
        assert store.resend_without_media("SM2", "failed", "63019", 3) == 0  # no file
        [again] = store.pending_deliveries(10, 10)
        assert (again.id, again.conversation_id, again.user_id) == (added, conv.id, "u")
        assert again.message == Message("Pick one\n\nhttps://x/p.png", (Button("A", "p:1"),))
    with store.transaction():
        assert query(store, "SELECT platform_status, error FROM outbox ORDER BY id") == [
            ("failed", "63019"), ("failed", "63019"), (None, None)]


def test_a_file_failure_before_the_sent_commit_sends_the_text_at_that_commit(
        store: Store) -> None:
    photo = Message("Pick one", media=Media("image", "https://x/p.png"))
    with store.transaction():
        conv = store.conversation("whatsapp", "u", "K", 0)
        store.save(conv, Step(messages=[photo, photo]), 0)
        first, second = store.pending_deliveries(0, 10)
        assert store.resend_without_media("SM1", "failed", "63019", 1) is None
        assert store.resend_without_media("SM1", "failed", "63019", 2) is None  # repeated
        assert not store.set_platform_status("SM2", "failed", "63016", 1)  # not the file
        store.mark_all_sent([(first.id, 3, "SM1"), (second.id, 3, "SM2")])
        [again] = store.pending_deliveries(10, 10)
        assert again.message == Message("Pick one\n\nhttps://x/p.png")
        assert store.counts()["outbox_sent"] == 2
    with store.transaction():
        assert query(store, "SELECT platform_status, error FROM outbox ORDER BY id") == [
            ("failed", "63019"), ("failed", "63016"), (None, None)]
        assert query(store, "SELECT count(*) FROM early_statuses") == [(0,)]


def test_pending_http_waits_are_found_again(store: Store) -> None:
    request = {"method": "GET", "url": "https://api.example/x", "timeout": 5}
    with store.transaction():
        conv = store.conversation("tg", "1", "K", 0)
        store.save(conv, Step(waits=[Wait("H", "http", "main", "call", 50, True, request)]), 0)
    with store.transaction():
        [wait] = store.pending_http_waits()
        assert (wait.id, wait.request, wait.conversation_id) == ("H", request, conv.id)


# -- PostgreSQL only ---------------------------------------------------------------------


@pytest.fixture
def pg_url(pg_database: str) -> str:
    empty(pg_database)
    return pg_database


def _config(tmp_path: Path, storage: str, flows: str = "") -> Any:
    path = tmp_path / "flowbot.toml"
    path.write_text(f"[storage]\n{storage}\n[channels.web]\nenabled = false\n" + (flows or PAY_FLOW))
    return load_config(path)


def test_migrations_run_once_under_an_advisory_lock(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS conversations, waits, outbox, events, "
                     "early_statuses, early_webhooks, settings, chat_aliases, "
                     "flowbot_migrations")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            PgStore(pg_url, pool_size=1).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]  # four servers starting
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version, name FROM flowbot_migrations").fetchall() == [
            (1, "initial"), (2, "removed_waits"), (3, "retention"),
            (4, "early_webhooks"), (5, "settings"), (6, "chat_aliases"),
            (7, "early_media_failures")]


def test_transitions_use_the_database_clock_not_the_nodes(pg_url: str, tmp_path: Path
                                                          ) -> None:
    """A node whose clock runs an hour fast neither fires a timer early nor, with a slow
    clock, lets a late callback win: the ledger takes now() from the database."""
    config = _config(tmp_path, f'url = "{pg_url}"')
    ledger = PgLedger(pg_url, config)
    try:
        with ledger.transaction():
            db_now = ledger.transaction_time(0)
            assert abs(db_now - time.time()) < 5
            ledger.inbound(Inbound("rec", "u1", "hi"), time.time() - 86400)  # a day slow
            [wait] = ledger.due_waits(1e12, 10)
        with ledger.transaction():
            wait_row = ledger.wait(wait[0])
            assert wait_row is not None
            assert db_now + 59 < wait_row.deadline < db_now + 61  # not a day early
            assert ledger.fire_due(time.time() + 3600).results == []  # an hour fast
        with ledger.transaction():  # the deadline moved into the past by the database only
            ledger.conn.execute("UPDATE waits SET deadline = deadline - 120")
        with ledger.transaction():
            late = ledger.webview_callback(wait[0], True, None, None, time.time() - 3600)
            assert late is not None and (late.state, late.won) == ("expired", False)
    finally:
        ledger.close()


def test_timeouts_are_set_in_every_transaction(pg_url: str) -> None:
    store = PgStore(pg_url, pool_size=1, prepared_statements=False)
    try:
        with store.transaction():
            assert store.conn.execute("SHOW statement_timeout").fetchone() == ("30s",)
            assert store.conn.execute(
                "SHOW idle_in_transaction_session_timeout").fetchone() == ("1min",)
            assert store.conn.prepare_threshold is None  # PgBouncer mode: nothing prepared
            for _ in range(10):
                store.record_event("e", 0)
            assert store.conn.execute(
                "SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        with store.pool.connection() as conn:  # SET LOCAL: nothing stays on the session
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    finally:
        store.close()


async def test_the_pg_worker_answers_503_when_the_database_refuses(pg_url: str) -> None:
    from bot.errors import StorageUnavailable
    from storage.pg_worker import PgWorker

    store = PgStore(pg_url, pool_size=2)
    worker = PgWorker(store)
    await worker.open()
    try:
        def broken(s: PgStore) -> None:
            s.conn.execute("SELECT * FROM no_such_table")

        with pytest.raises(StorageUnavailable) as info:
            await worker.run(broken)
        assert info.value.status == 503
        assert await worker.run(PgStore.record_event, "after", 0)  # the pool recovered
    finally:
        await worker.stop()
        store.close()


async def test_concurrent_first_messages_of_one_user_make_one_conversation(
        pg_url: str, tmp_path: Path) -> None:
    """INSERT … ON CONFLICT DO NOTHING, then the lock: 16 at once, one conversation."""
    from storage.pg_worker import PgWorker

    config = _config(tmp_path, f'url = "{pg_url}"\nworker = "thread"')
    worker = PgWorker(PgLedger(pg_url, config, caller_clock=True))
    await worker.open()
    try:
        results = await asyncio.gather(*(
            worker.run(PgLedger.inbound, Inbound("rec", "same", f"hi {i}"), 1000.0)
            for i in range(16)))
        assert all(r is not None for r in results)
        counts = await worker.run(PgStore.counts)
        assert counts["conversations"] == 1 and counts["waits_pending"] == 1
        # the first started the flow; the others met its pending wait, one at a time
        assert set(counts) == {"conversations", "waits_pending", "outbox_pending"}
        assert counts["outbox_pending"] == 16
    finally:
        await worker.stop()
        worker.store.close()


def test_storage_config_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.errors import ConfigError

    for storage, problem in [
        ('url = "postgresql://u:secret@db/flowbot"', "has a password"),
        ('url = "mysql://db/flowbot"', "must start with postgresql://"),
        ('url = "postgresql://db/x"\nurl_env = "DB_URL"', "either url or url_env"),
        ('url_env = "DB URL"', "must name an environment variable"),
        ('path = "a.db"\nurl_env = "DB_URL"', "is the SQLite file"),
    ]:
        with pytest.raises(ConfigError) as info:
            _config(tmp_path, storage)
        assert any(problem in e for e in info.value.errors), (storage, info.value.errors)
    config = _config(tmp_path, 'url_env = "FLOWBOT_TEST_DB_URL"')
    assert config.storage.backend == "postgresql"
    monkeypatch.delenv("FLOWBOT_TEST_DB_URL", raising=False)
    with pytest.raises(FlowbotError, match="FLOWBOT_TEST_DB_URL is not set"):
        backends.open_worker(config, {}, db_timer=False)
    monkeypatch.setenv("FLOWBOT_TEST_DB_URL", "postgresql://x@127.0.0.1:1/none")
    assert backends.storage_url(config) == "postgresql://x@127.0.0.1:1/none"
    assert _config(tmp_path, "").storage.backend == "sqlite"


def test_check_reads_stranded_conversations_from_postgresql(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    config = _config(tmp_path, f'url = "{pg_url}"')
    ledger = PgLedger(pg_url, config, caller_clock=True)
    try:
        with ledger.transaction():
            ledger.inbound(Inbound("rec", "u1", "hi"), 1000.0)  # waits at main/pay
    finally:
        ledger.close()
    renamed = (tmp_path / "flowbot.toml").read_text().replace("blocks.pay]", "blocks.pay2]")
    (tmp_path / "flowbot.toml").write_text(renamed.replace('start = "pay"', 'start = "pay2"'))
    main(["check", "--config", str(tmp_path / "flowbot.toml")])
    out = capsys.readouterr().out
    assert "on 127.0.0.1:5432: 1 conversation(s) stand at blocks" in out, out
    assert "main/pay (webview wait): 1" in out, out
