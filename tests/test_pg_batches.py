"""Callbacks and http answers that reach the PostgreSQL worker together run as one
transaction (storage/pg_worker.py, `_run_batch`): each caller must hear what it would
have heard alone, and the conversation must end as it would have with the jobs run one
by one in the order they came."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aioresponses import aioresponses

from bot.config import Config, load_config
from bot.errors import StorageUnavailable
from bot.ledger import FirePass, Ledger, Outcome
from bot.messages import Inbound, Message
from storage import postgres
from storage.pg_worker import PgWorker
from storage.postgres import PgLedger
from tests.postgres import empty, queued
from tests.support import eventually, harness, write_config
from tests.test_pg_lost_commit import commit_link, rows, through

TWO_WEBVIEWS = """
[storage]
url = "{url}"
[channels.web]
enabled = false
[flows.main]
start = "form"
[flows.main.blocks.form]
type = "webview"
url = "https://form.example"
text = "Form"
blocking = false
response_variable = "form"
next = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "Pay"
expiration = 60
on_success = "paid"
on_error = "paid"
on_expired = "late"
[flows.main.blocks.paid]
type = "end"
text = "paid, size {{{{form.size}}}}"
[flows.main.blocks.late]
type = "end"
text = "expired"
"""


@pytest.fixture
def ledger(pg_database: str, tmp_path: Path) -> Iterator[PgLedger]:
    empty(pg_database)
    path = tmp_path / "flowbot.toml"
    path.write_text(TWO_WEBVIEWS.format(url=pg_database))
    led = PgLedger(pg_database, load_config(path))
    try:
        yield led
    finally:
        led.close()


def _callback(wid: str, data: Any = None) -> tuple[Any, tuple[Any, ...]]:
    return Ledger.webview_callback, (wid, True, data if data is not None else {}, None, 0.0)


def _told(ledger: PgLedger, user: str) -> list[str]:
    """What the user is told, in the order the outbox delivers it (by id)."""
    with ledger.transaction():
        return [Message.from_json(m).text for (m,) in ledger.conn.execute(
            "SELECT message FROM outbox WHERE user_id = %s ORDER BY id", (user,))]


async def test_a_batch_keeps_the_order_of_one_conversations_callbacks(
        ledger: PgLedger) -> None:
    """The optional form's data, then the payment, queued in that order: the payment's
    branch says the form's data, as it does when they run one by one. The batch takes one
    wait per conversation; it has to be the one asked for first, whatever order the
    database returns that conversation's waits in (here each order it may use puts the
    payment first: by id, and against where the rows lie, as a hash join does)."""
    with ledger.transaction():
        out = ledger.inbound(Inbound("rec", "u1", "hi"), 0.0)
    assert out is not None
    form, pay = out.waits
    with ledger.transaction():
        for old, new in ((form.id, "z-form"), (pay.id, "a-pay")):  # the rows: form, pay
            ledger.conn.execute("UPDATE waits SET id = %s WHERE id = %s", (new, old))
        ledger.conn.execute("UPDATE conversations SET wait_id = 'a-pay'")
    worker = PgWorker(ledger, threads=1)
    futures = queued(worker, [_callback("z-form", {"size": "L"}), _callback("a-pay")])
    worker.start()
    try:
        outs = await asyncio.wait_for(asyncio.gather(*futures), 30)
    finally:
        await worker.stop()
    assert [(o.state, o.won) for o in outs] == [("success", True)] * 2
    assert _told(ledger, "u1") == ["Form", "Pay", "paid, size L"]


async def test_a_timer_pass_reads_ahead_the_wait_it_fires_first(ledger: PgLedger) -> None:
    """The form and the payment fall due at the same moment: the pass fires them in its
    list's order, and the wait of that conversation it read ahead (with the conversation)
    must be the one it fires first; the other is read when its turn comes, after the
    first one's step. Read ahead the other way round, the second fire found the
    conversation as it was before the first one's step: it took the conversation for
    stranded, and the pass failed and left the form pending. (Without indexes, as the
    planner may choose for a large backlog, the two reads order a tie differently.)"""
    no_index = "options=-c%20enable_indexscan%3Doff%20-c%20enable_bitmapscan%3Doff"
    with closing(PgLedger(f"{ledger._url}?{no_index}", ledger.config)) as unindexed:
        await _fire_a_tie(unindexed)


async def _fire_a_tie(ledger: PgLedger) -> None:
    with ledger.transaction():
        out = ledger.inbound(Inbound("rec", "u1", "hi"), 0.0)
    assert out is not None
    form, pay = out.waits
    with ledger.transaction():
        for old, new in ((pay.id, "a-pay"), (form.id, "z-form")):  # the rows: pay, form
            ledger.conn.execute("UPDATE waits SET id = %s, deadline = 1 WHERE id = %s",
                                (new, old))
        ledger.conn.execute("UPDATE conversations SET wait_id = 'a-pay'")
    worker = PgWorker(ledger, threads=1)
    await worker.open()
    try:
        fired = await asyncio.wait_for(worker.run(Ledger.fire_due, 0.0), 30)
    finally:
        await worker.stop()
    assert not fired.errors
    assert sorted(r.state for r in fired.results) == ["expired", "expired"]
    with ledger.transaction():
        assert dict(ledger.conn.execute("SELECT id, state FROM waits")) == {
            "a-pay": "expired", "z-form": "expired"}
    assert _told(ledger, "u1") == ["Form", "Pay", "expired"]


async def test_a_timer_pass_that_waited_for_a_callbacks_conversation_does_not_fire_it(
        ledger: PgLedger, pg_database: str) -> None:
    """Every wait is due; a callback's transaction holds u2's conversation (the pass reads
    the others ahead, SKIP LOCKED, and waits for that one) and resolves u2's payment.
    The pass then must not fire it: one branch only, u2 hears no expiry, nothing fails."""
    convs = {}
    for user in ("u1", "u2", "u3"):
        with ledger.transaction():
            out = ledger.inbound(Inbound("rec", user, "hi"), 0.0)
        assert out is not None
        convs[user] = (out.conversation, out.waits[1].id)
    with ledger.transaction():
        ledger.conn.execute("UPDATE waits SET deadline = 1")
    worker = PgWorker(ledger, threads=1)
    await worker.open()
    try:
        with psycopg.connect(pg_database) as callback:
            cid, pay = convs["u2"]
            callback.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (cid,))
            passing = asyncio.ensure_future(worker.run(Ledger.fire_due, 0.0))
            await asyncio.sleep(0.5)
            assert not passing.done()  # waiting for u2's conversation
            callback.execute("UPDATE waits SET state = 'success' WHERE id = %s", (pay,))
            callback.execute("UPDATE conversations SET block = 'paid', wait_id = NULL, "
                             "version = version + 1 WHERE id = %s", (cid,))
        fired = await asyncio.wait_for(passing, 30)
    finally:
        await worker.stop()
    assert not fired.errors
    with ledger.transaction():
        states = dict(ledger.conn.execute("SELECT id, state FROM waits WHERE id = ANY(%s)",
                                          ([p for _, p in convs.values()],)))
    assert states == {convs["u1"][1]: "expired", pay: "success", convs["u3"][1]: "expired"}
    assert _told(ledger, "u2") == ["Form", "Pay"]
    assert _told(ledger, "u1") == _told(ledger, "u3") == ["Form", "Pay", "expired"]

@pytest.mark.parametrize("bad", [1, 2], ids=["sent by the next job", "sent with COMMIT"])
async def test_a_job_whose_writes_the_driver_cannot_send_fails_alone(
        ledger: PgLedger, bad: int) -> None:
    """One callback's data holds a lone surrogate (the edge refuses it; an http answer did
    not), which psycopg cannot encode when the batch's writes are sent: an error of the
    driver's, not the database's. Raised by the next job's read, which sent them, that
    job's caller got the error, the callback whose writes were lost heard `success`, and
    the batch committed without them; raised at COMMIT, it ended the worker's thread and
    no caller of the batch ever heard back. Each caller must hear about its own job, and
    only jobs that committed succeed."""
    wids = []
    for user in ("u1", "u2", "u3"):
        with ledger.transaction():
            out = ledger.inbound(Inbound("rec", user, "hi"), 0.0)
        assert out is not None
        wids.append(out.waits[0].id)  # the optional form
    worker = PgWorker(ledger, threads=1)
    sizes: list[str] = ["S", "M", "L"]
    sizes[bad] = "\ud800"
    futures = queued(worker, [_callback(w, {"size": s}) for w, s in zip(wids, sizes, strict=True)])
    worker.start()
    try:
        outs = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        assert isinstance(outs[bad], UnicodeEncodeError)  # as SQLite's driver raises it
        assert [(o.state, o.won) for o in outs if not isinstance(o, BaseException)
                ] == [("success", True)] * 2
        with ledger.transaction():
            assert dict(ledger.conn.execute("SELECT id, state FROM waits WHERE id = ANY(%s)",
                                            (wids,))) == {
                w: "pending" if i == bad else "success" for i, w in enumerate(wids)}
        fn, args = _callback(wids[bad], {"size": "XL"})
        again = await asyncio.wait_for(worker.run(fn, *args), 10)
        assert (again.state, again.won) == ("success", True)
    finally:
        await worker.stop()


HTTP_PLAN = """
[flows.main]
start = "call"
[flows.main.blocks.call]
type = "http"
method = "GET"
url = "https://crm.example/plan"
timeout = 5
map = { plan = "plan" }
on_success = "ok"
on_failure = "bad"
[flows.main.blocks.ok]
type = "message"
text = "plan {{plan}}"
[flows.main.blocks.bad]
type = "message"
text = "failed"
"""


@pytest.mark.usefixtures("both_backends")
async def test_an_http_answer_holding_a_lone_surrogate_is_kept(tmp_path: Path) -> None:
    """A third party's JSON may escape half of a UTF-16 pair ("\\ud800", as JavaScript
    cutting a string in two writes it), which UTF-8 cannot carry and neither database
    stores: the answer is kept, that character replaced by U+FFFD, and the flow goes on
    (it used to fail the job, leaving the wait to its backstop)."""
    async with harness(write_config(tmp_path, HTTP_PLAN)) as h:
        with aioresponses(passthrough=["http://127.0.0.1"]) as mock:
            mock.get("https://crm.example/plan",
                     body='{"plan": "gold \\ud800 \\ud83d\\ude00 \\u05e9\\u202e"}')
            await h.runtime.handle_inbound(Inbound("rec", "u1", "hi"))
            await eventually(lambda: h.runtime._tasks == set())
            await h.flush()
        assert [m.text for m in h.new_messages("u1")] == ["plan gold \ufffd \U0001f600 \u05e9\u202e"]


@pytest.mark.parametrize("lost", ["after COMMIT was applied", "before COMMIT reached it",
                                  "and the database with it"])
async def test_a_batch_whose_commit_answer_is_lost_is_applied_once(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch, lost: str) -> None:
    """The connection is lost at a batch's COMMIT (tests/test_pg_lost_commit.py's proxy):
    committed, every caller gets its 200; rolled back, the batch runs again; not to be
    learnt, every caller gets 503 and nothing runs again. Either way each wait is resolved
    once and each message written once."""
    empty(pg_database)
    monkeypatch.setattr(postgres, "POOL_TIMEOUT", 0.5)  # the database down: 503 sooner
    with commit_link() as db:
        url = through(pg_database, db.port)
        path = tmp_path / "flowbot.toml"
        path.write_text(TWO_WEBVIEWS.format(url=url))
        led = PgLedger(url, load_config(path))
        try:
            wids = []
            for user in ("u1", "u2", "u3"):
                with led.transaction():
                    out = led.inbound(Inbound("rec", user, "hi"), 0.0)
                assert out is not None
                wids.append(out.waits[1].id)  # the payment
            db.arm(b"UPDATE waits t SET state", applied=lost != "before COMMIT reached it",
                   then_down=lost == "and the database with it")  # the batch's claims
            worker = PgWorker(led, threads=1)
            futures = queued(worker, [_callback(w) for w in wids])
            worker.start()
            try:
                outs = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                              30)
            finally:
                await worker.stop()
            assert db.cuts == 1
            if lost == "and the database with it":
                assert all(isinstance(o, StorageUnavailable) for o in outs), outs
                assert worker.commits == 0
            else:
                assert [(o.state, o.won) for o in outs if isinstance(o, Outcome)
                        ] == [("success", True)] * 3
            assert rows(pg_database) == {"waits_success": 3, "waits_pending": 3,
                                         "outbox_pending": 9}
            db.up = True
            for user in ("u1", "u2", "u3"):
                assert _told(led, user) == ["Form", "Pay", "paid, size "]
        finally:
            led.close()


# -- the same jobs, one by one on SQLite and as one batch on PostgreSQL --------------------

MIXED = """
[bot]
max_variable_bytes = 1024
[channels.web]
enabled = false
[flows.main]
start = "form"
[flows.main.blocks.form]
type = "webview"
url = "https://form.example"
text = "Form"
blocking = false
response_variable = "form"
next = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "Pay"
expiration = 60
response_variable = "payment"
on_success = "paid"
on_error = "paid"
on_expired = "late"
[flows.main.blocks.paid]
type = "message"
text = "paid {{payment.ref}}, size {{form.size}}"
next = "more"
[flows.main.blocks.more]
type = "webview"
url = "https://pay.example/more"
text = "More"
expiration = 60
on_success = "late"
on_error = "late"
on_expired = "late"
[flows.main.blocks.late]
type = "end"
text = "end"
"""


def _replay(led: Ledger, run: Any) -> tuple[list[Any], dict[str, Any]]:
    """Seven users at the form and the payment; then `run(led, jobs)` (the callbacks, by
    the users' waits: f1 is u1's form, p1 u1's payment); what each job answered and
    what the database holds after, in terms that do not depend on the backend."""
    waits: dict[str, str] = {}
    for n in range(1, 8):
        with led.transaction():
            out = led.inbound(Inbound("rec", f"u{n}", "hi"), 0.0)
        assert out is not None
        waits[f"f{n}"], waits[f"p{n}"] = (w.id for w in out.waits)
    names = {wid: name for name, wid in waits.items()}
    big = {"ref": "x" * 2000}
    odd = {"ref": "nul\x00 rtl\u202e\u05d0 \U0001f600 '\"\\ ;--"}
    jobs = [
        _callback(waits["f1"], {"size": "L"}), _callback(waits["p1"], {"ref": "A"}),
        _callback(waits["p2"], big), _callback(waits["p2"], {"ref": "B"}),  # refused, then ok
        _callback(waits["p3"], {"ref": "C"}), _callback(waits["p3"], {"ref": "D"}),  # 409
        _callback(waits["p4"], odd), _callback("nope", {}),
        _callback(waits["f5"], big), _callback(waits["p5"], {"ref": "E"}),  # form refused
        (Ledger.webview_callback, (waits["p6"], False, {"ref": "F"}, None, 0.0)),
        (Ledger.http_answer, (waits["p7"], "success", {"ref": "G"}, 0.0)),
    ]
    answers = [(a.state, a.won, a.messages, bool(a.refused)) if isinstance(a, Outcome)
               else type(a).__name__ if isinstance(a, BaseException) else a
               for a in run(led, jobs)]
    with led.transaction():
        conn: Any = led.conn
        state = {
            "waits": sorted((names.get(w, "new"), s) for w, s in conn.execute(
                "SELECT id, state FROM waits")),
            "conversations": sorted((u, b, {k: v for k, v in json.loads(vs).items()
                                             if k not in ("conversation_key", "webhook_url")})
                                    for u, b, vs in conn.execute(
                "SELECT user_id, block, variables FROM conversations")),
            "told": [(u, Message.from_json(m).text) for u, m in conn.execute(
                "SELECT user_id, message FROM outbox ORDER BY id")],
        }
    state["told"].sort(key=lambda um: um[0])  # stable: each user's own order kept
    return answers, state


def _one_by_one(led: Ledger, jobs: list[tuple[Any, tuple[Any, ...]]]) -> list[Any]:
    answers: list[Any] = []
    for fn, args in jobs:
        try:
            with led.transaction():
                answers.append(fn(led, *args))
        except Exception as exc:
            answers.append(exc)
    return answers


def _batched(led: Ledger, jobs: list[tuple[Any, tuple[Any, ...]]], commits: list[int]
             ) -> list[Any]:
    """`jobs` queued before the worker's one thread starts: one batch (and those it leaves
    to run alone after it)."""
    assert isinstance(led, PgLedger)
    answers: dict[int, Any] = {}
    done = threading.Event()

    def answer(ran: list[tuple[Any, bool, Any]]) -> None:
        for (_, _, reply), _, value in ran:
            answers[reply] = value
        if len(answers) == len(jobs):
            done.set()

    worker = PgWorker(led, answer=answer, threads=1)
    for i, (fn, args) in enumerate(jobs):
        worker.submit(fn, args, i)
    worker.start()
    try:
        assert done.wait(30)
    finally:
        worker.join()
    commits.append(worker.commits)
    return [answers[i] for i in range(len(jobs))]


def _both(tmp_path: Path, pg_database: str, later: str = MIXED, fire: bool = False
          ) -> tuple[tuple[list[Any], dict[str, Any]], tuple[list[Any], dict[str, Any]], int]:
    """`_replay` on SQLite, the jobs one by one, and on PostgreSQL, the jobs queued together
    (`fire`: u1's two callbacks only, then every pending wait falls due and one timer pass
    runs); `later`: the flows the jobs run with (a config edited after the users got
    there). Both answers, and the PostgreSQL worker's commits."""
    from storage.store import SQLiteLedger

    empty(pg_database)

    def config(name: str, where: str, flows: str) -> Config:
        path = tmp_path / name
        path.write_text(f"[storage]\n{where}\n{flows}")
        return load_config(path)

    lite_at, pg_at = f'path = "{tmp_path / "lite.db"}"', f'url = "{pg_database}"'
    with closing(SQLiteLedger(tmp_path / "lite.db", config("l1.toml", lite_at, MIXED))) as lite, \
            closing(SQLiteLedger(tmp_path / "lite.db", config("l2.toml", lite_at, later))) as edited:
        expected = _replay(lite, lambda _, jobs: _then_fire(edited, _one_by_one, jobs, fire))
    commits: list[int] = []
    with closing(PgLedger(pg_database, config("p1.toml", pg_at, MIXED))) as led, \
            closing(PgLedger(pg_database, config("p2.toml", pg_at, later))) as edited_pg:
        got = _replay(led, lambda _, jobs: _then_fire(
            edited_pg, lambda led, jobs: _batched(led, jobs, commits), jobs, fire))
    return expected, got, commits[0]


def _then_fire(led: Ledger, run: Any, jobs: list[tuple[Any, tuple[Any, ...]]], fire: bool
               ) -> list[Any]:
    if not fire:
        answers: list[Any] = run(led, jobs)
        return answers
    run(led, jobs[:2])
    with led.transaction():
        # due in one pass, blocking waits first: a tie's order is either database's own
        led.conn.execute(  # type: ignore[attr-defined]
            "UPDATE waits SET deadline = CASE WHEN blocking THEN 1 ELSE 2 END "
            "WHERE state = 'pending'")
    [fired] = run(led, [(Ledger.fire_due, (100.0,))])
    assert isinstance(fired, FirePass), fired
    return [sorted((r.state, r.won, r.messages, r.removed) for r in fired.results),
            [type(e).__name__ for e in fired.errors], fired.more]


def test_a_batch_answers_and_writes_as_sqlite_one_by_one(
        tmp_path: Path, pg_database: str) -> None:
    """Two callbacks of one conversation, one refused for its size then sent again, a
    second copy (409), odd text, an unknown id, an error outcome and an http answer,
    queued together: PostgreSQL's batch gives each caller and the database what SQLite
    gives running them one by one."""
    expected, got, commits = _both(tmp_path, pg_database)
    # one transaction for seven of them; the five others alone after it: a second job of
    # the same conversation (u1, u2, u3, u5) and the unknown id
    assert commits == 6
    assert got[0] == expected[0]
    for part in expected[1]:
        assert got[1][part] == expected[1][part], part


def test_a_batch_on_stranded_conversations_answers_as_sqlite(
        tmp_path: Path, pg_database: str) -> None:
    """The same jobs after a config edit removed the payment block (every conversation
    stands there: stranded): callbacks for the removed block's waits get 410 and move
    their conversation, the form's move it first (`_move_first`), as on SQLite."""
    start = MIXED.index("[flows.main.blocks.pay]")
    edited = (MIXED[:start] + MIXED[MIXED.index("[flows.main.blocks.paid]"):]).replace(
        'next = "pay"', 'next = "paid"')
    expected, got, _ = _both(tmp_path, pg_database, edited)
    assert got[0] == expected[0]
    for part in expected[1]:
        assert got[1][part] == expected[1][part], part


@pytest.mark.parametrize("edited", [False, True], ids=["as it was", "payment block removed"])
def test_a_timer_pass_fires_as_sqlite(tmp_path: Path, pg_database: str, edited: bool) -> None:
    """Every wait falls due at once (each user's payment, then form; one user further on):
    PostgreSQL's pass, its waits read ahead with their conversations, fires and writes
    what SQLite's does; after a config edit too (stranded waits)."""
    start = MIXED.index("[flows.main.blocks.pay]")
    later = (MIXED[:start] + MIXED[MIXED.index("[flows.main.blocks.paid]"):]).replace(
        'next = "pay"', 'next = "paid"') if edited else MIXED
    expected, got, _ = _both(tmp_path, pg_database, later, fire=True)
    assert len(expected[0][0]) >= 13 and not expected[0][1]  # fired, no errors
    assert got[0] == expected[0]
    for part in expected[1]:
        assert got[1][part] == expected[1][part], part
