"""Outbox delivery and retries, dedupe, the http and delay blocks, and the timer loop."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aioresponses import aioresponses

from bot.clock import FakeClock
from bot.server import OUTBOX, RUNTIME, TIMER, build_app
from channels.base import Delivery, Inbound, SendError
from storage.store import Store
from tests.support import (
    RecordingChannel,
    conversation_key,
    db_rows,
    eventually,
    harness,
    query,
    write_config,
)

HELLO = """
[flows.main]
start = "hi"
[flows.main.blocks.hi]
type = "message"
text = "Hello {{user_name}}"
next = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Name?"
variable = "name"
"""


async def test_redelivered_event_is_handled_once(tmp_path: Path) -> None:
    async with harness(write_config(tmp_path, HELLO)) as h:
        first = await h.texts("hi", event_id="telegram:1", user_name="Ann")
        again = await h.texts("hi", event_id="telegram:1", user_name="Ann")
        assert (first, again) == (["Hello Ann", "Name?"], [])


async def test_committed_message_is_delivered_after_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path, HELLO)
    lost = RecordingChannel()
    async with harness(config, lost) as h:
        await h.runtime.handle_inbound(Inbound("rec", "u1", "hi", user_name="Ann"))
        # the process "dies" here: committed, never delivered
    assert lost.sent == []
    async with harness(config) as h:
        await h.flush()
        assert [m.text for m in h.channel.messages("u1")] == ["Hello Ann", "Name?"]


async def test_transient_failures_retry_in_order_and_permanent_ones_are_recorded(
        tmp_path: Path) -> None:
    channel = RecordingChannel(failures=[SendError("429", permanent=False, retry_after=7)])
    async with harness(write_config(tmp_path, HELLO), channel) as h:
        assert await h.texts("hi", user_name="Ann") == []  # first send failed
        await h.flush()
        assert h.new_messages("u1") == []  # not before retry_after, and Name? waits behind it
        h.clock.advance(7)
        await h.flush()
        assert [m.text for m in h.new_messages("u1")] == ["Hello Ann", "Name?"]

        assert await h.texts("Bob") == []  # the flow ends after the name
        channel.failures.append(SendError("bot was blocked", permanent=True, code="403"))
        assert await h.texts("again") == ["Name?"]  # "Hello" failed for good; order goes on
        counts = await h.runtime.worker.run(Store.counts)
        assert counts["outbox_failed"] == 1
        assert await h.runtime.worker.run(
            query, "SELECT error FROM outbox WHERE state = 'failed'") == [
            ("403: bot was blocked",)]
        # the flow state is unaffected by the failed send
        conv = await h.runtime.worker.run(Store.conversation, "rec", "u1", "x", 0)
        assert conv.variables["name"] == "Bob"


HTTP = """
[flows.main]
start = "call"
[flows.main.blocks.call]
type = "http"
method = "POST"
url = "https://crm.example/users/{{user_name}}?q={{last_message}}"
headers = { Authorization = "Bearer {{user_id}}" }
body = { key = "{{conversation_key}}", hook = "{{webhook_url}}", n = 3 }
timeout = 5
map = { plan = "data.items.0.plan", missing = "data.nope" }
status_variable = "code"
on_success = "ok"
on_failure = "bad"
[flows.main.blocks.ok]
type = "message"
text = "{{code}} {{plan}} [{{missing}}]"
[flows.main.blocks.bad]
type = "message"
text = "failed {{code}}"
"""


async def test_http_block_sends_templated_request_and_maps_the_answer(tmp_path: Path) -> None:
    async with harness(write_config(tmp_path, HTTP)) as h:
        with aioresponses(passthrough=["http://127.0.0.1"]) as mock:
            url = re.compile(r"^https://crm\.example/users/.*")
            mock.post(url, payload={"data": {"items": [{"plan": "gold"}]}}, status=201)
            await h.runtime.handle_inbound(Inbound("rec", "u1", "a&b", user_name="Ann Lee"))
            await eventually(lambda: h.runtime._tasks == set())
            await h.flush()
            (call,) = [(k, v) for k, v in mock.requests.items()]
            (method, sent_url), (request,) = call
            assert method == "POST"
            assert str(sent_url) == "https://crm.example/users/Ann%20Lee?q=a%26b"
            key = await h.runtime.worker.run(conversation_key, "rec", "u1")
            assert request.kwargs["json"] == {"key": key, "n": 3,
                                              "hook": f"http://bot.test/webhook/{key}"}
            assert request.kwargs["headers"] == {"Authorization": "Bearer u1"}
        assert [m.text for m in h.new_messages("u1")] == ["201 gold []"]


async def test_http_block_failure_branch(tmp_path: Path) -> None:
    async with harness(write_config(tmp_path, HTTP)) as h:
        with aioresponses(passthrough=["http://127.0.0.1"]) as mock:
            mock.post(re.compile(r"^https://crm\.example/.*"), status=503, body="down")
            await h.runtime.handle_inbound(Inbound("rec", "u1", "x", user_name="A"))
            await eventually(lambda: h.runtime._tasks == set())
            await h.flush()
        assert [m.text for m in h.new_messages("u1")] == ["failed 503"]


async def test_http_request_lost_in_a_crash_ends_in_failure(tmp_path: Path) -> None:
    config = write_config(tmp_path, HTTP)
    async with harness(config) as h:
        async def never(wait: object) -> None:  # the process dies before an answer comes
            pass

        h.runtime._http_request = never  # type: ignore[method-assign,assignment]
        await h.runtime.handle_inbound(Inbound("rec", "u1", "x", user_name="A"))
    async with harness(config) as h:
        h.clock.advance(11)
        assert await h.runtime.fire_due() == 1
        await h.flush()
        assert [m.text for m in h.new_messages("u1")] == ["failed 0"]


async def test_timer_loop_fires_delays_on_its_own(tmp_path: Path) -> None:
    """The real timer task (not fire_due by hand): it sleeps until the earliest deadline."""
    flows = """
        [flows.main]
        start = "d"
        [flows.main.blocks.d]
        type = "delay"
        seconds = 0.2
        next = "m"
        [flows.main.blocks.m]
        type = "message"
        text = "after the delay"
    """
    channel = RecordingChannel()
    app = build_app(write_config(tmp_path, flows), channel_factories={"rec": lambda c, r: channel})
    async with TestClient(TestServer(app)):
        await app[RUNTIME].handle_inbound(Inbound("rec", "u1", "go"))
        await eventually(lambda: channel.sent)
        assert [m.text for m in channel.messages("u1")] == ["after the delay"]
        assert app[TIMER] is not None and app[OUTBOX] is not None


async def test_overdue_waits_fire_at_start_up(tmp_path: Path) -> None:
    flows = """
        [flows.main]
        start = "hook"
        [flows.main.blocks.hook]
        type = "webhook"
        timeout = 10
        on_success = "ok"
        on_failure = "late"
        [flows.main.blocks.ok]
        type = "end"
        [flows.main.blocks.late]
        type = "message"
        text = "timed out while we were down"
    """
    config = write_config(tmp_path, flows)
    async with harness(config) as h:
        await h.say("go")
    # "down" for a minute; the next start's first timer pass fires it
    channel = RecordingChannel()
    clock = FakeClock(FakeClock().now() + 60)
    app = build_app(config, channel_factories={"rec": lambda c, r: channel}, clock=clock)
    async with TestClient(TestServer(app)):
        await eventually(lambda: channel.sent)
    assert [m.text for m in channel.messages("u1")] == ["timed out while we were down"]


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
async def test_operator_endpoints(tmp_path: Path, path: str) -> None:
    async with harness(write_config(tmp_path, HELLO)) as h:
        await h.say("hi")
        before, sent = await h.runtime.worker.run(db_rows), list(h.channel.sent)
        resp = await h.client.get(path)
        assert resp.status == 200
        text = await resp.text()
        await h.flush()
        assert h.channel.sent == sent  # an operator's probe says nothing to anyone
        assert await h.runtime.worker.run(db_rows) == before  # and writes nothing
        if path == "/healthz":
            assert (await resp.json())["status"] == "ok"
        if path == "/metrics":
            assert 'flowbot_outbox_messages_total{channel="rec",outcome="sent"} 2.0' in text
            assert 'flowbot_inbound_events_total{channel="rec",outcome="accepted"} 1.0' in text
            jobs = h.runtime.worker.jobs
            await h.client.get(path)
            assert h.runtime.worker.jobs == jobs  # a scrape never queues behind callbacks


async def test_unknown_route_is_a_json_404(tmp_path: Path) -> None:
    async with harness(write_config(tmp_path, HELLO)) as h:
        resp = await h.client.get("/nope")
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


async def test_one_channels_backlog_does_not_starve_another(tmp_path: Path) -> None:
    """Rows held back by one platform's rate limit must not hide another platform's rows."""

    class Throttled(RecordingChannel):
        async def send(self, delivery: Delivery) -> str | None:
            await asyncio.Event().wait()  # a send stuck behind the platform's rate limit
            return None

    slow, fast = Throttled("slow"), RecordingChannel("fast")
    app = build_app(write_config(tmp_path, HELLO),
                    channel_factories={"slow": lambda c, r: slow, "fast": lambda c, r: fast},
                    clock=FakeClock(), run_background=False)
    async with TestClient(TestServer(app)):
        runtime, outbox = app[RUNTIME], app[OUTBOX]
        for i in range(600):  # more due rows than one delivery pass reads
            await runtime.handle_inbound(Inbound("slow", f"s{i}", "hi"))
        await outbox.pass_once()
        await runtime.handle_inbound(Inbound("fast", "f1", "hi"))
        await outbox.pass_once()
        await eventually(lambda: len(fast.sent) == 2)
        assert [m.text for m in fast.messages("f1")] == ["Hello ", "Name?"]
        await outbox.close()
