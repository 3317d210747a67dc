"""A hypothesis state machine over create / callback / webhook / expire / restart.

Invariant, read from the database and the delivered messages (not from the model):
every wait ends in exactly one final state, after exactly one transition — each final
wait produced exactly one branch message, matching its state, and pending waits none.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bot import jobs
from bot.clock import FakeClock
from bot.server import OUTBOX, RUNTIME, build_app
from channels.base import Inbound
from tests.postgres import empty
from tests.support import RecordingChannel, conversation_key, query, write_config

FLOWS = """
[flows.main]
start = "menu"
[flows.main.blocks.menu]
type = "buttons"
text = "menu"
choices = [{ label = "web", next = "pay" }, { label = "hook", next = "hook" }]
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "pay"
expiration = 60
on_success = "ws"
on_error = "we"
on_expired = "wx"
[flows.main.blocks.hook]
type = "webhook"
timeout = 30
on_success = "hs"
on_failure = "hf"
[flows.main.blocks.ws]
type = "end"
text = "B:success"
[flows.main.blocks.we]
type = "end"
text = "B:error"
[flows.main.blocks.wx]
type = "end"
text = "B:expired"
[flows.main.blocks.hs]
type = "end"
text = "B:success"
[flows.main.blocks.hf]
type = "end"
text = "B:failure"
"""
USERS = ("ann", "bob", "cid")


class WaitMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        if url := os.environ.get("FLOWBOT_TEST_STORAGE"):  # PostgreSQL: each example starts empty
            empty(url)
        self.config = write_config(self.dir, FLOWS)
        self.clock = FakeClock()
        self.channel = RecordingChannel()  # kept across restarts: what users received
        self.loop = asyncio.new_event_loop()
        self.client: TestClient[Any, Any] | None = None
        self.open: dict[str, tuple[str, str]] = {}  # user → (kind, executionId or key)
        self.closed: list[str] = []  # executionIds of finished WebView waits
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _start(self) -> None:
        app = build_app(self.config, channel_factories={"rec": lambda c, r: self.channel},
                        clock=self.clock, run_background=False)
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        self.app = app

    async def _flush(self) -> None:
        await self.app[OUTBOX].drain()

    def teardown(self) -> None:
        if self.client is not None:
            self.run(self.client.close())
        self.loop.close()

    # -- rules ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.open) < len(USERS))
    @rule(data=st.data(), kind=st.sampled_from(["web", "hook"]))
    def create(self, data: st.DataObject, kind: str) -> None:
        user = data.draw(st.sampled_from([u for u in USERS if u not in self.open]))
        runtime = self.app[RUNTIME]

        async def go() -> str:
            await runtime.handle_inbound(Inbound("rec", user, "/start"))
            await runtime.handle_inbound(Inbound("rec", user, kind))
            await self._flush()
            if kind == "web":
                link = self.channel.messages(user)[-1].link
                assert link is not None
                return parse_qs(urlsplit(link.url).query)["executionId"][0]
            return await runtime.worker.run(conversation_key, "rec", user)

        self.open[user] = (kind, self.run(go()))

    @precondition(lambda self: any(k == "web" for k, _ in self.open.values()))
    @rule(data=st.data(), success=st.booleans())
    def callback(self, data: st.DataObject, success: bool) -> None:
        user = data.draw(st.sampled_from([u for u, (k, _) in self.open.items() if k == "web"]))
        eid = self.open[user][1]
        assert self.client is not None
        resp = self.run(self.client.post("/webview/callback",
                                         json={"executionId": eid, "success": success}))
        assert resp.status in (200, 410)
        self.run(self._flush())
        if resp.status == 200 or self._final(eid):
            self.open.pop(user)
            self.closed.append(eid)

    @precondition(lambda self: bool(self.closed))
    @rule(data=st.data())
    def late_callback(self, data: st.DataObject) -> None:
        eid = data.draw(st.sampled_from(self.closed))
        assert self.client is not None
        resp = self.run(self.client.post("/webview/callback",
                                         json={"executionId": eid, "success": True}))
        assert resp.status in (409, 410)

    @precondition(lambda self: any(k == "hook" for k, _ in self.open.values()))
    @rule(data=st.data())
    def webhook(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from([u for u, (k, _) in self.open.items() if k == "hook"]))
        assert self.client is not None
        resp = self.run(self.client.post("/webhook",
                                         json={"conversation_key": self.open[user][1]}))
        assert resp.status in (200, 409)
        self.run(self._flush())
        if resp.status == 200:
            self.open.pop(user)

    @rule(seconds=st.sampled_from([1, 29, 30, 31, 59, 60, 61]))
    def expire(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self.run(self.app[RUNTIME].fire_due())
        self.run(self._flush())
        for user, (kind, token) in list(self.open.items()):
            if self._pending_count(user) == 0:
                self.open.pop(user)
                if kind == "web":
                    self.closed.append(token)

    @rule()
    def restart(self) -> None:
        assert self.client is not None
        self.run(self.client.close())
        self.run(self._start())
        self.run(self.app[RUNTIME].fire_due())
        self.run(self._flush())

    # -- the invariant ---------------------------------------------------------------------

    def _db(self, fn: Any, *args: Any) -> Any:
        return self.run(self.app[RUNTIME].worker.run(fn, *args))

    def _final(self, eid: str) -> bool:
        wait = self._db(jobs.wait, eid)
        return wait is not None and wait.state != "pending"

    def _pending_count(self, user: str) -> int:
        [(count,)] = self._db(
            query, "SELECT count(*) FROM waits w JOIN conversations c "
            "ON c.id = w.conversation_id WHERE c.user_id = ? AND w.state = 'pending'", (user,))
        return int(count)

    @invariant()
    def each_wait_has_exactly_one_transition(self) -> None:
        self.run(self._flush())

        expected: dict[str, list[str]] = {u: [] for u in USERS}
        for user, state in self._db(
                query, "SELECT c.user_id, w.state FROM waits w JOIN conversations c "
                "ON c.id = w.conversation_id WHERE w.state NOT IN ('pending', 'cancelled')"):
            expected[user].append(state)
        for user in USERS:
            branches = [m.text.removeprefix("B:") for m in self.channel.messages(user)
                        if m.text.startswith("B:")]
            # one branch message per final wait, of the kind its state says (waits of one
            # user may share a timestamp, so compare as multisets)
            assert sorted(branches) == sorted(expected[user]), (user, branches, expected[user])
            assert self._pending_count(user) <= 1


@pytest.mark.usefixtures("both_backends")
def test_each_wait_ends_once(request: pytest.FixtureRequest) -> None:
    long = request.config.getoption("--long")
    machine = WaitMachine.TestCase
    machine.settings = settings(max_examples=300 if long else 25,
                                stateful_step_count=40 if long else 15, deadline=None)
    machine().runTest()
