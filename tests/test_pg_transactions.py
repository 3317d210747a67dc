"""How the PostgreSQL worker sends a transaction (storage/postgres.py): a callback in two
round trips, its claim and step deferred to COMMIT behind guards in the database, and a
speculation that did not hold run again, not speculative, with nothing of it kept."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bot.config import load_config
from bot.errors import StaleState
from bot.ledger import Ledger
from bot.messages import Inbound
from bot.state import Step
from storage.pg_worker import ANSWER_GROUP, PgWorker
from storage.postgres import PgLedger, PgStore, learns_xid
from tests.postgres import empty
from tests.support import PAY_FLOW

FLOW = """
[storage]
url = "{url}"
[channels.web]
enabled = false
""" + PAY_FLOW


@pytest.fixture
def ledger(pg_database: str, tmp_path: Path) -> Iterator[PgLedger]:
    empty(pg_database)
    path = tmp_path / "flowbot.toml"
    path.write_text(FLOW.format(url=pg_database))
    led = PgLedger(pg_database, load_config(path))
    try:
        yield led
    finally:
        led.close()


def _waiting(ledger: PgLedger, user: str = "u1") -> str:
    """A conversation at the WebView block; its wait's id."""
    with ledger.transaction():
        out = ledger.inbound(Inbound("rec", user, "hi"), 0.0)
    assert out is not None and out.waits
    return out.waits[0].id


def test_a_callback_is_two_round_trips(ledger: PgLedger,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    wid = _waiting(ledger)
    trips: list[str] = []
    pipeline, execute = psycopg.Connection.pipeline, psycopg.Connection.execute

    def counted_pipeline(conn: Any) -> Any:
        trips.append("pipeline")
        return pipeline(conn)

    def counted_execute(conn: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if conn._pipeline is None:
            trips.append(str(query))
        return execute(conn, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "pipeline", counted_pipeline)
    monkeypatch.setattr(psycopg.Connection, "execute", counted_execute)
    store = ledger.for_thread()
    with store.pool.connection() as conn:
        store.begin(conn, wid, speculative=True,
                    xid=learns_xid(Ledger.webview_callback))
        out = Ledger.webview_callback(store, wid, True, {"ref": "R"}, None, 0.0)
        store.commit()
    monkeypatch.undo()
    assert out is not None and (out.state, out.won, out.messages) == ("success", True, 1)
    # BEGIN, the clock (and the transaction's id, for a COMMIT whose answer is lost), the
    # wait with its conversation locked; then the claim, the step, COMMIT: two pipelines,
    # nothing else
    assert trips == ["pipeline", "pipeline"], trips
    assert store.xid is not None and store.xid.isdigit()
    assert _counts(ledger) == {"success": 1, "outbox": 2}


def _counts(ledger: PgLedger) -> dict[str, int]:
    with ledger.transaction():
        rows = ledger.conn.execute(
            "SELECT (SELECT count(*) FROM waits WHERE state = 'success'), "
            "(SELECT count(*) FROM outbox)").fetchone()
    assert rows is not None
    return {"success": rows[0], "outbox": rows[1]}


async def test_a_claim_lost_after_the_read_runs_again_and_keeps_nothing(
        ledger: PgLedger, pg_database: str) -> None:
    """Between the speculative read (pending) and COMMIT another transaction ends the wait:
    the guarded claim fails in the database, COMMIT is skipped, and the job runs again,
    not speculative, and now loses the claim as it should (a second branch never runs)."""
    wid = _waiting(ledger)
    attempts: list[bool] = []

    def callback_racing_a_timer(store: PgLedger) -> Any:
        attempts.append(store._speculative)
        now = store.transaction_time(0.0)
        wait = store.wait(wid)  # pending; its conversation locked, the wait row not
        assert wait is not None
        conv = store.conversation_by_id(wait.conversation_id)
        with psycopg.connect(pg_database, autocommit=True) as other:
            other.execute("UPDATE waits SET state = 'expired' WHERE id = %s AND "
                          "state = 'pending'", (wid,))
        return store._resolve(wait, conv, "success", {"ref": "R"}, now, refusable=True)

    worker = PgWorker(ledger)
    await worker.open()
    try:
        out = await worker.run(callback_racing_a_timer)
    finally:
        await worker.stop()
    assert attempts == [True, False]
    assert out is not None and (out.state, out.won) == ("expired", False)
    assert _counts(ledger) == {"success": 0, "outbox": 1}  # only the first message


async def test_a_stale_conversation_is_caught_before_commit(ledger: PgLedger) -> None:
    """The version check, deferred to COMMIT, fails in the database; run again, not
    speculative, the job sees StaleState as it always did."""
    _waiting(ledger)
    attempts: list[bool] = []

    def stale_save(store: PgLedger) -> None:
        attempts.append(store._speculative)
        conv = store.conversation("rec", "u1", "K", 0.0)
        conv.version -= 1  # as if read before someone else's step
        store.save(conv, Step(), 0.0)

    worker = PgWorker(ledger)
    await worker.open()
    try:
        with pytest.raises(StaleState):
            await worker.run(stale_save)
    finally:
        await worker.stop()
    assert attempts == [True, False]


def test_a_savepoint_that_sent_nothing_costs_nothing(ledger: PgLedger) -> None:
    wid = _waiting(ledger)
    store = ledger.for_thread()
    with store.pool.connection() as conn:
        store.begin(conn, wid, speculative=True)
        assert store.wait(wid) is not None  # read with BEGIN: pending
        with store.savepoint():
            assert store.claim(wid, "success", store.db_time, due=False)  # deferred
        with pytest.raises(ValueError), store.savepoint():
            store.mark_webhook_ended(1, 0.0)
            raise ValueError("undone before it was sent")
        [(sql, _, _)] = store._deferred  # the claim; no SAVEPOINT, no RELEASE
        assert sql.startswith("WITH changed AS (UPDATE waits")
        store.rollback()


async def test_answers_go_back_together_while_jobs_are_queued(ledger: PgLedger) -> None:
    """Each send is a frame (and an event-loop wake-up) in the database process: under
    load answers are grouped, and every job still hears back, the last ones included."""
    from storage.worker import _answer_futures

    sends: list[int] = []

    def answer(ran: list[Any]) -> None:
        sends.append(len(ran))
        _answer_futures(ran)

    worker = PgWorker(ledger, answer=answer, threads=4)
    await worker.open()
    try:
        results = await asyncio.gather(*(worker.run(PgStore.record_event, f"e{i}", 0.0)
                                          for i in range(200)))
    finally:
        await worker.stop()
    assert results == [True] * 200
    assert sum(sends) == 200 and len(sends) < 200 and max(sends) <= ANSWER_GROUP


def test_an_inner_savepoint_sent_and_released_does_not_stop_the_outer_rollback(
        ledger: PgLedger) -> None:
    """The outer block raises after an inner one that sent its SAVEPOINT (a read) ended
    well: the outer block's own writes are undone too."""
    _waiting(ledger)
    with ledger.transaction():
        with pytest.raises(ValueError), ledger.savepoint():
            ledger.record_event("outer", 0.0)  # sent: the outer SAVEPOINT with it
            with ledger.savepoint():
                ledger.record_event("inner", 0.0)  # sent: the inner SAVEPOINT with it
            raise ValueError("undo both")
        assert ledger.record_event("outer", 0.0)  # not kept: new again
        assert ledger.record_event("inner", 0.0)
