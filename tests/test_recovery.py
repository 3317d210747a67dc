"""Recovery paths, each caused for real and checked by what a user would see: a COMMIT that
fails in the database worker, a timer pass with one wait that cannot move, an outbox whose
pass, channel or mark-as-sent fails. (The database thread's faults are injected with a
store whose COMMIT errs, as a full disk or an I/O error makes SQLite's do.)"""

from __future__ import annotations

import asyncio
import math
import queue
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import storage.worker as worker_module
from bot import jobs
from bot.ledger import Ledger
from bot.state import Step, Wait
from channels.base import Inbound
from storage.store import Store
from storage.worker import TIMER, DbWorker
from tests.support import Harness, RecordingChannel, harness, query, write_config

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
                assert isinstance(r, sqlite3.OperationalError) and "disk is full" in str(r)
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
