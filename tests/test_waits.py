"""WebView callbacks and webhooks through a real aiohttp server: every status code,
every branch, signatures, and callback-vs-timer races."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from standardwebhooks.webhooks import Webhook

from bot import jobs
from bot.errors import FlowbotError
from tests.support import Harness, conversation_key, db_rows, harness, write_config

pytestmark = pytest.mark.usefixtures("both_workers", "both_backends")

FLOWS = """
[flows.main]
start = "menu"

[flows.main.blocks.menu]
type = "buttons"
text = "Pick"
choices = [{ label = "pay", next = "pay" }, { label = "hook", next = "hook" },
           { label = "signed", next = "signed" }]

[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout?shop=1"
text = "Pay here"
button = "Pay"
input_variables = ["last_message"]
expiration = 60
pending_message = "Still waiting for the payment."
response_variable = "payment"
on_success = "paid"
on_error = "failed"
on_expired = "expired"

[flows.main.blocks.paid]
type = "message"
text = "Paid: {{payment.ref}}"

[flows.main.blocks.failed]
type = "message"
text = "Failed: {{payment.reason}}"

[flows.main.blocks.expired]
type = "message"
text = "Expired."

[flows.main.blocks.hook]
type = "webhook"
text = "Waiting for {{conversation_key}}"
timeout = 30
map = { status = "order.status", item = "items.0.id", absent = "nope" }
pending_message = "Still waiting for the webhook."
on_success = "hooked"
on_failure = "timeout"

[flows.main.blocks.signed]
type = "webhook"
timeout = 30
secret_env = "HOOK_SECRET"
map = { status = "status" }
on_success = "hooked"
on_failure = "timeout"

[flows.main.blocks.hooked]
type = "message"
text = "Webhook: {{status}} {{item}} [{{absent}}]"

[flows.main.blocks.timeout]
type = "message"
text = "No webhook."
"""

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture
async def h(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # set before the server starts: a database process, like any process, reads the
    # environment it was started with (and `serve` refuses a signed block without it)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    async with harness(write_config(tmp_path, FLOWS)) as h:
        yield h


async def open_webview(h: Harness, user: str = "u1") -> str:
    await h.say("hi", user)
    msgs = await h.say("pay", user)
    assert msgs[0].text == "Pay here"
    assert msgs[0].link is not None
    return parse_qs(urlsplit(msgs[0].link.url).query)["executionId"][0]


async def open_webhook(h: Harness, user: str = "u1", which: str = "hook") -> str:
    await h.say("hi", user)
    await h.say(which, user)
    return await h.runtime.worker.run(conversation_key, "rec", user)


async def state_of(h: Harness, wait_id: str) -> str:
    wait = await h.runtime.worker.run(jobs.wait, wait_id)
    assert wait is not None
    return wait.state


# -- WebView ----------------------------------------------------------------------------

async def test_link_carries_execution_id_and_inputs(h: Harness) -> None:
    eid = await open_webview(h)
    assert len(eid) >= 22  # ≥ 128 bits, URL-safe
    link = h.channel.messages("u1")[-1].link
    assert link is not None
    assert link.url == f"https://pay.example/checkout?shop=1&executionId={eid}&last_message=pay"


async def test_pending_message_while_waiting(h: Harness) -> None:
    await open_webview(h)
    assert [m.text for m in await h.say("hello?")] == ["Still waiting for the payment."]
    assert [m.text for m in await h.say("", payload="x:0")] == ["Still waiting for the payment."]


@pytest.mark.parametrize(("success", "data", "said"), [
    (True, {"ref": "R-1"}, "Paid: R-1"),
    (False, {"reason": "declined"}, "Failed: declined"),
])
async def test_callback_branches(h: Harness, success: bool, data: dict[str, str],
                                 said: str) -> None:
    eid = await open_webview(h)
    status, body = await h.post("/webview/callback",
                                json={"executionId": eid, "success": success, "data": data})
    outcome = "success" if success else "error"
    assert (status, body) == (200, {"status": "ok", "outcome": outcome})
    assert [m.text for m in h.new_messages("u1")] == [said]
    assert await state_of(h, eid) == outcome
    # a second callback is refused and names the outcome it had
    status, body = await h.post("/webview/callback",
                                json={"executionId": eid, "success": not success})
    assert status == 409
    assert body["error"] == "already_resolved" and body["outcome"] == outcome
    assert h.new_messages("u1") == []


async def test_expiry_branch_and_late_callback_410(h: Harness) -> None:
    eid = await open_webview(h)
    assert await h.advance(59.9) == 0
    assert await h.advance(0.1) == 1
    assert [m.text for m in h.new_messages("u1")] == ["Expired."]
    status, body = await h.post("/webview/callback", json={"executionId": eid, "success": True})
    assert status == 410 and body["error"] == "expired"
    assert "expired" in body["message"]


async def test_callback_after_deadline_before_timer_gets_410_and_expires(h: Harness) -> None:
    eid = await open_webview(h)
    h.clock.advance(61)  # the timer has not run yet
    status, body = await h.post("/webview/callback", json={"executionId": eid, "success": True})
    assert status == 410 and body["error"] == "expired"
    assert [m.text for m in h.new_messages("u1")] == ["Expired."]
    assert await h.runtime.fire_due() == 0


async def test_text_plain_body_is_accepted(h: Harness) -> None:
    eid = await open_webview(h)
    status, _ = await h.post("/webview/callback", data=json.dumps(
        {"executionId": eid, "success": True, "data": {"ref": "T"}}),
        headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert status == 200
    assert [m.text for m in h.new_messages("u1")] == ["Paid: T"]


@pytest.mark.parametrize(("body", "code", "field"), [
    (b"{not json", "bad_json", None),
    (b"[1, 2]", "not_an_object", None),
    (b'{"success": true}', "missing_field", "executionId"),
    (b'{"executionId": "E"}', "missing_field", "success"),
    (b'{"executionId": 5, "success": true}', "wrong_type", "executionId"),
    (b'{"executionId": "E", "success": "true"}', "wrong_type", "success"),
    (b'{"executionId": "E", "success": 1}', "wrong_type", "success"),
    (b'{"executionId": "E", "success": true, "data": [1]}', "wrong_type", "data"),
    (b'{"executionId": "E", "success": true, "data": ' + b'{"a": ' * 40 + b"1" + b"}" * 41,
     "too_deep", None),
    (b"[" * 20_000 + b"]" * 20_000, "too_deep", None),
])
async def test_bad_callback_bodies_are_400_and_change_nothing(
        h: Harness, body: bytes, code: str, field: str | None) -> None:
    eid = await open_webview(h)
    status, answer = await h.post("/webview/callback", data=body.replace(b'"E"', f'"{eid}"'.encode()),
                                  headers={"Content-Type": "application/json"})
    assert status == 400, answer
    assert answer["error"] == code and answer["message"].endswith(".")
    if field:
        assert answer["field"] == field
    assert await state_of(h, eid) == "pending"
    assert h.new_messages("u1") == []


async def test_unknown_execution_id_404(h: Harness) -> None:
    status, body = await h.post("/webview/callback",
                                json={"executionId": "nope", "success": True})
    assert status == 404 and body["error"] == "unknown_execution"


async def test_oversized_body_413(h: Harness) -> None:
    eid = await open_webview(h)
    big = {"executionId": eid, "success": True, "data": {"x": "a" * 70_000}}
    status, body = await h.post("/webview/callback", json=big)
    assert status == 413 and body["error"] == "too_large"
    assert await state_of(h, eid) == "pending"


async def test_cors_preflight_and_headers(h: Harness) -> None:
    resp = await h.client.options("/webview/callback", headers={
        "Origin": "https://pay.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in resp.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in resp.headers
    resp = await h.client.post("/webview/callback", json={"executionId": "x", "success": True},
                               headers={"Origin": "https://pay.example"})
    assert resp.status == 404 and resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_restart_cancels_the_wait_and_callback_gets_410(h: Harness) -> None:
    eid = await open_webview(h)
    await h.say("/start")
    h.new_messages("u1")
    before = await h.runtime.worker.run(db_rows)
    status, body = await h.post("/webview/callback", json={"executionId": eid, "success": True})
    assert status == 410 and body["error"] == "cancelled"
    assert h.new_messages("u1") == []  # no branch ran: nothing said
    assert await h.runtime.worker.run(db_rows) == before
    assert await state_of(h, eid) == "cancelled"


async def test_non_blocking_webview_saves_late_data(tmp_path: Path) -> None:
    flows = """
        [flows.main]
        start = "form"
        [flows.main.blocks.form]
        type = "webview"
        url = "https://form.example"
        text = "Optional form"
        blocking = false
        response_variable = "form"
        next = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "Your city?"
        variable = "city"
        next = "show"
        [flows.main.blocks.show]
        type = "message"
        text = "{{city}} / {{form.size}}"
    """
    async with harness(write_config(tmp_path, flows)) as h:
        msgs = await h.say("hi")
        assert [m.text for m in msgs] == ["Optional form", "Your city?"]
        assert msgs[0].link is not None
        eid = parse_qs(urlsplit(msgs[0].link.url).query)["executionId"][0]
        status, body = await h.post("/webview/callback", json={
            "executionId": eid, "success": True, "data": {"size": "L"}})
        assert (status, body) == (200, {"status": "ok", "outcome": "success"})
        assert h.new_messages("u1") == []  # the flow did not move
        assert [m.text for m in await h.say("Oslo")] == ["Oslo / L"]


# -- Webhook ----------------------------------------------------------------------------

async def test_webhook_maps_fields_and_continues(h: Harness) -> None:
    key = await open_webhook(h)
    assert h.channel.messages("u1")[-1].text == f"Waiting for {key}"
    assert [m.text for m in await h.say("hello?")] == ["Still waiting for the webhook."]
    status, body = await h.post("/webhook", json={
        "conversation_key": key, "order": {"status": "shipped"}, "items": [{"id": 42}]})
    assert (status, body) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == ["Webhook: shipped 42 []"]
    status, body = await h.post("/webhook", json={"conversation_key": key})
    assert status == 409 and body["error"] == "not_waiting"


async def test_webhook_form_body_and_query_key(h: Harness) -> None:
    key = await open_webhook(h)
    status, _ = await h.post(f"/webhook?conversation_key={key}", data={"order.status": "paid"})
    assert status == 200
    assert [m.text for m in h.new_messages("u1")] == ["Webhook: paid  []"]


async def test_webhook_timeout_takes_failure_then_409(h: Harness) -> None:
    key = await open_webhook(h)
    h.new_messages("u1")
    assert await h.advance(30) == 1
    assert [m.text for m in h.new_messages("u1")] == ["No webhook."]
    status, body = await h.post("/webhook", json={"conversation_key": key})
    assert status == 409 and body["error"] == "not_waiting"


async def test_webhook_errors(h: Harness) -> None:
    status, body = await h.post("/webhook", json={"no": "key"})
    assert status == 400 and body["error"] == "missing_conversation_key"
    status, body = await h.post("/webhook", data=b"{oops",
                                headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"] == "bad_json"
    status, body = await h.post("/webhook", json={"conversation_key": "unknown"})
    assert status == 404 and body["error"] == "unknown_conversation"
    await h.say("hi")  # at the buttons block, not at a Webhook block
    key = await h.runtime.worker.run(conversation_key, "rec", "u1")
    status, body = await h.post("/webhook", json={"conversation_key": key, "x": "a" * 70_000})
    assert status == 413
    # not at a Webhook block, and no http request on its way: refused, never kept, so the
    # Webhook block that starts later waits for a call of its own (kept early calls:
    # tests/test_webhooks.py)
    status, body = await h.post("/webhook", json={"conversation_key": key,
                                                  "order": {"status": "stray"}})
    assert (status, body["error"]) == (409, "not_waiting")
    assert [m.text for m in await h.say("hook")] == [f"Waiting for {key}"]


def signed(body: bytes, msg_id: str, secret: str = SECRET) -> dict[str, str]:
    now = datetime.now(tz=UTC)
    signature = Webhook(secret).sign(msg_id, now, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature, "Content-Type": "application/json"}


async def test_signed_webhook(h: Harness) -> None:
    key = await open_webhook(h, which="signed")
    body = json.dumps({"conversation_key": key, "status": "ok"}).encode()
    # missing and forged signatures: 401, nothing changes
    status, answer = await h.post("/webhook", data=body,
                                  headers={"Content-Type": "application/json"})
    assert status == 401 and answer["error"] == "bad_signature"
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    status, _ = await h.post("/webhook", data=body, headers=signed(body, "msg_1", other))
    assert status == 401
    stale = signed(body, "msg_1")
    stale["webhook-timestamp"] = str(int(time.time()) - 3600)
    status, _ = await h.post("/webhook", data=body, headers=stale)
    assert status == 401
    assert h.new_messages("u1") == []
    status, answer = await h.post("/webhook", data=body, headers=signed(body, "msg_1"))
    assert (status, answer) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == ["Webhook: ok  []"]
    # the conversation waits at a signed Webhook block again; a replay of msg_1 is not a
    # second call
    await h.say("/start")
    await h.say("signed")
    status, answer = await h.post("/webhook", data=body, headers=signed(body, "msg_1"))
    assert (status, answer) == (200, {"status": "ok", "duplicate": True})
    assert h.new_messages("u1") == []
    status, answer = await h.post("/webhook", data=body, headers=signed(body, "msg_2"))
    assert (status, answer) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == ["Webhook: ok  []"]


async def test_server_refuses_to_start_without_a_blocks_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "")
    with pytest.raises(FlowbotError, match=r"flows\.main\.blocks\.signed\.secret_env"):
        async with harness(write_config(tmp_path, FLOWS)):
            pass


# -- exactly once -----------------------------------------------------------------------

async def test_at_the_deadline_the_expiry_wins_whichever_runs_first(h: Harness) -> None:
    """At the deadline the wait is over, whether the callback or the timer's pass reaches the
    database first: the callback gets 410, the flow says "Expired." once. (The true race,
    callbacks sent while the clock crosses the deadline, runs 1,000 times in
    tests/reliability/test_races.py.)"""
    for i, order in enumerate(["callback first", "timer first", "together"] * 4):
        user = f"r{i}"
        eid = await open_webview(h, user)
        h.new_messages(user)
        h.clock.advance(60)  # exactly at the deadline
        callback = h.client.post("/webview/callback", json={"executionId": eid, "success": True})
        if order == "callback first":
            resp, fired = await callback, await h.runtime.fire_due()
        elif order == "timer first":
            fired, resp = await h.runtime.fire_due(), await callback
        else:
            resp, fired = await asyncio.gather(callback, h.runtime.fire_due())
        await h.flush()
        assert (resp.status, (await resp.json())["error"]) == (410, "expired"), order
        # "together": on PostgreSQL the two jobs truly run at once, on two connections, and
        # either may take the conversation's lock first; the flow still expires once
        expected = {"callback first": (0,), "timer first": (1,)}.get(order, (0, 1))
        assert fired in expected, order  # 0: the 410 expired it
        assert [m.text for m in h.new_messages(user)] == ["Expired."], order
        assert await state_of(h, eid) == "expired"
        h.clock.advance(-60)


async def test_a_millisecond_before_the_deadline_the_callback_wins_over_the_timer(h: Harness) -> None:
    for i in range(10):
        user = f"r{i}"
        eid = await open_webview(h, user)
        h.new_messages(user)
        h.clock.advance(60 - 0.001)
        resp, fired = await asyncio.gather(
            h.client.post("/webview/callback", json={"executionId": eid, "success": True,
                                                     "data": {"ref": user}}),
            h.runtime.fire_due())
        await h.flush()
        assert (resp.status, fired) == (200, 0)
        h.clock.advance(0.001)  # the deadline passes: the resolved wait does not expire
        assert await h.runtime.fire_due() == 0
        await h.flush()
        assert [m.text for m in h.new_messages(user)] == [f"Paid: {user}"]
        assert await state_of(h, eid) == "success"
        h.clock.advance(-60)


async def test_ten_concurrent_copies_of_a_callback(h: Harness) -> None:
    eid = await open_webview(h)
    h.new_messages("u1")
    responses = await asyncio.gather(*(
        h.client.post("/webview/callback", json={"executionId": eid, "success": True,
                                                 "data": {"ref": "X"}}) for _ in range(10)))
    await h.flush()
    assert sorted(r.status for r in responses) == [200] + [409] * 9
    assert [m.text for m in h.new_messages("u1")] == ["Paid: X"]


async def test_ten_concurrent_copies_of_a_webhook(h: Harness) -> None:
    """A provider that delivers the same webhook ten times at once: one transition."""
    key = await open_webhook(h)
    h.new_messages("u1")
    body = {"conversation_key": key, "order": {"status": "shipped"}, "items": [{"id": 42}]}
    responses = await asyncio.gather(*(h.client.post("/webhook", json=body) for _ in range(10)))
    await h.flush()
    assert sorted(r.status for r in responses) == [200] + [409] * 9
    assert [m.text for m in h.new_messages("u1")] == ["Webhook: shipped 42 []"]
    for resp in responses:
        if resp.status == 409:
            assert (await resp.json())["error"] == "not_waiting"


async def test_openapi_document_is_served(h: Harness) -> None:
    resp = await h.client.get("/openapi.json")
    doc = await resp.json()
    assert set(doc["paths"]) >= {"/webview/callback", "/webhook"}
    assert doc["servers"] == [{"url": "http://bot.test"}]
    responses = doc["paths"]["/webview/callback"]["post"]["responses"]
    assert set(responses) >= {"200", "400", "404", "409", "410", "413"}
    for path in ("/webhook", "/webhook/{conversation_key}"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) >= {"200", "202", "400", "401", "404", "409", "410", "413", "429"}
        assert "removed from the flow" in responses["410"]["description"]  # only then: 409 else
    accepted = doc["paths"]["/webhook/{conversation_key}"]["post"]["responses"]["202"]
    assert accepted["content"]["application/json"]["schema"]["$ref"].endswith("/WebhookAccepted")
