"""A whole flow on WhatsApp, driven by real-shaped Twilio form posts: quick replies, a WebView
wait, a Webhook wait, media, status callbacks; and the 63016 and 429 delivery paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bot.engine import button_tag
from tests.fake_twilio import (
    ACCOUNT_SID,
    SANDBOX,
    USER,
    payload,
    whatsapp_harness,
)

FLOWS = """
[flows.main]
start = "hello"

[flows.main.blocks.hello]
type = "message"
text = "Hi {{user_name}}!"
next = "menu"

[flows.main.blocks.menu]
type = "buttons"
text = "What now?"
choices = [{ label = "Pay", next = "pay" }, { label = "Webhook", next = "hook" }]

[flows.main.blocks.pay]
type = "webview"
url = "/pay"
text = "Open the payment page."
button = "Pay 5 EUR"
expiration = 600
response_variable = "payment"
on_success = "paid"
on_error = "failed"
on_expired = "failed"

[flows.main.blocks.paid]
type = "message"
text = "Paid, reference {{payment.reference}}."
next = "hook"

[flows.main.blocks.failed]
type = "message"
text = "The payment did not go through."
next = "hook"

[flows.main.blocks.hook]
type = "webhook"
text = "Waiting for your order."
timeout = 300
map = { order_status = "order.status" }
on_success = "shipped"
on_failure = "no_order"

[flows.main.blocks.shipped]
type = "message"
text = "Your order is {{order_status}}."
next = "photo"

[flows.main.blocks.no_order]
type = "end"
text = "No order arrived."

[flows.main.blocks.photo]
type = "input"
text = "Send a photo of the receipt."
variable = "caption"
next = "got"

[flows.main.blocks.got]
type = "end"
text = "Got {{media_count}} file(s) ({{caption}}): {{media_content_type}} {{media_url}}"
"""

BUTTONS_SID = "HX2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a"
MENU = "What now?\n\n1. Pay\n2. Webhook\n\nReply 1 or 2."


pytestmark = pytest.mark.usefixtures("twilio_auth_token")


def test_quick_reply_fixture_carries_the_engines_payload() -> None:
    assert f"ButtonPayload={button_tag('main', 'menu')}%3A0" in payload("quick_reply")


async def test_full_flow_with_webview_and_webhook_waits(tmp_path: Path) -> None:
    whatsapp = f"""
        status_callback = true
        buttons_content_sid = {{ 2 = "{BUTTONS_SID}" }}
    """
    async with whatsapp_harness(tmp_path, FLOWS, whatsapp=whatsapp) as h:
        # 1. the user writes; we answer Twilio with empty TwiML and reply through the API
        status, body = await h.post("/twilio/whatsapp", payload("inbound_text"))
        assert (status, body) == (200, '<?xml version="1.0" encoding="UTF-8"?><Response/>')
        hello, menu = h.new_sends()
        assert hello == {"From": SANDBOX, "To": USER, "Body": "Hi Ann!",
                         "StatusCallback": "http://bot.test/twilio/status"}
        assert "Body" not in menu
        assert menu["ContentSid"] == BUTTONS_SID
        tag = button_tag("main", "menu")
        assert json.loads(menu["ContentVariables"]) == {
            "1": "What now?", "2": "Pay", "3": f"{tag}:0", "4": "Webhook", "5": f"{tag}:1"}

        # 2. a quick-reply press: ButtonPayload picks the choice; the WebView link goes out
        status, _ = await h.post("/twilio/whatsapp", payload("quick_reply"))
        assert status == 200
        [link] = h.new_bodies()
        m = re.fullmatch(r"Open the payment page\.\nPay 5 EUR: http://bot\.test/pay\?"
                         r"executionId=([A-Za-z0-9_-]{24})", link)
        assert m, link
        execution_id = m.group(1)

        # writing while the page is open gets the pending message
        again = payload("inbound_text").replace("SM2e4f6a8b0c1d3e5f7a9b1c3d5e7f9a1b",
                                                "SM" + "c" * 32)
        assert (await h.post("/twilio/whatsapp", again))[0] == 200
        assert h.new_bodies() == [
            "Please finish the step above first — I'm still waiting for it."]
        [(key,)] = await h.sql("SELECT key FROM conversations")

        # 3. the page calls back; the flow goes on to the Webhook wait
        status, doc = await h.post_json("/webview/callback", {
            "executionId": execution_id, "success": True, "data": {"reference": "R-77"}})
        assert (status, doc) == (200, {"status": "ok", "outcome": "success"})
        assert h.new_bodies() == ["Paid, reference R-77.", "Waiting for your order."]

        # 4. the third party calls the webhook with the conversation key
        status, doc = await h.post_json("/webhook", {
            "conversation_key": key, "order": {"id": "A-1", "status": "shipped"}})
        assert (status, doc) == (200, {"status": "ok"})
        assert h.new_bodies() == ["Your order is shipped.", "Send a photo of the receipt."]

        # 5. a photo with a caption: media reach the flow as variables
        status, _ = await h.post("/twilio/whatsapp", payload("media"))
        assert status == 200
        assert h.new_bodies() == [
            "Got 1 file(s) (my receipt): image/jpeg https://api.twilio.com/2010-04-01/Accounts/"
            f"{ACCOUNT_SID}/Messages/MM4a6c8e0b2d4f6a8c0e2b4d6f8a0c2e4b/Media/"
            "ME9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a"]

        # 6. Twilio reports delivery: recorded on the outbox rows by MessageSid
        assert (await h.post("/twilio/status", payload("status_delivered")))[0] == 200
        assert (await h.post("/twilio/status", payload("status_failed")))[0] == 200
        rows = await h.sql("SELECT platform_id, platform_status, error FROM outbox "
                           "ORDER BY id LIMIT 3")  # hello, menu, the WebView link
        assert rows == [("SM" + "0" * 31 + "1", "delivered", None),
                        ("SM" + "0" * 31 + "2", "failed", "63016"),
                        ("SM" + "0" * 31 + "3", None, None)]
        # every send asked for status callbacks
        assert {f["StatusCallback"] for f in h.twilio.sent} == {"http://bot.test/twilio/status"}


async def test_redelivered_message_is_handled_once(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        assert (await h.post("/twilio/whatsapp", payload("inbound_text")))[0] == 200
        assert h.new_bodies() == ["Hi Ann!", MENU]
        status, body = await h.post("/twilio/whatsapp", payload("inbound_text"))
        assert (status, body) == (200, '<?xml version="1.0" encoding="UTF-8"?><Response/>')
        assert h.new_bodies() == []


async def test_numbered_reply_and_pending_message(tmp_path: Path) -> None:
    """Without templates: numbered text; the number typed back picks the choice."""
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        await h.post("/twilio/whatsapp", payload("inbound_text"))
        assert h.new_bodies() == ["Hi Ann!", MENU]
        reply = payload("inbound_text").replace("Body=Hi+there", "Body=2").replace(
            "SM2e4f6a8b0c1d3e5f7a9b1c3d5e7f9a1b", "SM" + "a" * 32)
        await h.post("/twilio/whatsapp", reply)
        assert h.new_bodies() == ["Waiting for your order."]
        await h.advance(301)
        assert h.new_bodies() == ["No order arrived."]


async def test_outside_24_hour_window_is_recorded_not_retried(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        h.twilio.fail_next(400, 63016, "Failed to send freeform message because you are "
                           "outside the allowed window. If you are using WhatsApp, please use "
                           "a Message Template.")
        assert (await h.post("/twilio/whatsapp", payload("inbound_text")))[0] == 200
        rows = await h.sql("SELECT state, attempts, error FROM outbox ORDER BY id")
        assert rows[0][:2] == ("failed", 1)
        assert rows[0][2].startswith("63016: Twilio refused the message (400): Failed to send "
                                     "freeform message")
        assert rows[1][:2] == ("sent", 1)  # the next message is not held back by a dead one
        assert h.new_bodies() == [MENU]

        await h.advance(3600)
        assert len(h.twilio.posts) == 2  # never tried again

        # the flow stands where the engine put it: the menu still answers
        assert await h.sql("SELECT block, wait_id FROM conversations") == [("menu", None)]
        reply = payload("inbound_text").replace("Body=Hi+there", "Body=Webhook").replace(
            "SM2e4f6a8b0c1d3e5f7a9b1c3d5e7f9a1b", "SM" + "b" * 32)
        await h.post("/twilio/whatsapp", reply)
        assert h.new_bodies() == ["Waiting for your order."]


async def test_rate_limited_send_is_retried_after_retry_after(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        h.twilio.fail_next(429, 20429, "Too Many Requests", **{"Retry-After": "30"})
        await h.post("/twilio/whatsapp", payload("inbound_text"))
        assert h.new_bodies() == []
        rows = await h.sql("SELECT state, attempts, error FROM outbox ORDER BY id")
        assert rows == [("pending", 1, "20429: Twilio answered 429: Too Many Requests"),
                        ("pending", 0, None)]  # order kept: the menu waits behind it

        await h.advance(29)
        assert h.new_bodies() == []
        await h.advance(2)
        assert h.new_bodies() == ["Hi Ann!", MENU]
        assert [f["Body"] for f in h.twilio.posts] == ["Hi Ann!", "Hi Ann!", MENU]
        assert await h.sql("SELECT state, attempts FROM outbox ORDER BY id") == [
            ("sent", 2), ("sent", 1)]


async def test_server_error_is_retried_with_backoff(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        h.twilio.fail_next(503, 20500, "Service Unavailable")
        await h.post("/twilio/whatsapp", payload("inbound_text"))
        assert h.new_bodies() == []
        await h.advance(2)  # first backoff: 1 s ± 20 %
        assert h.new_bodies() == ["Hi Ann!", MENU]
