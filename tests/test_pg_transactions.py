"""How the PostgreSQL worker sends a transaction (storage/postgres.py): a callback in two
round trips, its claim and step deferred to COMMIT behind guards in the database, and a
speculation that did not hold run again, not speculative, with nothing of it kept."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bot.config import load_config
from bot.engine import Engine
from bot.errors import StaleState
from bot.ledger import Ledger
from bot.messages import Inbound
from bot.state import Step
from storage.pg_worker import ANSWER_GROUP, PgWorker
from storage.postgres import PgLedger, PgStore, learns_xid
from tests.postgres import empty, queued
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


class Sent:
    """What a block of code sends PostgreSQL (see `sent`): `trips`, one entry per round
    trip ("pipeline", or the first word of a statement sent alone), and `statements`, the
    first word of every statement."""

    def __init__(self) -> None:
        self.trips: list[str] = []
        self.statements: list[str] = []


@contextmanager
def sent() -> Iterator[Sent]:
    """Count what psycopg sends inside the block (see `Sent`)."""
    out = Sent()
    pipeline, execute = psycopg.Connection.pipeline, psycopg.Connection.execute

    def counted_pipeline(conn: Any) -> Any:
        out.trips.append("pipeline")
        return pipeline(conn)

    def counted_execute(conn: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        word = str(query).split()[0]
        out.statements.append(word)
        if conn._pipeline is None:
            out.trips.append(word)
        return execute(conn, query, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Connection, "pipeline", counted_pipeline)
        patch.setattr(psycopg.Connection, "execute", counted_execute)
        yield out



def test_a_callback_is_two_round_trips(ledger: PgLedger) -> None:
    wid = _waiting(ledger)
    store = ledger.for_thread()
    with sent() as counted, store.pool.connection() as conn:
        store.begin(conn, wid, speculative=True,
                    xid=learns_xid(Ledger.webview_callback))
        out = Ledger.webview_callback(store, wid, True, {"ref": "R"}, None, 0.0)
        store.commit()
    assert out is not None and (out.state, out.won, out.messages) == ("success", True, 1)
    # BEGIN, the clock (and the transaction's id, for a COMMIT whose answer is lost), the
    # wait with its conversation locked; then the claim, the step, COMMIT: two pipelines,
    # nothing else
    assert counted.trips == ["pipeline", "pipeline"], counted.trips
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


async def test_answers_go_back_together_while_jobs_arequeued(ledger: PgLedger) -> None:
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


# -- batches: callbacks that reach the worker together share one transaction ---------------


def _callback(wid: str, data: Any = None) -> tuple[Any, tuple[Any, ...]]:
    return Ledger.webview_callback, (wid, True, data if data is not None else {"ref": "R"},
                                     None, 0.0)


def _states(ledger: PgLedger) -> dict[str, str]:
    with ledger.transaction():
        return dict(ledger.conn.execute("SELECT id, state FROM waits"))


def test_a_batch_of_callbacks_is_two_round_trips(ledger: PgLedger) -> None:
    wids = [_waiting(ledger, f"u{i}") for i in range(5)]
    store = ledger.for_thread()
    with sent() as counted, store.pool.connection() as conn:
        assert store.begin_batch(conn, wids) == set(wids)
        outs = []
        for wid in wids:
            with store.savepoint():
                outs.append(Ledger.webview_callback(store, wid, True, {"ref": "R"}, None, 0.0))
        store.commit()
    assert [(o.state, o.won) for o in outs if o is not None] == [("success", True)] * 5
    # BEGIN, the clock and the five waits with their conversations locked; then the five
    # claims, steps and messages, each kind one statement over arrays, with COMMIT
    assert counted.trips == ["pipeline", "pipeline"], counted.trips
    assert counted.statements == ["BEGIN", "SELECT", "SELECT", "WITH", "WITH", "INSERT",
                                  "COMMIT"]
    assert _counts(ledger) == {"success": 5, "outbox": 10}


async def test_a_batch_answers_each_callback_as_alone_it_would(ledger: PgLedger) -> None:
    """Five callbacks, the same executionId again and an unknown one, queued together: the
    five commit in one transaction, the repeated one (its conversation is the batch's
    already) and the unknown one (no row) run alone after it."""
    wids = [_waiting(ledger, f"u{i}") for i in range(5)]
    worker = PgWorker(ledger, threads=1)
    futures = queued(worker, [*map(_callback, wids), _callback(wids[0]), _callback("nope")])
    worker.start()
    try:
        outs = await asyncio.gather(*futures)
    finally:
        await worker.stop()
    assert [(o.state, o.won) for o in outs[:6]] == [("success", True)] * 5 + [("success", False)]
    assert outs[6] is None
    assert (worker.commits, worker.jobs) == (3, 7)
    assert _counts(ledger) == {"success": 5, "outbox": 10}


async def test_a_job_failing_in_a_batch_is_undone_alone(
        ledger: PgLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    """A callback whose transition raises (a bug) after its claim was deferred: its caller
    gets the error and its wait stays pending; the batch's other callbacks commit."""
    wids = [_waiting(ledger, f"u{i}") for i in range(3)]
    on_wait = Engine.on_wait

    def failing(engine: Engine, conv: Any, wait: Any, *args: Any) -> Any:
        if wait.id == wids[1]:
            raise RuntimeError("a bug in one transition")
        return on_wait(engine, conv, wait, *args)

    monkeypatch.setattr(Engine, "on_wait", failing)
    worker = PgWorker(ledger, threads=1)
    futures = queued(worker, list(map(_callback, wids)))
    worker.start()
    try:
        outs = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await worker.stop()
    assert isinstance(outs[1], RuntimeError)
    assert [(o.state, o.won) for o in (outs[0], outs[2])] == [("success", True)] * 2
    assert _states(ledger) == {wids[0]: "success", wids[1]: "pending", wids[2]: "success"}
    assert worker.commits == 1
    assert _counts(ledger) == {"success": 2, "outbox": 5}


async def test_a_batch_that_fails_outside_its_jobs_runs_each_alone(
        ledger: PgLedger, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the batch's own path (here: reading the waits ahead) is logged and every
    callback runs alone and is answered; the worker's thread goes on."""
    wids = [_waiting(ledger, f"u{i}") for i in range(3)]

    def broken(store: PgStore, conn: Any, wait_ids: Any) -> set[str]:
        raise RuntimeError("a bug in begin_batch")

    monkeypatch.setattr(PgStore, "begin_batch", broken)
    worker = PgWorker(ledger, threads=1)
    futures = queued(worker, list(map(_callback, wids)))
    worker.start()
    try:
        outs = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert await worker.run(PgStore.record_event, "after", 0.0)  # the thread goes on
    finally:
        await worker.stop()
    assert [(o.state, o.won) for o in outs] == [("success", True)] * 3
    assert "a batch of 3 jobs failed" in caplog.text


async def test_a_batch_whose_speculation_fails_runs_each_job_alone(
        ledger: PgLedger, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another transaction expires one of the batch's waits after the batch read it as
    pending (the wait row is not locked, only its conversation): the guarded claim fails
    at COMMIT, nothing of the batch is kept, and each callback runs again alone — that one
    now hears `expired`, the others win."""
    wids = [_waiting(ledger, f"u{i}") for i in range(3)]
    wait = PgStore.wait
    raced: list[str] = []

    def racing(store: PgStore, wait_id: str) -> Any:
        if wait_id == wids[1] and not raced:  # read ahead by the batch: pending
            raced.append(wait_id)
            with psycopg.connect(pg_database, autocommit=True) as other:
                other.execute("UPDATE waits SET state = 'expired' WHERE id = %s", (wait_id,))
        return wait(store, wait_id)

    monkeypatch.setattr(PgStore, "wait", racing)
    worker = PgWorker(ledger, threads=1)
    futures = queued(worker, list(map(_callback, wids)))
    worker.start()
    try:
        outs = await asyncio.gather(*futures)
    finally:
        await worker.stop()
    assert [(o.state, o.won) for o in outs] == [("success", True), ("expired", False),
                                               ("success", True)]
    assert (worker.commits, worker.jobs) == (3, 3)  # each alone; the batch kept nothing
    assert _states(ledger) == {wids[0]: "success", wids[1]: "expired", wids[2]: "success"}
    assert _counts(ledger) == {"success": 2, "outbox": 5}


async def test_a_batch_does_not_wait_for_a_conversation_locked_elsewhere(
        ledger: PgLedger, pg_database: str) -> None:
    """One conversation is locked by another transaction: the batch takes the others
    (SKIP LOCKED: no batch ever waits holding locks, so none deadlocks) and commits them;
    that callback runs alone after, and waits for the lock as a lone job would."""
    wids = [_waiting(ledger, f"u{i}") for i in range(3)]
    with psycopg.connect(pg_database) as other:
        other.execute("SELECT 1 FROM conversations c JOIN waits w ON w.conversation_id = c.id "
                      "WHERE w.id = %s FOR UPDATE OF c", (wids[1],))
        worker = PgWorker(ledger, threads=1)
        futures = queued(worker, list(map(_callback, wids)))
        worker.start()
        try:
            done = await asyncio.wait_for(asyncio.gather(futures[0], futures[2]), 30)
            assert [(o.state, o.won) for o in done] == [("success", True)] * 2
            assert not futures[1].done()  # still waiting for the other transaction
            other.commit()
            out = await asyncio.wait_for(futures[1], 30)
        finally:
            await worker.stop()
    assert (out.state, out.won) == ("success", True)
    assert worker.commits == 2
    assert _counts(ledger) == {"success": 3, "outbox": 6}


def test_a_timer_pass_costs_the_same_round_trips_for_one_wait_or_many(
        ledger: PgLedger) -> None:
    """The due waits are read with their conversations locked in the round trip that
    lists them, so firing each costs none: a pass of one and a pass of six make the same
    round trips: BEGIN with the clock, the expired early webhooks (the clock's `now`
    decides them), the due waits, the writes with the next deadline, COMMIT."""
    def one_pass(users: list[str]) -> tuple[list[str], list[Any]]:
        wids = [_waiting(ledger, user) for user in users]
        with ledger.transaction():
            ledger.conn.execute("UPDATE waits SET deadline = 0 WHERE id = ANY(%s)", (wids,))
        store = ledger.for_thread()
        with sent() as counted, store.pool.connection() as conn:
            store.begin(conn, speculative=True, xid=True)
            fired = Ledger.fire_due(store, 0.0)
            store.commit()
        assert not fired.errors
        return counted.trips, fired.results

    one, results = one_pass(["a"])
    assert [r.state for r in results] == ["expired"]
    many, results = one_pass([f"u{i}" for i in range(6)])
    assert [r.state for r in results] == ["expired"] * 6
    assert many == one == ["pipeline", "DELETE", "pipeline", "pipeline", "COMMIT"], many
    assert _counts(ledger)["outbox"] == 14  # "Pay" and "late" for each of the seven
