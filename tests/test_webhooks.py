"""Webhook waits as payment providers and CRMs use them, through a real server: the
per-conversation URL, keys at configured paths, bodies by content, early calls kept (and
dropped past their window), and provider signatures (GitHub, Shopify, Stripe)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from storage.store import SQLiteStore
from tests.support import Harness, conversation_key, eventually, harness, query, write_config

pytestmark = pytest.mark.usefixtures("both_workers", "both_backends")

SECRETS = {"GH_SECRET": "gh-shared-secret", "SHOP_SECRET": "shpss_0123456789abcdef",
           "STRIPE_SECRET": "whsec_stripe_test_0123456789"}

PROVIDERS = """
[webhooks]
key_paths = ["metadata.conversation_key", "data.object.client_reference_id", "reference"]

[webhooks.providers.github]
signature = "hmac"
secret_env = "GH_SECRET"
header = "X-Hub-Signature-256"
prefix = "sha256="
id_header = "X-GitHub-Delivery"

[webhooks.providers.shopify]
signature = "hmac"
secret_env = "SHOP_SECRET"
header = "X-Shopify-Hmac-Sha256"
encoding = "base64"

[webhooks.providers.stripe]
signature = "stripe"
secret_env = "STRIPE_SECRET"
tolerance = 300
"""

FLOWS = """
[flows.main]
start = "menu"

[flows.main.blocks.menu]
type = "buttons"
text = "Pick"
choices = [{ label = "hook", next = "hook" }, { label = "github", next = "github" },
           { label = "shopify", next = "shopify" }, { label = "stripe", next = "stripe" },
           { label = "pay", next = "pay" }]

[flows.main.blocks.pay]
type = "http"
method = "POST"
url = "HOLD_URL"
on_success = "menu"
on_failure = "menu"

[flows.main.blocks.hook]
type = "webhook"
text = "Pay at {{webhook_url}}"
timeout = 30
map = { paid = "type", amount = "data.amount" }
on_success = "done"
on_failure = "timeout"

[flows.main.blocks.github]
type = "webhook"
timeout = 30
provider = "github"
map = { paid = "action" }
on_success = "done"
on_failure = "timeout"

[flows.main.blocks.shopify]
type = "webhook"
timeout = 30
provider = "shopify"
map = { paid = "financial_status" }
on_success = "done"
on_failure = "timeout"

[flows.main.blocks.stripe]
type = "webhook"
timeout = 30
provider = "stripe"
map = { paid = "type" }
on_success = "done"
on_failure = "timeout"

[flows.main.blocks.done]
type = "message"
text = "Paid: {{paid}} {{amount}}"

[flows.main.blocks.timeout]
type = "message"
text = "No payment."
"""


@pytest.fixture
def secrets_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


class HoldingProvider:
    """A provider that answers the `http` block's request only when released: until then
    the conversation waits for that answer (a pending `http` wait), the one time a call
    that comes before its Webhook block is kept."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hold", self.hold)
        self.server = TestServer(app, host="127.0.0.1")

    async def hold(self, request: web.Request) -> web.Response:
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"id": "chk_hold"})

    def flows(self, flows: str) -> str:
        return flows.replace("HOLD_URL", str(self.server.make_url("/hold")))


@pytest.fixture
async def hold() -> AsyncIterator[HoldingProvider]:
    provider = HoldingProvider()
    await provider.server.start_server()
    yield provider
    provider.release.set()
    await provider.server.close()


@pytest.fixture
async def h(tmp_path: Path, secrets_set: None, hold: HoldingProvider
            ) -> AsyncIterator[Harness]:
    async with harness(write_config(tmp_path, hold.flows(FLOWS), PROVIDERS)) as h:
        h.hold = hold  # type: ignore[attr-defined]
        yield h


async def at_http(h: Harness, user: str = "u1") -> str:
    """The user walks to the `http` block, whose request the provider holds; returns the
    conversation's key."""
    hold: HoldingProvider = h.hold  # type: ignore[attr-defined]
    await h.say("hi", user)
    await h.say("pay", user)
    await asyncio.wait_for(hold.arrived.wait(), 10)
    return await h.runtime.worker.run(conversation_key, "rec", user)


async def http_answers(h: Harness) -> None:
    """The provider answers the held request: the flow goes back to the menu ("Pick",
    read here)."""
    h.hold.release.set()  # type: ignore[attr-defined]
    await eventually(lambda: not h.runtime._tasks)
    await h.flush()
    h.new_messages("u1")


async def at_block(h: Harness, block: str, user: str = "u1") -> str:
    """The user walks to a Webhook block; returns the conversation's key."""
    await h.say("hi", user)
    await h.say(block, user)
    return await h.runtime.worker.run(conversation_key, "rec", user)


async def pending_webhook_waits(h: Harness) -> int:
    rows = await h.runtime.worker.run(
        query, "SELECT count(*) FROM waits WHERE kind = 'webhook' AND state = 'pending'")
    return int(rows[0][0])


async def kept(h: Harness) -> int:
    rows = await h.runtime.worker.run(query, "SELECT count(*) FROM early_webhooks")
    return int(rows[0][0])


# -- 1. a URL per conversation ----------------------------------------------------------

@pytest.mark.parametrize(("send", "said"), [
    ({"json": {"type": "payment.succeeded", "data": {"amount": 999}}},
     "Paid: payment.succeeded 999"),
    ({"data": {"type": "paid", "data.amount": "5"}}, "Paid: paid 5"),  # a form
    ({}, "Paid:  "),  # an empty body: the call itself is the news
])
async def test_provider_posts_its_own_payload_to_webhook_url(
        h: Harness, send: dict[str, Any], said: str) -> None:
    key = await at_block(h, "hook")
    assert h.channel.messages("u1")[-1].text == f"Pay at http://bot.test/webhook/{key}"
    status, body = await h.post(f"/webhook/{key}", **send)
    assert (status, body) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == [said]
    status, body = await h.post("/webhook/not-a-key", json={})
    assert status == 404 and body["error"] == "unknown_conversation"


async def test_key_in_body_and_query_still_work(h: Harness) -> None:
    key = await at_block(h, "hook")
    h.new_messages("u1")
    status, _ = await h.post(f"/webhook?conversation_key={key}", json={"type": "q"})
    assert status == 200
    assert [m.text for m in h.new_messages("u1")] == ["Paid: q "]


async def test_ten_concurrent_copies_apply_once_and_none_is_kept(h: Harness) -> None:
    key = await at_block(h, "hook")
    h.new_messages("u1")
    answers = await asyncio.gather(*(h.client.post(f"/webhook/{key}", json={"type": f"c{i}"})
                                     for i in range(10)))
    await h.flush()
    assert sorted(r.status for r in answers) == [200] + [409] * 9
    said = [m.text for m in h.new_messages("u1")]
    assert len(said) == 1 and said[0].startswith("Paid: c")
    # the nine copies were late, not early: nothing waits to hit the next Webhook block
    assert await kept(h) == 0


# -- 2. keys where the provider puts them -----------------------------------------------

@pytest.mark.parametrize("where", ["metadata", "stripe", "reference"])
async def test_key_found_at_a_configured_path(h: Harness, where: str) -> None:
    key = await at_block(h, "hook")
    h.new_messages("u1")
    payload: dict[str, Any] = {"type": where, "data": {"amount": 1}}
    if where == "metadata":
        payload["metadata"] = {"conversation_key": key}
    elif where == "stripe":
        payload["data"] = {"object": {"client_reference_id": key}, "amount": 1}
    else:
        payload["reference"] = key
    status, body = await h.post("/webhook", json=payload)
    assert (status, body) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == [f"Paid: {where} 1"]


async def test_no_key_anywhere_says_where_it_looked(h: Harness) -> None:
    await at_block(h, "hook")
    status, body = await h.post("/webhook", json={"metadata": {"order": 1}, "reference": 7})
    assert status == 400 and body["error"] == "missing_conversation_key"
    assert "metadata.conversation_key" in body["message"]
    assert "{{webhook_url}}" in body["message"]
    assert await pending_webhook_waits(h) == 1


# -- 3. the body by its content ---------------------------------------------------------

async def test_curl_d_json_labelled_as_a_form(h: Harness) -> None:
    key = await at_block(h, "hook")
    h.new_messages("u1")
    body = json.dumps({"conversation_key": key, "type": "curl", "data": {"amount": 2}})
    status, answer = await h.post("/webhook", data=body, headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert (status, answer) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == ["Paid: curl 2"]


async def test_curl_f_multipart_fields_reach_the_variables(h: Harness) -> None:
    key = await at_block(h, "hook")
    h.new_messages("u1")
    boundary = "------------------------3c5f6a1b2d"
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n'
                   f"{v}\r\n" for n, v in (("type", "MP"), ("data.amount", "7")))
    body += f"--{boundary}--\r\n"
    status, answer = await h.post(f"/webhook/{key}", data=body.encode(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert (status, answer) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == ["Paid: MP 7"]


@pytest.mark.parametrize(("body", "ctype", "code", "says"), [
    (b"hello world", "text/plain", "bad_body", "11 bytes (text/plain)"),
    (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded", "bad_body",
     "application/x-www-form-urlencoded"),
    (b"{oops", "application/x-www-form-urlencoded", "bad_json", "not valid JSON"),
    (b"[1, 2]", "application/json", "not_an_object", "list"),
    (b'"text"', "application/json", "not_an_object", "string"),
])
async def test_neither_json_object_nor_form_is_400_saying_what_came(
        h: Harness, body: bytes, ctype: str, code: str, says: str) -> None:
    key = await at_block(h, "hook")
    h.new_messages("u1")
    status, answer = await h.post(f"/webhook/{key}", data=body, headers={"Content-Type": ctype})
    assert status == 400 and answer["error"] == code, answer
    assert says in answer["message"]
    assert h.new_messages("u1") == [] and await pending_webhook_waits(h) == 1


# -- 4. early calls are kept, never lost ------------------------------------------------

HTTP_FLOW = """
[flows.main]
start = "register"

[flows.main.blocks.register]
type = "http"
method = "POST"
url = "{provider}/checkout"
body = {{ callback_url = "{{{{webhook_url}}}}", reference = "{{{{conversation_key}}}}" }}
map = {{ checkout = "id" }}
on_success = "wait_pay"
on_failure = "sorry"

[flows.main.blocks.wait_pay]
type = "webhook"
text = "Waiting for the payment of {{{{checkout}}}}"
timeout = 60
map = {{ paid = "type" }}
on_success = "thanks"
on_failure = "sorry"

[flows.main.blocks.thanks]
type = "message"
text = "Paid: {{{{paid}}}}"

[flows.main.blocks.sorry]
type = "message"
text = "No payment."
"""


class FakeProvider:
    """A payment provider that, like many in test mode or for instant captures, calls the
    webhook URL it was given BEFORE it answers the request that registered it."""

    def __init__(self) -> None:
        self.bot_url = ""  # where our test server really listens (public_url is fake)
        self.callbacks: list[tuple[str, int, Any]] = []
        app = web.Application()
        app.router.add_post("/checkout", self.checkout)
        self.server = TestServer(app, host="127.0.0.1")

    async def checkout(self, request: web.Request) -> web.Response:
        order = await request.json()
        url: str = order["callback_url"]
        assert url.startswith("http://bot.test/webhook/")
        async with ClientSession() as session, session.post(
                self.bot_url + url.removeprefix("http://bot.test"),
                data=json.dumps({"type": "checkout.paid", "reference": order["reference"]}),
                headers={"Content-Type": "application/json"}) as resp:
            self.callbacks.append((url, resp.status, await resp.json()))
        return web.json_response({"id": "chk_1"})


async def test_provider_calls_back_before_answering_the_http_block(tmp_path: Path) -> None:
    provider = FakeProvider()
    await provider.server.start_server()
    try:
        flows = HTTP_FLOW.format(provider=str(provider.server.make_url("")).rstrip("/"))
        async with harness(write_config(tmp_path, flows)) as h:
            provider.bot_url = str(h.client.make_url("")).rstrip("/")
            await h.say("pay")
            await eventually(lambda: not h.runtime._tasks)
            await h.flush()
            key = await h.runtime.worker.run(conversation_key, "rec", "u1")
            assert provider.callbacks == [(f"http://bot.test/webhook/{key}", 202,
                                           {"status": "accepted"})]
            assert [m.text for m in h.new_messages("u1")] == [
                "Waiting for the payment of chk_1", "Paid: checkout.paid"]
            assert await kept(h) == 0
            rows = await h.runtime.worker.run(
                query, "SELECT state FROM waits WHERE kind = 'webhook'")
            assert rows == [("success",)]
            metrics = await (await h.client.get("/metrics")).text()
            assert 'flowbot_webhooks_total{outcome="early"} 1.0' in metrics
            assert 'flowbot_webhooks_total{outcome="early_applied"} 1.0' in metrics
    finally:
        await provider.server.close()


async def test_early_call_survives_a_restart(tmp_path: Path, secrets_set: None,
                                             hold: HoldingProvider) -> None:
    config = write_config(tmp_path, hold.flows(FLOWS), PROVIDERS)
    async with harness(config) as h:
        h.hold = hold  # type: ignore[attr-defined]
        key = await at_http(h)
        status, body = await h.post(f"/webhook/{key}", json={"type": "early"})
        assert (status, body) == (202, {"status": "accepted"})
        await http_answers(h)
    async with harness(config) as h:  # a new process: only the database remembers
        assert [m.text for m in await h.say("hook")] == [
            f"Pay at http://bot.test/webhook/{key}", "Paid: early "]


async def test_early_call_past_its_window_is_dropped_logged_and_counted(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    key = await at_http(h)
    status, _ = await h.post(f"/webhook/{key}", json={"type": "too early"})
    assert status == 202 and await kept(h) == 1
    await http_answers(h)
    caplog.set_level(logging.WARNING, logger="bot.runtime")
    await h.advance(59)
    assert await kept(h) == 1
    await h.advance(1)
    assert await kept(h) == 0
    (record,) = [r for r in caplog.records if "dropped a webhook call" in r.getMessage()]
    assert "early_window (60 s)" in record.getMessage() and key not in record.getMessage()
    metrics = await (await h.client.get("/metrics")).text()
    assert 'flowbot_webhooks_total{outcome="dropped"} 1.0' in metrics
    # the block that starts later waits for a call of its own
    assert [m.text for m in await h.say("hook")] == [f"Pay at http://bot.test/webhook/{key}"]
    assert await pending_webhook_waits(h) == 1


async def test_early_calls_are_bounded_per_conversation(h: Harness) -> None:
    key = await at_http(h)
    for i in range(5):
        status, _ = await h.post(f"/webhook/{key}", json={"type": f"e{i}"})
        assert status == 202
    status, body = await h.post(f"/webhook/{key}", json={"type": "e5"})
    assert status == 429 and body["error"] == "too_many_early"
    assert await kept(h) == 5
    await http_answers(h)
    # the oldest is applied first; the others wait for later blocks or their window's end
    assert [m.text for m in await h.say("hook")][-1] == "Paid: e0 "


async def test_call_after_a_timeout_is_409_and_nothing_is_kept(h: Harness) -> None:
    key = await at_block(h, "hook")
    h.new_messages("u1")
    assert await h.advance(30) == 1
    assert [m.text for m in h.new_messages("u1")] == ["No payment."]
    status, body = await h.post(f"/webhook/{key}", json={"type": "late"})
    assert status == 409 and body["error"] == "not_waiting"
    assert "nothing was kept" in body["message"]
    assert await kept(h) == 0


async def test_late_call_past_the_window_is_refused_and_never_reaches_the_next_wait(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    # a provider retrying its 409 for hours: the tester's "order after-window" case
    key = await at_block(h, "hook")
    assert await h.advance(30) == 1
    caplog.set_level(logging.INFO, logger="flowbot.refused")
    for wait in (1, 61, 3600):
        await h.advance(wait)
        status, body = await h.post(f"/webhook/{key}", json={"type": "after-window"})
        assert (status, body["error"]) == (409, "not_waiting"), body
        assert "Stop retrying" in body["message"] and "nothing was kept" in body["message"]
    assert await kept(h) == 0
    refused = [r for r in caplog.records if "webhook refused: not_waiting" in r.getMessage()]
    assert len(refused) == 3 and all(key not in r.getMessage() for r in refused)
    metrics = await (await h.client.get("/metrics")).text()
    assert 'flowbot_webhooks_total{outcome="not_waiting"} 3.0' in metrics
    assert 'outcome="early"} 1' not in metrics
    # the user's next wait is untouched: it waits for a call of its own
    await at_block(h, "hook")
    assert [m.text for m in h.channel.messages("u1")[-2:]] == [
        "Pick", f"Pay at http://bot.test/webhook/{key}"]
    assert await pending_webhook_waits(h) == 1
    status, _ = await h.post(f"/webhook/{key}", json={"type": "its own"})
    assert status == 200 and [m.text for m in h.new_messages("u1")] == ["Paid: its own "]


async def test_call_while_idle_is_409_never_kept(h: Harness) -> None:
    await h.say("hi")  # at the menu: no Webhook block, no http request on its way
    key = await h.runtime.worker.run(conversation_key, "rec", "u1")
    status, body = await h.post(f"/webhook/{key}", json={"type": "stray"})
    assert (status, body["error"]) == (409, "not_waiting")
    assert await kept(h) == 0
    assert [m.text for m in await h.say("hook")] == [f"Pay at http://bot.test/webhook/{key}"]
    assert await pending_webhook_waits(h) == 1


async def test_removed_block_is_410_beyond_the_window(tmp_path: Path, secrets_set: None,
                                                      hold: HoldingProvider) -> None:
    flows = hold.flows(FLOWS)
    async with harness(write_config(tmp_path, flows, PROVIDERS)) as h:
        key = await at_block(h, "hook")
    # the admin renames the block and restarts: the conversation is moved on
    renamed = flows.replace("[flows.main.blocks.hook]", "[flows.main.blocks.hook2]").replace(
        'next = "hook" }', 'next = "hook2" }')
    async with harness(write_config(tmp_path, renamed, PROVIDERS)) as h:
        for wait in (0, 61, 3600):
            await h.advance(wait)
            status, body = await h.post(f"/webhook/{key}", json={"type": "gone"})
            assert (status, body["error"]) == (410, "gone"), body
            assert "removed from the flow" in body["message"]
        assert await kept(h) == 0
        # the user's next wait does not take the stale payload
        await at_block(h, "hook")
        assert h.channel.messages("u1")[-1].text == f"Pay at http://bot.test/webhook/{key}"
        assert await pending_webhook_waits(h) == 1
        # once a later wait ended as usual, a call is late, no longer "gone"
        assert await h.advance(30) == 1
        status, body = await h.post(f"/webhook/{key}", json={"type": "late"})
        assert (status, body["error"]) == (409, "not_waiting")


async def test_a_retry_of_an_applied_call_stays_a_duplicate_after_the_wait(h: Harness) -> None:
    key = await at_block(h, "github")
    body = json.dumps({"action": "completed"}).encode()
    headers = github_headers(body, delivery="d-7")
    assert await h.post(f"/webhook/{key}", data=body, headers=headers) == (200, {"status": "ok"})
    for wait in (1, 120):
        await h.advance(wait)
        assert await h.post(f"/webhook/{key}", data=body, headers=headers) == (
            200, {"status": "ok", "duplicate": True})
    assert await kept(h) == 0


async def test_a_replayed_early_call_is_kept_once(h: Harness) -> None:
    key = await at_http(h)
    body = json.dumps({"action": "completed"}).encode()
    headers = github_headers(body, delivery="d-1")
    status, answer = await h.post(f"/webhook/{key}", data=body, headers=headers)
    assert (status, answer) == (202, {"status": "accepted"})
    status, answer = await h.post(f"/webhook/{key}", data=body, headers=headers)
    assert (status, answer) == (200, {"status": "ok", "duplicate": True})
    assert await kept(h) == 1
    await http_answers(h)
    assert [m.text for m in await h.say("github")] == ["Paid: completed "]
    await h.say("/start")
    await h.say("github")
    status, _ = await h.post(f"/webhook/{key}", data=body, headers=headers)
    assert status == 200 and h.new_messages("u1") == []  # still a duplicate
    assert await pending_webhook_waits(h) == 1


async def test_a_forged_early_call_never_reaches_a_signed_block(h: Harness) -> None:
    key = await at_http(h)
    body = json.dumps({"action": "forged"}).encode()
    # the unsigned "hook" block would take it, so it is kept; the github block will not
    status, _ = await h.post(f"/webhook/{key}", data=body,
                             headers=github_headers(body, "not-the-secret"))
    assert status == 202
    await http_answers(h)
    assert [m.text for m in await h.say("github")] == []
    assert await pending_webhook_waits(h) == 1 and await kept(h) == 1


async def test_a_forged_early_call_is_401_when_every_block_is_signed(
        tmp_path: Path, secrets_set: None, hold: HoldingProvider) -> None:
    flows = """
        [flows.main]
        start = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "Ready?"
        variable = "ready"
        next = "register"
        [flows.main.blocks.register]
        type = "http"
        method = "POST"
        url = "HOLD_URL"
        on_success = "github"
        on_failure = "github"
        [flows.main.blocks.github]
        type = "webhook"
        timeout = 30
        provider = "github"
        map = { paid = "action" }
        on_success = "done"
        on_failure = "done"
        [flows.main.blocks.done]
        type = "message"
        text = "Got {{paid}}"
    """
    async with harness(write_config(tmp_path, hold.flows(flows), PROVIDERS)) as h:
        h.hold = hold  # type: ignore[attr-defined]
        await h.say("hi")
        await h.say("yes")
        await asyncio.wait_for(hold.arrived.wait(), 10)
        key = await h.runtime.worker.run(conversation_key, "rec", "u1")
        body = json.dumps({"action": "forged"}).encode()
        for headers in (github_headers(body, "not-the-secret"), {}):
            status, answer = await h.post(f"/webhook/{key}", data=body, headers=headers)
            assert status == 401 and answer["error"] == "bad_signature"
            assert "GH_SECRET" not in answer["message"]
        assert await kept(h) == 0
        body = json.dumps({"action": "real"}).encode()
        status, _ = await h.post(f"/webhook/{key}", data=body, headers=github_headers(body))
        assert status == 202
        await http_answers(h)
        assert h.channel.messages("u1")[-1].text == "Got real"


# -- 5. provider signatures -------------------------------------------------------------

def github_headers(body: bytes, secret: str = SECRETS["GH_SECRET"],
                   delivery: str = "d-0") -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={mac}", "X-GitHub-Delivery": delivery,
            "Content-Type": "application/json"}


def shopify_headers(body: bytes, secret: str = SECRETS["SHOP_SECRET"]) -> dict[str, str]:
    mac = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest())
    return {"X-Shopify-Hmac-Sha256": mac.decode(), "Content-Type": "application/json"}


def stripe_headers(body: bytes, t: float, secret: str = SECRETS["STRIPE_SECRET"]
                   ) -> dict[str, str]:
    ts = int(t)
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={ts},v1={'0' * 64},v1={mac}",
            "Content-Type": "application/json"}


def signed_for(h: Harness, provider: str, body: bytes, how: str) -> dict[str, str]:
    """Headers a `provider` would send: good, signed with the wrong secret, or stale."""
    secret = "not-the-secret" if how == "bad" else None
    if provider == "github":
        return github_headers(body, secret or SECRETS["GH_SECRET"])
    if provider == "shopify":
        return shopify_headers(body, secret or SECRETS["SHOP_SECRET"])
    t = h.clock.now() - (301 if how == "stale" else 0)
    return stripe_headers(body, t, secret or SECRETS["STRIPE_SECRET"])


PAYLOADS = {"github": {"action": "completed"}, "shopify": {"financial_status": "paid"},
            "stripe": {"id": "evt_1", "type": "checkout.session.completed"}}
SAID = {"github": "completed", "shopify": "paid", "stripe": "checkout.session.completed"}


@pytest.mark.parametrize("provider", ["github", "shopify", "stripe"])
async def test_provider_signatures_good_bad_missing(h: Harness, provider: str) -> None:
    key = await at_block(h, provider)
    h.new_messages("u1")
    body = json.dumps(PAYLOADS[provider]).encode()
    cases = [signed_for(h, provider, body, "bad"), {"Content-Type": "application/json"}]
    if provider == "stripe":
        cases.append(signed_for(h, provider, body, "stale"))
    for headers in cases:
        status, answer = await h.post(f"/webhook/{key}", data=body, headers=headers)
        assert status == 401 and answer["error"] == "bad_signature", answer
        assert "SECRET" not in answer["message"]  # never names our variables
    # a signature over other bytes than those sent
    tampered = body.replace(b"}", b', "x": 1}')
    status, _ = await h.post(f"/webhook/{key}", data=tampered,
                             headers=signed_for(h, provider, body, "good"))
    assert status == 401
    assert h.new_messages("u1") == [] and await pending_webhook_waits(h) == 1
    status, answer = await h.post(f"/webhook/{key}", data=body,
                                  headers=signed_for(h, provider, body, "good"))
    assert (status, answer) == (200, {"status": "ok"})
    assert [m.text for m in h.new_messages("u1")] == [f"Paid: {SAID[provider]} "]


@pytest.mark.parametrize("provider", ["github", "stripe"])
async def test_a_providers_redelivery_is_applied_once(h: Harness, provider: str) -> None:
    key = await at_block(h, provider)
    body = json.dumps(PAYLOADS[provider]).encode()
    headers = signed_for(h, provider, body, "good")
    assert (await h.post(f"/webhook/{key}", data=body, headers=headers))[0] == 200
    await h.say("/start")
    await h.say(provider)
    h.new_messages("u1")
    status, answer = await h.post(f"/webhook/{key}", data=body, headers=headers)
    assert (status, answer) == (200, {"status": "ok", "duplicate": True})
    assert h.new_messages("u1") == [] and await pending_webhook_waits(h) == 1


# -- 6. secrets are checked before serving ----------------------------------------------

def test_unset_secret_is_a_check_error_and_stops_serve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    write_config(tmp_path, FLOWS.replace("HOLD_URL", "http://127.0.0.1:9/hold"), PROVIDERS)
    path = str(tmp_path / "config.toml")
    assert main(["check", "--config", path]) == 0
    monkeypatch.setenv("STRIPE_SECRET", "")
    monkeypatch.delenv("SHOP_SECRET")
    assert main(["check", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "error: webhooks.providers.stripe.secret_env: the environment variable " \
           "STRIPE_SECRET is not set or empty" in err
    assert "error: webhooks.providers.shopify.secret_env" in err
    assert main(["serve", "--config", path, "--port", "0"]) == 2
    assert "STRIPE_SECRET (named by webhooks.providers.stripe.secret_env)" in capsys.readouterr().err
    assert not (tmp_path / "flowbot.db").exists()  # stopped before anything started


# -- config ----------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "block", "error"), [
    ("", 'provider = "strpe"',
     "flows.main.blocks.w.provider: no provider profile named 'strpe'"),
    ('[webhooks.providers.gh]\nsignature = "hmac"\nsecret_env = "X"\n', 'provider = "gh"',
     "webhooks.providers.gh.header: is required for signature = 'hmac'"),
    ('[webhooks.providers.s]\nsignature = "stripe"\nsecret_env = "X"\nprefix = "v1="\n',
     'provider = "s"', "webhooks.providers.s.prefix: unknown key"),
    ('[webhooks.providers.s]\nsignature = "md5"\nsecret_env = "X"\n', 'provider = "s"',
     "webhooks.providers.s.signature: must be one of standard, hmac, stripe"),
    ('[webhooks.providers.s]\nsignature = "hmac"\nheader = "H"\nsecret = "abc"\n'
     'secret_env = "X"\n', 'provider = "s"', "webhooks.providers.s.secret: secrets are not "
     "written in the config"),
    ('[webhooks]\nkey_paths = ["a..b"]\n', "", "webhooks.key_paths.0: 'a..b' is not a dotted"),
    ('[webhooks]\nearly_window = -1\n', "", "webhooks.early_window: must be 0..3600"),
    ("", 'provider = "p"\nsecret_env = "Y"',
     "flows.main.blocks.w.secret_env: give either `secret_env`"),
])
def test_webhook_config_errors_name_their_place(tmp_path: Path, extra: str, block: str,
                                                error: str) -> None:
    from bot.errors import ConfigError

    flows = f"""
[flows.main]
start = "w"
[flows.main.blocks.w]
type = "webhook"
timeout = 10
{block}
on_success = "w"
on_failure = "w"
"""
    with pytest.raises(ConfigError) as exc:
        write_config(tmp_path, flows, extra)
    assert any(e.startswith(error) for e in exc.value.errors), exc.value.errors


def test_store_keeps_early_calls_by_scheme(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    with store.transaction():
        cid = store.conversation("web", "u", "k", 0).id
        store.keep_early_webhook(cid, {"a": 1}, ["github"], 10, 70)
        store.keep_early_webhook(cid, {"b": 2}, [""], 11, 71)
        assert store.next_deadline() == 70
        assert store.take_early_webhook(cid, "stripe", 20) is None
        taken = store.take_early_webhook(cid, None, 20)
        assert taken is not None and taken.payload == {"a": 1}
        assert store.early_webhook_count(cid, 20) == 1
        assert [e.conversation_id for e in store.drop_expired_early_webhooks(71, 10)] == [cid]
        assert store.next_deadline() is None
    store.close()
