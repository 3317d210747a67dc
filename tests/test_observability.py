"""What an operator sees: the log lines of a conversation, and /metrics as Prometheus
parses it."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot import logs
from bot.flow import WAIT_KINDS
from channels.base import SendError
from storage.store import Store
from tests.support import Harness, conversation_key, harness, query, write_config

FLOW = """
[flows.main]
start = "hi"
[flows.main.blocks.hi]
type = "message"
text = "Hi"
next = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Pay here"
button = "Pay"
expiration = 60
on_success = "ship"
on_error = "bye"
on_expired = "bye"
[flows.main.blocks.ship]
type = "webhook"
text = "Waiting for the shop"
timeout = 30
on_success = "bye"
on_failure = "bye"
[flows.main.blocks.bye]
type = "end"
text = "Bye"
"""


def execution_id(h: Harness, user: str) -> str:
    link = next(m.link for m in h.channel.messages(user) if m.link is not None)
    return parse_qs(urlsplit(link.url).query)["executionId"][0]


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name in (logs.EVENTS, "flowbot.refused", "bot.outbox")]


async def scrape(h: Harness) -> dict[str, float]:
    resp = await h.client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    assert "# HELP flowbot_pending_waits " in text
    assert "# TYPE flowbot_webview_callback_seconds histogram" in text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def test_a_conversation_in_the_log(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with harness(write_config(tmp_path, FLOW)) as h:
        await h.say("hi", "ann", event_id="rec:1")
        await h.say("hi again", "ann", event_id="rec:1")  # a platform's redelivery
        eid = execution_id(h, "ann")
        status, _ = await h.post("/webview/callback", json={"executionId": eid, "success": True})
        assert status == 200
        key = await h.runtime.worker.run(conversation_key, "rec", "ann")
        status, _ = await h.post("/webhook", json={"conversation_key": key, "order": 1})
        assert status == 200
        status, _ = await h.post("/webview/callback", json={"executionId": eid, "success": True})
        assert status == 409
        status, _ = await h.post("/webview/callback",
                                 json={"executionId": "nope" * 6, "success": True})
        assert status == 404
        await h.say("hi", "bob")
        h.channel.failures.append(SendError("429: slow down", permanent=False, retry_after=2))
        await h.advance(61)  # bob's page expires; the first send of its answer fails
        await h.advance(3)
        conv_ann, conv_bob = 1, 2
    got = lines(caplog)
    expected = [
        f"conv={conv_ann} rec message: (start) → pay (2 message(s) to send)",
        f"conv={conv_ann} rec wait opened: webview at pay, due in 60 s (id {eid[:6]}…)",
        f"conv={conv_ann} rec sent: message 1",
        f"conv={conv_ann} rec sent: message 2",
        "conv=- rec duplicate: a redelivered event, ignored",
        f"conv={conv_ann} rec wait resolved: webview at pay → success; pay → ship",
        f"conv={conv_ann} rec wait opened: webhook at ship, due in 30 s (id ",
        f"conv={conv_ann} rec sent: message 3",
        f"conv={conv_ann} rec wait resolved: webhook at ship → success; ship → (end)",
        f"conv={conv_ann} rec sent: message 4",
        f"conv={conv_ann} callback refused: already_resolved (executionId {eid[:6]}…)",
        "conv=- callback refused: not_found (executionId nopeno…)",
        f"conv={conv_bob} rec message: (start) → pay (2 message(s) to send)",
        f"conv={conv_bob} rec wait opened: webview at pay, due in 60 s (id ",
        f"conv={conv_bob} rec sent: message 5",
        f"conv={conv_bob} rec sent: message 6",
        f"conv={conv_bob} rec wait expired: webview at pay → expired; pay → (end)",
        f"conv={conv_bob} rec retry: message 7: 429: slow down; again in 2.0 s",
        f"conv={conv_bob} rec sent: message 7 on attempt 2",
    ]
    assert len(got) == len(expected), "\n".join(got)
    for line, want in zip(got, expected, strict=True):
        assert line.startswith(want), (line, want)
    text = "\n".join(got)
    assert eid not in text  # never a whole executionId
    assert key not in text  # nor a conversation key


async def test_metrics_parse_and_count_what_happened(tmp_path: Path) -> None:
    async with harness(write_config(tmp_path, FLOW)) as h:
        await h.say("hi", "ann")
        await h.say("hi", "bob")
        await h.say("hi", "cy")
        m = await scrape(h)
        assert m["flowbot_pending_waits{kind=webview}"] == 3
        assert m["flowbot_inbound_events_total{channel=rec,outcome=accepted}"] == 3
        eid = execution_id(h, "ann")
        await h.post("/webview/callback", json={"executionId": eid, "success": True})
        await h.post("/webview/callback", json={"executionId": eid, "success": True})
        key = await h.runtime.worker.run(conversation_key, "rec", "ann")
        await h.post("/webhook", json={"conversation_key": key})
        await h.post("/webhook", json={"conversation_key": "x" * 24})
        await h.advance(61)
        m = await scrape(h)
    assert m["flowbot_pending_waits{kind=webview}"] == 0
    assert m["flowbot_pending_waits{kind=webhook}"] == 0
    assert m["flowbot_waits_opened_total{kind=webview}"] == 3
    assert m["flowbot_waits_resolved_total{kind=webview,outcome=success}"] == 1
    assert m["flowbot_waits_resolved_total{kind=webview,outcome=expired}"] == 2
    assert m["flowbot_webview_callbacks_total{outcome=success}"] == 1
    assert m["flowbot_webview_callbacks_total{outcome=already_resolved}"] == 1
    assert m["flowbot_webhooks_total{outcome=accepted}"] == 1
    assert m["flowbot_webhooks_total{outcome=not_found}"] == 1
    assert m["flowbot_webview_callback_seconds_count"] == 2
    assert m["flowbot_webhook_seconds_count"] == 2
    assert m["flowbot_timer_lateness_seconds_count"] == 2
    assert m["flowbot_transition_seconds_count{event=message}"] == 3
    assert m["flowbot_outbox_messages_total{channel=rec,outcome=sent}"] == 6 + 2 + 2
    assert m["flowbot_outbox_delivery_seconds_count{channel=rec}"] == 10
    assert m["process_resident_memory_bytes"] > 0
    assert m["flowbot_events_total{kind=timer_expired}"] == 2  # the runtime's other tallies


def pending_rows(store: Store) -> dict[str, int]:
    """A database job: pending waits by kind, as the table has them."""
    return dict(query(store, "SELECT kind, count(*) FROM waits WHERE state = 'pending' "
                             "GROUP BY kind"))


async def gauges(h: Harness) -> dict[str, float]:
    """The pending gauges of one scrape, after checking they are what the table holds."""
    m = await scrape(h)
    got = {k: m[f"flowbot_pending_waits{{kind={k}}}"] for k in WAIT_KINDS}
    assert got == {k: (await h.runtime.worker.run(pending_rows)).get(k, 0) for k in WAIT_KINDS}
    return got


@pytest.mark.usefixtures("both_workers", "both_backends")
async def test_pending_gauges_are_what_the_database_holds(tmp_path: Path) -> None:
    """Whatever ended a wait: start-up (stranded waits ended, their users moved on), a
    message to a conversation stranded since, a restart word there, expiries, and a row
    another node changed. (Kept from transitions, the gauges missed every removed wait.)"""
    config = write_config(tmp_path, FLOW)
    async with harness(config) as h:
        for user in ("a", "b", "c", "d"):
            await h.say("hi", user)
        await h.post("/webview/callback", json={"executionId": execution_id(h, "a"),
                                                "success": True})
        assert await gauges(h) == {"webview": 3, "webhook": 1, "delay": 0, "http": 0}
    # the admin renames `ship`: a's Webhook wait is stranded, ended at start-up, and a is
    # moved to the start (a new WebView wait)
    config = write_config(tmp_path, FLOW.replace("blocks.ship]", "blocks.ship_v2]")
                          .replace('on_success = "ship"', 'on_success = "ship_v2"'))
    async with harness(config) as h:
        assert await gauges(h) == {"webview": 4, "webhook": 0, "delay": 0, "http": 0}
        # b and c stranded while running (their waits point at a block a node with an
        # older config knew): a message moves b on, a restart word restarts c
        for user in ("b", "c"):
            await h.runtime.worker.run(query, "UPDATE waits SET block = 'old' WHERE id = "
                                       "(SELECT wait_id FROM conversations WHERE user_id = ?)",
                                       (user,))
            await h.runtime.worker.run(query, "UPDATE conversations SET block = 'old' "
                                       "WHERE user_id = ?", (user,))
        await h.say("hello", "b")
        await h.say("/start", "c")
        assert await gauges(h) == {"webview": 4, "webhook": 0, "delay": 0, "http": 0}
        m = await scrape(h)  # and the counters say how each ended
        assert m["flowbot_waits_resolved_total{kind=webhook,outcome=removed}"] == 1  # a's
        assert m["flowbot_waits_resolved_total{kind=webview,outcome=removed}"] == 1  # b's
        assert m["flowbot_waits_resolved_total{kind=webview,outcome=cancelled}"] == 1  # c's
        # another node resolved d's wait
        await h.runtime.worker.run(query, "UPDATE waits SET state = 'success' WHERE id = "
                                   "(SELECT wait_id FROM conversations WHERE user_id = 'd')")
        assert await gauges(h) == {"webview": 3, "webhook": 0, "delay": 0, "http": 0}
        await h.advance(61)  # the rest expire
        assert await gauges(h) == dict.fromkeys(WAIT_KINDS, 0)


def test_json_lines_and_rate_limited_errors() -> None:
    stream = io.StringIO()
    logs.setup("info", "json", secrets=["s3cret-token-value"], stream=stream)
    try:
        logs.event("wait opened", 7, "web", "webview at %s", "pay")
        bad = logging.getLogger("flowbot.test")
        for _ in range(50):
            bad.error("delivery to %s failed with s3cret-token-value", "telegram")
    finally:
        logging.getLogger().handlers.clear()
    rows = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert rows[0]["msg"] == "conv=7 web wait opened: webview at pay"
    assert (rows[0]["conv"], rows[0]["channel"], rows[0]["event"]) == (7, "web", "wait opened")
    errors = [r for r in rows if r["logger"] == "flowbot.test"]
    assert len(errors) == 5  # the rest of the burst is held back
    assert all("s3cret-token-value" not in r["msg"] and "[secret]" in r["msg"] for r in errors)
