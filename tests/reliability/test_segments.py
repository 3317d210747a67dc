"""Every endpoint that reads a body, through a proxy that forwards it in small delayed TCP
segments (tests/proxy.py): the whole body is read before anything is decided (a form split
after `amount=15` stores 1500, never 15), with Content-Length and chunked alike, and the
size limit holds the same way."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from channels.telegram import MAX_UPDATE_BYTES
from channels.whatsapp import MAX_FORM_BYTES
from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
)
from tests.fake_telegram import payload as tg_payload
from tests.fake_twilio import payload as tw_payload
from tests.fake_twilio import sign, whatsapp_harness
from tests.proxy import SegmentingProxy, segmenting_proxy
from tests.reliability.common import snapshot
from tests.support import Harness, conversation_key, harness, query, write_config
from tests.test_telegram import (
    SECRET,
    env,  # noqa: F401 - autouse: the bot token and secret
    telegram,
    tg_config,
)

FLOWS = """
[flows.main]
start = "menu"

[flows.main.blocks.menu]
type = "buttons"
text = "Pick"
choices = [{ label = "pay", next = "pay" }, { label = "hook", next = "hook" }]

[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Pay here"
expiration = 60
response_variable = "payment"
on_success = "paid"
on_error = "failed"
on_expired = "failed"

[flows.main.blocks.paid]
type = "message"
text = "Paid {{payment.ref}} ({{payment.note}})"

[flows.main.blocks.failed]
type = "message"
text = "failed"

[flows.main.blocks.hook]
type = "webhook"
timeout = 30
map = { amount = "amount", note = "note" }
on_success = "hooked"
on_failure = "failed"

[flows.main.blocks.hooked]
type = "message"
text = "Amount {{amount}}, note of {{note}}"
"""

FRAMINGS = ["length", "chunked"]


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 4000):
        yield body[i:i + 4000]


async def post(url: str, body: bytes, framing: str, content_type: str = "application/json",
               **headers: str) -> tuple[int, Any]:
    """POST `body` (with a Content-Length, or chunked) on a connection of its own."""
    data: Any = body if framing == "length" else _chunks(body)
    async with aiohttp.ClientSession() as session, session.post(
            url, data=data, headers={"Content-Type": content_type, **headers}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else text


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(write_config(tmp_path, FLOWS)) as h:
        yield h


@pytest.fixture
def proxy(h: Harness) -> Iterator[SegmentingProxy]:
    assert h.client.server.port is not None
    with segmenting_proxy(h.client.server.port, cut_after=(b"amount=15", b'"ref": "R')) as p:
        yield p


def _db(h: Harness) -> Path:
    return Path(h.runtime.config.storage.path)


async def _execution_id(h: Harness, user: str) -> str:
    await h.say("hi", user)
    link = (await h.say("pay", user))[0].link
    assert link is not None
    return parse_qs(urlsplit(link.url).query)["executionId"][0]


async def _hook_key(h: Harness, user: str) -> str:
    await h.say("hi", user)
    await h.say("hook", user)
    return str(await h.runtime.worker.run(conversation_key, "rec", user))


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_callback_of_3_kb_in_segments(h: Harness, proxy: SegmentingProxy,
                                            framing: str) -> None:
    eid = await _execution_id(h, "u1")
    note = "ünïcode ✓ " * 300  # ~3 KB, past one 1,448-byte segment
    body = json.dumps({"executionId": eid, "success": True,
                       "data": {"ref": "R-1500", "note": note}}, ensure_ascii=False).encode()
    before = proxy.segments
    assert await post(f"{proxy.base}/webview/callback", body, framing) == (
        200, {"status": "ok", "outcome": "success"})
    assert proxy.segments - before >= 4  # it did arrive in pieces
    await h.flush()
    assert [m.text for m in h.new_messages("u1")][-1] == f"Paid R-1500 ({note})"


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("path", ["/webview/callback", "/webhook", "/webhook/{key}"])
async def test_limit_holds_in_segments(h: Harness, proxy: SegmentingProxy, framing: str,
                                       path: str) -> None:
    eid = await _execution_id(h, "u1")
    key = await _hook_key(h, "u2")
    path = path.format(key=key)
    before = snapshot(_db(h))
    limit = h.runtime.config.server.max_body_bytes
    pad = "x" * (limit + 1 - 120)
    body = json.dumps({"executionId": eid, "success": True, "conversation_key": key,
                       "amount": "1500", "data": {"ref": "R-1", "note": pad}}).encode()
    assert len(body) > limit
    status, doc = await post(f"{proxy.base}{path}", body, framing)
    assert (status, doc["error"]) == (413, "too_large")
    assert snapshot(_db(h)) == before
    # exactly at the limit is not "too large" (it is read whole, then judged)
    fits = body[:limit - 2] + b'"}'
    status, doc = await post(f"{proxy.base}{path}", fits, framing)
    assert status == 400 and doc["error"] in ("bad_json", "missing_conversation_key"), doc


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("url", ["/webhook?conversation_key={key}", "/webhook/{key}"])
async def test_form_webhook_split_after_amount_15_stores_1500(
        h: Harness, proxy: SegmentingProxy, framing: str, url: str) -> None:
    key = await _hook_key(h, "u1")
    h.new_messages("u1")
    body = urlencode({"amount": "1500", "note": "n" * 2000}).encode()
    status, doc = await post(proxy.base + url.format(key=key), body, framing,
                             "application/x-www-form-urlencoded")
    assert (status, doc) == (200, {"status": "ok"})
    await h.flush()
    assert [m.text for m in h.new_messages("u1")] == [f"Amount 1500, note of {'n' * 2000}"]
    rows = await h.runtime.worker.run(query, "SELECT variables FROM conversations")
    assert json.loads(rows[0][0])["amount"] == "1500"


async def test_json_webhook_in_segments(h: Harness, proxy: SegmentingProxy) -> None:
    key = await _hook_key(h, "u1")
    h.new_messages("u1")
    body = json.dumps({"conversation_key": key, "amount": 1500, "note": "é" * 1500}).encode()
    assert await post(f"{proxy.base}/webhook", body, "chunked") == (200, {"status": "ok"})
    await h.flush()
    assert [m.text for m in h.new_messages("u1")] == [f"Amount 1500, note of {'é' * 1500}"]


BOUNDARY = "------------------------d74496d66958873e"  # what curl -F sends


def multipart(fields: dict[str, str], files: dict[str, str] | None = None) -> bytes:
    """A `curl -F 'name=value'` body (RFC 7578); `files`: name → file name (-F 'f=@x')."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
             f"{value}\r\n" for name, value in fields.items()]
    parts += [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
              f'filename="{filename}"\r\nContent-Type: text/plain\r\n\r\nsecret\r\n'
              for name, filename in (files or {}).items()]
    return ("".join(parts) + f"--{BOUNDARY}--\r\n").encode()


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_multipart_webhook_in_segments_keeps_every_field(
        h: Harness, proxy: SegmentingProxy, framing: str) -> None:
    key = await _hook_key(h, "u1")
    h.new_messages("u1")
    note = "é ✓ \u05e9\u05dc\u05d5\u05dd 😀 " * 200  # ~3 KB of odd text, RTL and emoji
    body = multipart({"amount": "1500", "note": note})
    before = proxy.segments
    assert await post(f"{proxy.base}/webhook/{key}", body, framing,
                      f"multipart/form-data; boundary={BOUNDARY}") == (200, {"status": "ok"})
    assert proxy.segments - before >= 3
    await h.flush()
    assert [m.text for m in h.new_messages("u1")] == [f"Amount 1500, note of {note}"]


@pytest.mark.parametrize(("body", "ctype", "says"), [
    (multipart({"amount": "1500"}, {"receipt": "r.pdf"}), f"boundary={BOUNDARY}",
     "with a file in field 'receipt'"),
    (multipart({"amount": "1500"}), "", "not well formed"),  # no boundary
    (multipart({"amount": "1500"})[:-8], f"boundary={BOUNDARY}", "not well formed"),
    (multipart({"amount": "1500"}).replace(b"form-data; name", b"attachment; name"),
     f"boundary={BOUNDARY}", "not a named form field"),
])
async def test_multipart_webhook_that_would_lose_data_is_400_and_changes_nothing(
        h: Harness, proxy: SegmentingProxy, body: bytes, ctype: str, says: str) -> None:
    key = await _hook_key(h, "u1")
    h.new_messages("u1")
    before = snapshot(_db(h))
    status, doc = await post(f"{proxy.base}/webhook/{key}", body, "length",
                             f"multipart/form-data; {ctype}".rstrip("; "))
    assert (status, doc["error"]) == (400, "bad_body"), doc
    assert says in doc["message"] and "curl -F" in doc["message"]
    assert snapshot(_db(h)) == before
    assert h.new_messages("u1") == []


# -- Telegram -------------------------------------------------------------------------------

TG_FLOWS = """
[flows.main]
start = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Name?"
variable = "name"
next = "done"
[flows.main.blocks.done]
type = "end"
text = "Hello {{name}}"
"""


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_telegram_update_of_3000_characters_in_segments(
        tmp_path: Path, fake: FakeTelegram, framing: str) -> None:
    async with telegram(tg_config(tmp_path, fake, flows=TG_FLOWS), fake) as tg:
        assert tg.client.server.port is not None
        with segmenting_proxy(tg.client.server.port) as proxy:
            name = "Ada " * 750
            for update_id, text in ((1, "hi"), (2, name)):
                update = tg_payload("text_message")
                update["update_id"] = update_id
                update["message"]["text"] = text
                status, _ = await post(f"{proxy.base}/telegram", json.dumps(update).encode(),
                                       framing, **{"X-Telegram-Bot-Api-Secret-Token": SECRET})
                assert status == 200
            await tg.outbox.drain()
            assert [c["text"] for c in fake.sent()] == ["Name?", f"Hello {name.strip()}"]
            # the limit, in segments too: past it the update is dropped (200, so Telegram
            # does not send it again for a day) and logged
            update["update_id"] = 3
            update["message"]["text"] = "x" * MAX_UPDATE_BYTES
            status, doc = await post(f"{proxy.base}/telegram", json.dumps(update).encode(),
                                     framing, **{"X-Telegram-Bot-Api-Secret-Token": SECRET})
            assert (status, doc["status"], doc["reason"]) == (200, "ignored", "too_large")
            rows = await tg.runtime.worker.run(query, "SELECT count(*) FROM events")
            assert rows == [(2,)]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_4096_emoji_reply_to_another_in_segments(
        tmp_path: Path, fake: FakeTelegram, framing: str) -> None:
    """Issue 14's big update as Telegram sends it: 4,096 emoji replying to another such
    message, ~100 KB of \\u-escaped JSON (past server.max_body_bytes), in small segments:
    the whole answer reaches the flow and the user."""
    long = "😀" * 4096
    async with telegram(tg_config(tmp_path, fake, flows=TG_FLOWS), fake) as tg:
        assert tg.client.server.port is not None
        with segmenting_proxy(tg.client.server.port) as proxy:
            for update_id, text in ((1, "hi"), (2, long)):
                update = tg_payload("text_message")
                update["update_id"] = update_id
                update["message"]["text"] = text
                if update_id == 2:
                    update["message"]["reply_to_message"] = {
                        **tg_payload("text_message")["message"], "message_id": 3,
                        "text": long}
                body = json.dumps(update).encode()  # every emoji as \\ud83d\\ude00
                status, _ = await post(f"{proxy.base}/telegram", body, framing,
                                       **{"X-Telegram-Bot-Api-Secret-Token": SECRET})
                assert status == 200
            assert len(body) > 90_000
            await tg.outbox.drain()
            sent = [c["text"] for c in fake.sent()]
            assert sent[0] == "Name?"
            assert "".join(sent[1:]).count("😀") == 4096


# -- Twilio ---------------------------------------------------------------------------------

WA_FLOWS = """
[flows.main]
start = "hello"
[flows.main.blocks.hello]
type = "end"
text = "You wrote: {{last_message}}"
"""


@pytest.mark.usefixtures("twilio_auth_token")
@pytest.mark.parametrize("framing", FRAMINGS)
async def test_twilio_inbound_and_status_in_segments(tmp_path: Path, framing: str) -> None:
    async with whatsapp_harness(tmp_path, WA_FLOWS, whatsapp="status_callback = true") as h:
        assert h.client.server.port is not None
        with segmenting_proxy(h.client.server.port, cut_after=(b"Body=",)) as proxy:
            text = "long message ✓ " * 100  # 1,500 characters: past a segment, in one WhatsApp message
            form = dict(parse_qs(tw_payload("inbound_text"), keep_blank_values=True))
            form = {k: v[0] for k, v in form.items()} | {"Body": text}
            body = urlencode(form)
            status, _ = await post(
                f"{proxy.base}/twilio/whatsapp", body.encode(), framing,
                "application/x-www-form-urlencoded",
                **{"X-Twilio-Signature": sign(h.channel.inbound_url, body)})
            assert status == 200
            await h.outbox.drain()
            assert h.new_bodies() == [f"You wrote: {text}"]

            sid = (await h.sql("SELECT platform_id FROM outbox"))[0][0]
            status_body = urlencode({"MessageSid": sid, "MessageStatus": "delivered",
                                     "AccountSid": "AC" + "0" * 32, "Padding": "p" * 3000})
            status, _ = await post(
                f"{proxy.base}/twilio/status", status_body.encode(), framing,
                "application/x-www-form-urlencoded",
                **{"X-Twilio-Signature": sign(h.channel.status_url, status_body)})
            assert status == 200
            assert await h.sql("SELECT platform_status FROM outbox") == [("delivered",)]

            limit = MAX_FORM_BYTES
            for route, url in (("/twilio/whatsapp", h.channel.inbound_url),
                               ("/twilio/status", h.channel.status_url)):
                big = urlencode(form | {"Body": "x" * limit})
                status, doc = await post(
                    f"{proxy.base}{route}", big.encode(), framing,
                    "application/x-www-form-urlencoded",
                    **{"X-Twilio-Signature": sign(url, big)})
                assert (status, doc["error"]) == (413, "too_large")
            assert await h.sql("SELECT count(*) FROM events") == [(1,)]
