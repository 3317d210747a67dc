"""The SQLite store on real files: schema, claims, dedupe, outbox order, grouped commits."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from bot.errors import StaleState
from bot.state import Step, Wait
from channels.base import Message
from storage.schema import migrations
from storage.store import Store
from storage.worker import DbWorker


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "t.db")


def test_schema_is_migrated_once_and_uses_wal(tmp_path: Path) -> None:
    Store(tmp_path / "t.db").close()
    store = Store(tmp_path / "t.db")  # a second start applies nothing again
    applied = [r[0] for r in store.conn.execute("SELECT name FROM _sqlite_migrations")]
    assert applied == [m.name for m in migrations.pending(Database(memory=True))]
    assert applied[:2] == ["m001_initial", "m002_delivery_status"]
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plan = " ".join(str(r) for r in store.conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM waits WHERE state = 'pending' AND deadline <= 5 "
        "ORDER BY deadline"))
    assert "waits_due" in plan


def test_conversation_created_once_with_a_random_key(store: Store) -> None:
    with store.transaction():
        a = store.conversation("tg", "1", "KEY-A", 0)
        b = store.conversation("tg", "1", "KEY-B", 0)
        c = store.conversation("tg", "2", "KEY-C", 0)
    assert a.id == b.id != c.id
    assert b.key == "KEY-A"
    assert store.conversation_by_key("KEY-C") is not None
    assert store.conversation_by_key("nope") is None


def test_save_is_optimistic(store: Store) -> None:
    with store.transaction():
        conv = store.conversation("tg", "1", "K", 0)
        stale = store.conversation("tg", "1", "K", 0)
        store.save(conv, Step(), 1)
    with pytest.raises(StaleState), store.transaction():
        store.save(stale, Step(), 2)


def _wait(store: Store, wid: str = "W", deadline: float = 100) -> None:
    with store.transaction():
        conv = store.conversation("tg", "1", "K", 0)
        step = Step(waits=[Wait(wid, "webview", "main", "pay", deadline, True)])
        store.save(conv, step, 0)


def test_claim_is_exactly_once_and_respects_the_deadline(store: Store) -> None:
    _wait(store)
    with store.transaction():
        assert not store.claim("W", "expired", 99, due=True)  # not due yet
        assert store.claim("W", "success", 99, due=False)
        assert not store.claim("W", "error", 99, due=False)
        assert not store.claim("W", "expired", 200, due=True)
    assert store.wait("W") is not None and store.wait("W").state == "success"  # type: ignore[union-attr]
    _wait(store, "V")
    with store.transaction():
        assert not store.claim("V", "success", 100, due=False)  # at the deadline: too late
        assert store.claim("V", "expired", 100, due=True)
    assert store.due_waits(1e9, 10) == []


def test_events_are_recorded_once(store: Store) -> None:
    with store.transaction():
        assert store.record_event("telegram:1", 0)
        assert not store.record_event("telegram:1", 1)


def test_outbox_keeps_order_per_conversation(store: Store) -> None:
    with store.transaction():
        a = store.conversation("web", "a", "KA", 0)
        b = store.conversation("web", "b", "KB", 0)
        store.save(a, Step(messages=[Message("a1"), Message("a2")]), 0)
        store.save(b, Step(messages=[Message("b1")]), 0)
    rows = store.pending_deliveries(0, 10)
    assert [r.message.text for r in rows] == ["a1", "a2", "b1"]
    with store.transaction():
        store.mark_retry(rows[0].id, 50, "429")  # a1 waits for a retry
    assert [r.message.text for r in store.pending_deliveries(10, 10)] == ["b1"]
    assert [r.message.text for r in store.pending_deliveries(50, 10)] == ["a1", "a2", "b1"]
    with store.transaction():
        store.mark_sent(rows[0].id, 51, "m1")
        store.mark_failed(rows[1].id, "403: blocked")
    assert [d.message.text for d in store.web_history("a", 0)] == ["a1"]
    assert [d.message.text for d in store.web_history("a", 0, 1, newest=True)] == ["a1"]
    assert store.counts()["outbox_failed"] == 1


async def test_worker_groups_jobs_into_commits_and_isolates_failures(store: Store) -> None:
    worker = DbWorker(store)
    worker.start()
    try:
        def insert(i: int) -> int:
            store.record_event(f"e{i}", 0)
            if i == 7:
                raise ValueError("job 7 fails alone")
            return i

        results = await asyncio.gather(*(worker.run(lambda s, i=i: insert(i)) for i in range(50)),
                                       return_exceptions=True)
        assert [r for r in results if isinstance(r, ValueError)] == [results[7]]
        assert worker.jobs == 50 and worker.commits < 50
        seen = {r[0] for r in store.conn.execute("SELECT id FROM events")}
        assert "e7" not in seen and len(seen) == 49
    finally:
        await worker.stop()


def test_committed_rows_survive_a_fresh_connection(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = Store(path)
    _wait(store)
    # no close(): another connection, as after kill -9, sees the committed wait
    other = sqlite3.connect(path)
    assert other.execute("SELECT state FROM waits WHERE id = 'W'").fetchone() == ("pending",)


def test_one_conversations_backlog_does_not_hide_the_others(store: Store) -> None:
    with store.transaction():
        stuck = store.conversation("tg", "stuck", "KS", 0)
        other = store.conversation("tg", "other", "KO", 0)
        store.save(stuck, Step(messages=[Message(f"s{i}") for i in range(30)]), 0)
        store.save(other, Step(messages=[Message("o1")]), 0)
        first = store.pending_deliveries(0, 1)[0]
        store.mark_retry(first.id, 100, "429")
    assert [r.message.text for r in store.pending_deliveries(10, 5)] == ["o1"]


def test_an_early_status_waits_for_its_message_and_old_ones_are_dropped(
        store: Store) -> None:
    with store.transaction():
        conv = store.conversation("whatsapp", "u", "K", 0)
        store.save(conv, Step(messages=[Message("a"), Message("b")]), 0)
        first, second = store.pending_deliveries(0, 10)
        assert not store.set_platform_status("SM1", "failed", "63016", 10)
        assert not store.set_platform_status("SMold", "sent", None, 11)
        store.mark_sent(first.id, 12, "SM1")
        # a day later a status nobody claimed is dropped with the next unknown one
        assert not store.set_platform_status("SM2", "sent", None, 11 + 86401)
        store.mark_sent(second.id, 11 + 86402, "SM2")
    assert store.conn.execute(
        "SELECT platform_id, platform_status, error FROM outbox ORDER BY id").fetchall() == [
        ("SM1", "failed", "63016"), ("SM2", "sent", None)]
    assert store.conn.execute("SELECT count(*) FROM early_statuses").fetchone() == (0,)


def test_a_backlog_being_delivered_or_over_its_share_leaves_room_for_the_others(
        store: Store) -> None:
    """The outbox skips conversations it is delivering, and reads at most
    `per_conversation` rows of one: a fresh chat's row is in the window however long
    another chat's backlog is."""
    with store.transaction():
        busy = store.conversation("tg", "busy", "KB", 0)
        fresh = store.conversation("tg", "fresh", "KF", 0)
        store.save(busy, Step(messages=[Message(f"b{i}") for i in range(600)]), 0)
        store.save(fresh, Step(messages=[Message("f1")]), 0)
    assert [r.message.text for r in store.pending_deliveries(0, 500, skip=[busy.id])] == ["f1"]
    window = store.pending_deliveries(0, 500, per_conversation=50)
    assert [r.message.text for r in window] == [f"b{i}" for i in range(50)] + ["f1"]
    assert store.next_delivery_time(0) is None  # all due: the outbox needs no timer
    with store.transaction():
        store.mark_retry(window[0].id, 30, "429")
    assert store.next_delivery_time(0) == 30
