"""Recovery paths, each caused for real and checked by what a user would see: a COMMIT that
fails in the database worker, a timer pass with one wait that cannot move, an outbox whose
pass, channel or mark-as-sent fails. (The database thread's faults are injected with a
store whose COMMIT errs, as a full disk or an I/O error makes SQLite's do.)"""

from __future__ import annotations

import asyncio
import math
import queue
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import storage.worker as worker_module
from bot import jobs
from bot.errors import StorageUnavailable
from bot.ledger import Ledger
from bot.state import Step, Wait
from bot.timers import Timer
from channels.base import Inbound
from storage.store import Store
from storage.worker import TIMER, DbWorker
from tests.support import Harness, RecordingChannel, db_rows, harness, query, write_config

GUARD = 10.0  # seconds; only a hung test waits this long


class FailingCommits(Store):
    """A store whose next `fail` COMMITs fail as SQLite's does on a full disk."""

    fail = 0

    def commit(self) -> None:
        if self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().commit()


def add_conversation(store: Store, user: str) -> int:
    return store.conversation("rec", user, f"K-{user}", 0).id


def users(store: Store) -> list[str]:
    return [u for (u,) in store.conn.execute("SELECT user_id FROM conversations ORDER BY user_id")]


async def test_a_failed_commit_fails_its_batch_rolls_back_and_the_worker_goes_on(
        tmp_path: Path) -> None:
    store = FailingCommits(tmp_path / "c.db")
    worker = DbWorker(store)
    worker.start()
    try:
        store.fail = 1
        results = await asyncio.gather(*(worker.run(add_conversation, u) for u in "abc"),
                                       return_exceptions=True)
        failed = [u for u, r in zip("abc", results, strict=True) if isinstance(r, Exception)]
        assert failed and failed[0] == "a"  # at least the first batch: its COMMIT failed
        for r in results:
            if isinstance(r, Exception):
                # answered 503 at the edge (storage unavailable), the cause kept
                assert isinstance(r, StorageUnavailable) and "disk is full" in str(r)
                assert isinstance(r.__cause__, sqlite3.OperationalError)
        # the next job commits: nothing of the failed batch is in the file, the rest is
        assert await worker.run(add_conversation, "d") > 0
        assert await worker.run(users) == sorted({*"abcd"} - set(failed))
    finally:
        await worker.stop()
        store.close()


class FakeTime:
    """storage.worker's `time` module, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


def add_wait(store: Store, wait_id: str, deadline: float) -> None:
    conv = store.conversation("rec", wait_id, f"K-{wait_id}", 0)
    store.save(conv, Step(waits=[Wait(wait_id, "webview", "main", "pay", deadline, True)]), 0)


def fire(store: Store, now: float) -> tuple[list[str], float | None]:
    fired = [wid for wid, _ in store.due_waits(now, 100)
             if store.claim(wid, "expired", now, due=True)]
    return fired, store.next_deadline()


def wait_state(store: Store, wait_id: str) -> str:
    wait = store.wait(wait_id)
    assert wait is not None
    return wait.state


async def test_a_timer_pass_whose_commit_fails_is_rolled_back_and_runs_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeTime()
    monkeypatch.setattr(worker_module, "time", clock)
    setup = Store(tmp_path / "t.db")
    with setup.transaction():
        add_wait(setup, "overdue", clock.now - 60)  # came due while the server was down
    setup.close()
    store = FailingCommits(tmp_path / "t.db")
    passes: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def answer(ran: list[Any]) -> None:
        for (_, _, reply), ok, value in ran:
            if reply == TIMER:
                passes.put((ok, value))
            else:
                worker_module._answer_futures([((None, None, reply), ok, value)])

    store.fail = 1
    worker = DbWorker(store, answer=answer, timer=fire)
    worker.start()
    try:
        ok, value = await asyncio.to_thread(passes.get, timeout=GUARD)
        assert not ok and "disk is full" in str(value)  # the start-up pass: COMMIT failed
        assert await worker.run(wait_state, "overdue") == "pending"  # rolled back
        assert worker._due == pytest.approx(clock.now + 1)  # re-armed: again in a second
        clock.now += 1
        await worker.run(wait_state, "overdue")  # anything wakes the worker; it fires first
        assert await asyncio.to_thread(passes.get, timeout=GUARD) == (True, ["overdue"])
        assert await worker.run(wait_state, "overdue") == "expired"
        assert worker._due == math.inf  # nothing left to wait for
    finally:
        await worker.stop()
        store.close()


# -- the timer: one wait that cannot move does not hold back the others ----------------------

FLOWS = """
[flows.main]
start = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "Pay"
expiration = 60
on_success = "paid"
on_error = "paid"
on_expired = "expired"
[flows.main.blocks.paid]
type = "end"
text = "paid"
[flows.main.blocks.expired]
type = "end"
text = "Expired."
"""


@pytest.fixture
async def h(tmp_path: Path) -> Any:
    async with harness(write_config(tmp_path, FLOWS)) as h:
        yield h


def wait_of(store: Store, user: str) -> tuple[str, str]:
    [(wait_id, state)] = store.conn.execute(
        "SELECT w.id, w.state FROM waits w JOIN conversations c ON c.id = w.conversation_id "
        "WHERE c.user_id = ?", (user,)).fetchall()
    return wait_id, state


async def test_one_failing_wait_is_rolled_back_alone_and_fires_once_it_can(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    for user in ("a", "b", "c"):
        await h.say("hi", user)
    bad, _ = await h.runtime.worker.run(wait_of, "b")
    real_fire = Ledger._fire

    def failing_fire(self: Ledger, wait_id: str, kind: str, now: float) -> Any:
        if wait_id == bad:
            self.conn.execute("UPDATE conversations SET block = 'half-done' WHERE user_id = 'b'")
            raise RuntimeError("the flow's expired branch cannot be built")
        return real_fire(self, wait_id, kind, now)

    monkeypatch.setattr(Ledger, "_fire", failing_fire)
    h.new_messages("a"), h.new_messages("b"), h.new_messages("c")
    h.clock.advance(60)
    with pytest.raises(RuntimeError, match="cannot be built"):  # the timer logs it, retries in 1 s
        await h.runtime.fire_due()
    await h.flush()
    assert [m.text for m in h.new_messages("a")] == ["Expired."]
    assert [m.text for m in h.new_messages("c")] == ["Expired."]
    assert h.new_messages("b") == []
    assert await h.runtime.worker.run(wait_of, "b") == (bad, "pending")
    assert await h.runtime.worker.run(query, "SELECT block FROM conversations WHERE user_id = 'b'"
                                      ) == [("pay",)]  # its half-done change was undone
    # the database process's timer comes back in a second, not at once (no busy loop)
    done, nxt = await h.runtime.worker.run(Ledger.timer_pass, h.clock.now())
    assert done.errors and nxt is not None and nxt >= h.clock.now() + 1
    monkeypatch.setattr(Ledger, "_fire", real_fire)  # the cause is fixed
    assert await h.advance(1) == 1
    assert [m.text for m in h.new_messages("b")] == ["Expired."]


# -- the outbox ------------------------------------------------------------------------------

HELLO = """
[flows.main]
start = "hello"
[flows.main.blocks.hello]
type = "end"
text = "Hello"
"""


async def test_a_channel_raising_an_unexpected_error_is_retried_and_delivered(
        tmp_path: Path) -> None:
    channel = RecordingChannel()
    channel.failures.append(RuntimeError("socket closed mid-write"))  # type: ignore[arg-type]
    async with harness(write_config(tmp_path, HELLO), channel) as h:
        assert await h.say("hi") == []
        [(state, attempts, error)] = await h.runtime.worker.run(
            query, "SELECT state, attempts, error FROM outbox")
        assert (state, attempts) == ("pending", 1) and "socket closed mid-write" in error
        h.clock.advance(1.3)  # past the first backoff (1 s ± 20 %)
        await h.flush()
        assert [m.text for m in channel.messages("u1")] == ["Hello"]
        assert await h.runtime.worker.run(query, "SELECT state, attempts FROM outbox") == [
            ("sent", 2)]


async def test_a_failed_mark_as_sent_leaves_the_row_to_send_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At least once: a message whose 'sent' mark did not commit is sent again, never lost,
    and the outbox goes on with the others."""
    real = jobs.mark_all_sent
    calls = 0

    def failing_once(store: Store, rows: list[tuple[int, float, str | None]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        real(store, rows)

    monkeypatch.setattr(jobs, "mark_all_sent", failing_once)
    channel = RecordingChannel()
    async with harness(write_config(tmp_path, HELLO), channel) as h:
        outbox_task = asyncio.create_task(h.outbox.run())  # the loop, as `serve` runs it
        try:
            await h.runtime.handle_inbound(Inbound("rec", "u1", "hi"))
            await h.runtime.handle_inbound(Inbound("rec", "u2", "hi"))
            deadline = asyncio.get_running_loop().time() + GUARD
            while await h.runtime.worker.run(
                    query, "SELECT count(*) FROM outbox WHERE state = 'sent'") != [(2,)]:
                assert asyncio.get_running_loop().time() < deadline, channel.sent
                h.outbox.notify()
                await asyncio.sleep(0.01)
        finally:
            outbox_task.cancel()
        assert calls >= 2
        texts = [(d.user_id, d.message.text) for d in channel.sent]
        assert set(texts) == {("u1", "Hello"), ("u2", "Hello")}
        assert len(texts) <= 3  # the one whose mark failed may have gone twice, none more


# -- the http block: a third party that is down, slow, or answers too late -------------------


def http_flow(url: str, timeout: float) -> str:
    return f"""
[flows.main]
start = "call"
[flows.main.blocks.call]
type = "http"
method = "POST"
url = "{url}"
timeout = {timeout}
status_variable = "code"
on_success = "ok"
on_failure = "bad"
[flows.main.blocks.ok]
type = "end"
text = "ok {{{{code}}}}"
[flows.main.blocks.bad]
type = "end"
text = "failed [{{{{code}}}}]"
"""


@asynccontextmanager
async def third_party(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> AsyncIterator[str]:
    """A third-party site on 127.0.0.1 answering with `handler`; yields its URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/crm"))
    finally:
        await server.close()


async def settled(h: Harness) -> None:
    """Until the http block's request task has finished (a safety cap, not a sleep)."""
    deadline = asyncio.get_running_loop().time() + GUARD
    while h.runtime._tasks:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)
    await h.flush()


async def test_http_block_network_error_takes_the_failure_branch(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/crm"
    async with harness(write_config(tmp_path, http_flow(closed, 5))) as h:
        await h.runtime.handle_inbound(Inbound("rec", "u1", "hi"))
        await settled(h)
        assert [m.text for m in h.new_messages("u1")] == ["failed [0]"]  # status 0: no answer came
        assert await h.runtime.worker.run(wait_of, "u1") == (ANY, "failure")


async def test_http_block_connection_dropped_mid_answer_takes_the_failure_branch(
        tmp_path: Path) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async with third_party(hang_up) as url, harness(write_config(tmp_path, http_flow(url, 5))) as h:
        await h.runtime.handle_inbound(Inbound("rec", "u1", "hi"))
        await settled(h)
        assert [m.text for m in h.new_messages("u1")] == ["failed [0]"]


async def test_http_block_timeout_takes_the_failure_branch(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await release.wait()  # never answers within the block's timeout
        return web.json_response({"late": True})

    async with third_party(stall) as url, harness(write_config(tmp_path, http_flow(url, 0.2))) as h:
        try:
            await h.runtime.handle_inbound(Inbound("rec", "u1", "hi"))
            await settled(h)  # aiohttp's own 0.2 s timeout ends the request
            assert [m.text for m in h.new_messages("u1")] == ["failed [0]"]
        finally:
            release.set()


async def test_an_http_answer_after_the_wait_timed_out_is_dropped(tmp_path: Path) -> None:
    """The block's wait expired first (the timer, at timeout + 5 s): the flow took the failure
    branch; the answer that comes afterwards changes nothing and says nothing."""
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.json_response({"plan": "gold"}, status=200)

    async with third_party(slow) as url, harness(write_config(tmp_path, http_flow(url, 60))) as h:
        await h.runtime.handle_inbound(Inbound("rec", "u1", "hi"))
        await asyncio.wait_for(arrived.wait(), GUARD)
        assert await h.advance(65) == 1  # the wait's deadline: timeout + 5 s
        assert [m.text for m in h.new_messages("u1")] == ["failed [0]"]
        before = await h.runtime.worker.run(db_rows)
        release.set()  # the answer arrives, late
        await settled(h)
        assert h.new_messages("u1") == []
        assert await h.runtime.worker.run(db_rows) == before


async def test_the_outbox_loop_goes_on_after_a_failed_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = jobs.pending_by_channel
    calls = 0

    def failing_twice(store: Store, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(store, *args)

    monkeypatch.setattr(jobs, "pending_by_channel", failing_twice)
    channel = RecordingChannel()
    async with harness(write_config(tmp_path, HELLO), channel) as h:
        await h.runtime.handle_inbound(Inbound("rec", "u1", "hi"))  # committed, not yet sent
        loop_task = asyncio.create_task(h.outbox.run())
        try:
            deadline = asyncio.get_running_loop().time() + GUARD
            while not channel.sent:  # each commit or finished delivery wakes the loop: so do we
                assert asyncio.get_running_loop().time() < deadline
                h.outbox.notify()
                await asyncio.sleep(0.01)
        finally:
            loop_task.cancel()
        assert calls >= 3
        assert caplog.text.count("outbox pass failed; trying again in 1 s") == 2
        assert [m.text for m in channel.messages("u1")] == ["Hello"]


# -- shutdown: the background loops end when cancelled, even as they are woken ---------------


@pytest.mark.parametrize("loop", ["outbox", "timer"])
async def test_a_loop_cancelled_as_it_is_woken_still_ends(tmp_path: Path, loop: str) -> None:
    """Python 3.11's asyncio.wait_for returns the result, swallowing the cancellation, when
    the awaited event is set in the same loop iteration as the cancel: the loop then ran on
    and shutdown waited for it forever (seen under coverage in test_fairness)."""
    async with harness(write_config(tmp_path, FLOWS)) as h:
        runner = Timer(h.runtime, h.clock) if loop == "timer" else h.outbox
        task = asyncio.create_task(runner.run())
        deadline = asyncio.get_running_loop().time() + GUARD
        while not runner._wake._waiters:  # type: ignore[attr-defined]  # asleep until woken
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        runner._wake.set()  # a commit wakes it...
        task.cancel()  # ...as the server shuts down
        done, _ = await asyncio.wait({task}, timeout=GUARD)
        assert task in done and task.cancelled()
