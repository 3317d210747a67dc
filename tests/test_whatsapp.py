"""The WhatsApp channel piece by piece: signatures, inbound parsing, what is sent, errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

import pytest
from aioresponses import aioresponses

from bot.channel_config import WhatsAppConfig
from bot.config import ServerConfig
from bot.errors import BadRequest, ConfigError, FlowbotError
from channels.base import (
    Button,
    Delivery,
    Link,
    Message,
    RateLimit,
    SendError,
    media_variables,
)
from channels.whatsapp import EMPTY_TWIML, WhatsAppChannel, inbound_event
from tests.fake_twilio import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    SANDBOX,
    USER,
    payload,
    sign,
    whatsapp_config,
    whatsapp_harness,
)
from tests.support import db_rows

FLOWS = """
[flows.main]
start = "hello"
[flows.main.blocks.hello]
type = "message"
text = "Hi {{user_name}}, you wrote: {{last_message}}"
next = "menu"
[flows.main.blocks.menu]
type = "buttons"
text = "Pick one"
choices = [
  { label = "Pay", next = "bye" }, { label = "Wait", next = "bye" }, { label = "Stop", next = "bye" },
]
[flows.main.blocks.bye]
type = "end"
text = "Bye"
"""
HELLO = "Hi Ann, you wrote: Hi there"
MENU = "Pick one\n\n1. Pay\n2. Wait\n3. Stop\n\nReply 1, 2 or 3."


pytestmark = pytest.mark.usefixtures("twilio_auth_token")


def form(name: str) -> dict[str, str]:
    return dict(parse_qsl(payload(name)))


# -- X-Twilio-Signature ---------------------------------------------------------------------

async def test_signed_message_is_answered_with_empty_twiml(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        # Twilio adds parameters without notice: signed like the rest, ignored by us
        body = payload("inbound_text") + "&SomeNewParameter=42"
        resp = await h.client.post("/twilio/whatsapp", data=body.encode(), headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": sign("http://bot.test/twilio/whatsapp", body)})
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/xml; charset=utf-8"
        assert await resp.text() == EMPTY_TWIML
        await h.outbox.drain()
        assert h.new_sends() == [{"From": SANDBOX, "To": USER, "Body": HELLO},
                                 {"From": SANDBOX, "To": USER, "Body": MENU}]


@pytest.mark.parametrize("signature", [
    "",  # missing header
    "forged",  # garbage
    sign("http://bot.test/twilio/whatsapp", payload("inbound_text"), token="0" * 32),  # other token
    # what this server sees (127.0.0.1), not what Twilio was told to call
    "server-url",
])
async def test_bad_signature_is_refused_and_changes_nothing(tmp_path: Path, signature: str) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        if signature == "server-url":
            signature = sign(str(h.client.make_url("/twilio/whatsapp")), payload("inbound_text"))
        status, doc = await h.post("/twilio/whatsapp", payload("inbound_text"),
                                   signature=signature)
        assert status == 403
        assert doc["error"] == "bad_signature"
        assert "http://bot.test/twilio/whatsapp" in doc["message"]
        assert await h.sql("SELECT count(*) FROM events") == [(0,)]
        assert await h.sql("SELECT count(*) FROM conversations") == [(0,)]
        assert h.twilio.posts == []


async def test_tampered_body_is_refused(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        good = sign(h.channel.inbound_url, payload("inbound_text"))
        tampered = payload("inbound_text").replace("Body=Hi+there", "Body=restart")
        assert tampered != payload("inbound_text")
        status, doc = await h.post("/twilio/whatsapp", tampered, signature=good)
        assert status == 403 and doc["error"] == "bad_signature"
        assert await h.sql("SELECT count(*) FROM events") == [(0,)]
        assert await h.sql("SELECT count(*) FROM conversations") == [(0,)]
        await h.outbox.drain()
        assert h.twilio.posts == []


async def test_a_tampered_body_mid_conversation_changes_nothing(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        assert (await h.post("/twilio/whatsapp", payload("inbound_text")))[0] == 200
        assert h.new_bodies() == [HELLO, MENU]
        before = await h.runtime.worker.run(db_rows)
        body = payload("inbound_text").replace("SM2e4f", "SM9e4f")  # another message, not a copy
        tampered = body.replace("Body=Hi+there", "Body=restart")
        status, doc = await h.post("/twilio/whatsapp", tampered,
                                   signature=sign(h.channel.inbound_url, body))
        assert status == 403 and doc["error"] == "bad_signature"
        await h.outbox.drain()
        assert h.new_bodies() == []
        assert await h.runtime.worker.run(db_rows) == before


@pytest.mark.parametrize(("configured", "signed"), [
    ("https://bot.example.com", "https://bot.example.com/twilio/whatsapp"),
    ("https://bot.example.com", "https://bot.example.com:443/twilio/whatsapp"),
    ("https://bot.example.com:443", "https://bot.example.com/twilio/whatsapp"),
    ("https://bot.example.com:443", "https://bot.example.com:443/twilio/whatsapp"),
])
async def test_signature_with_and_without_default_port(tmp_path: Path, configured: str,
                                                       signed: str) -> None:
    """Twilio sometimes signs with the default port, sometimes without; both are valid."""
    async with whatsapp_harness(tmp_path, FLOWS, whatsapp=f'public_url = "{configured}"') as h:
        status, _ = await h.post("/twilio/whatsapp", payload("inbound_text"), url=signed)
        assert status == 200
        assert h.new_bodies() == [HELLO, MENU]


async def test_signature_for_another_port_or_host_is_refused(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS,
                                whatsapp='public_url = "https://bot.example.com"') as h:
        for signed in ("https://bot.example.com:8443/twilio/whatsapp",
                       "https://evil.example.com/twilio/whatsapp",
                       "http://bot.example.com/twilio/whatsapp"):
            assert (await h.post("/twilio/whatsapp", payload("inbound_text"),
                                 url=signed))[0] == 403


async def test_public_url_and_path_prefix_of_the_server(tmp_path: Path) -> None:
    """Behind a proxy: Twilio calls https://bot.example.com/bot/…; we listen on 127.0.0.1."""
    async with whatsapp_harness(tmp_path, FLOWS, public_url="https://bot.example.com",
                                server='path_prefix = "/bot"', prefix="/bot") as h:
        assert h.channel.inbound_url == "https://bot.example.com/bot/twilio/whatsapp"
        status, _ = await h.post("/twilio/whatsapp", payload("inbound_text"))
        assert status == 200
        assert h.new_bodies() == [HELLO, MENU]


async def test_query_string_is_part_of_the_signed_url(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        body = payload("inbound_text")
        assert (await h.post("/twilio/whatsapp", body, query="src=console%20a",
                             url="http://bot.test/twilio/whatsapp")) [0] == 403
        assert (await h.post("/twilio/whatsapp", body, query="src=console%20a"))[0] == 200
        assert h.new_bodies() == [HELLO, MENU]


# -- status callbacks -------------------------------------------------------------------------

async def test_status_route_exists_only_when_enabled(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        status, _ = await h.post("/twilio/status", payload("status_delivered"))
        assert status == 404
        assert "StatusCallback" not in (await _say_hi(h))[0]


async def test_status_callback_is_signed_and_recorded(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async with whatsapp_harness(tmp_path, FLOWS, whatsapp="status_callback = true") as h:
        sends = await _say_hi(h)
        assert sends[0]["StatusCallback"] == "http://bot.test/twilio/status"
        assert (await h.post("/twilio/status", payload("status_delivered"),
                             signature="forged"))[0] == 403
        assert (await h.post("/twilio/status", payload("status_delivered")))[0] == 200
        assert await h.sql("SELECT platform_status FROM outbox ORDER BY id") == [
            ("delivered",), (None,)]
        # a message we do not know: 200 all the same (Twilio would retry), but logged
        unknown = payload("status_delivered").replace("SM" + "0" * 31 + "1", "SM" + "f" * 32)
        with caplog.at_level(logging.INFO, logger="channels.whatsapp"):
            assert (await h.post("/twilio/status", unknown))[0] == 200
        assert f"message SM{'f' * 32}, which is not in the outbox" in caplog.text


async def test_a_status_that_arrives_before_its_message_is_recorded_is_kept(
        tmp_path: Path) -> None:
    # Twilio may call back before our "sent" commit has stored the SID it answered
    async with whatsapp_harness(tmp_path, FLOWS, whatsapp="status_callback = true") as h:
        assert (await h.post("/twilio/status", payload("status_delivered")))[0] == 200
        assert await h.sql("SELECT platform_status FROM outbox") == []
        await _say_hi(h)
        assert await h.sql("SELECT platform_status FROM outbox ORDER BY id") == [
            ("delivered",), (None,)]
        assert await h.sql("SELECT count(*) FROM early_statuses") == [(0,)]


def status_form(sid: str, status: str, error_code: str = "") -> str:
    """A status callback as Twilio posts it: blank parameters included (they are signed)."""
    body = payload("status_delivered").replace("SM" + "0" * 31 + "1", sid)
    body = body.replace("MessageStatus=delivered", f"MessageStatus={status}")
    body = body.replace("SmsStatus=delivered", f"SmsStatus={status}")
    return body + f"&ErrorCode={error_code}&ErrorMessage="


@pytest.mark.parametrize(("early", "order", "final"), [
    (False, ["read", "delivered", "sent"], "read"),
    (False, ["sent", "read", "sending", "delivered", "queued"], "read"),
    (False, ["failed", "sent"], "failed"),
    (False, ["delivered", "undelivered", "read", "sent"], "undelivered"),
    (True, ["read", "delivered", "sent"], "read"),  # all before our "sent" commit
    (True, ["failed", "sent", "delivered"], "failed"),
])
async def test_a_status_never_moves_backwards_and_failures_are_final(
        tmp_path: Path, early: bool, order: list[str], final: str) -> None:
    """Twilio's callbacks arrive out of order: queued < sending < sent < delivered < read,
    while failed and undelivered are final."""
    sid = "SM" + "0" * 31 + "1"
    async with whatsapp_harness(tmp_path, FLOWS, whatsapp="status_callback = true") as h:
        if not early:
            await _say_hi(h)
        for status in order:
            code = "63016" if status in ("failed", "undelivered") else ""
            assert (await h.post("/twilio/status", status_form(sid, status, code)))[0] == 200
        if early:
            await _say_hi(h)
        [(got, error)] = await h.sql(
            f"SELECT platform_status, error FROM outbox WHERE platform_id = '{sid}'")
        assert got == final
        assert (error == "63016") == (final in ("failed", "undelivered"))


async def _say_hi(h: Any) -> list[dict[str, str]]:
    assert (await h.post("/twilio/whatsapp", payload("inbound_text")))[0] == 200
    sends: list[dict[str, str]] = h.new_sends()
    return sends


# -- inbound parameters -----------------------------------------------------------------------

def test_text_message() -> None:
    event = inbound_event(form("inbound_text"))
    assert (event.channel, event.user_id, event.text, event.payload, event.user_name) == (
        "whatsapp", "whatsapp:+4915112345678", "Hi there", None, "Ann")
    assert event.event_id == "twilio:SM2e4f6a8b0c1d3e5f7a9b1c3d5e7f9a1b"
    assert event.variables == {"media_count": "0", "media_url": "", "media_content_type": "",
                               "media_urls": "", "wa_id": "4915112345678",
                               **media_variables()}


def test_quick_reply_press() -> None:
    event = inbound_event(form("quick_reply"))
    assert (event.text, event.payload) == ("Pay", "70d4e21d:0")


def test_quick_reply_of_a_foreign_template_counts_as_its_text() -> None:
    event = inbound_event({**form("quick_reply"), "ButtonPayload": "PROMO_YES",
                           "ButtonText": "Yes please"})
    assert (event.text, event.payload) == ("Yes please", None)


def test_media_message() -> None:
    event = inbound_event(form("media"))
    url = (f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/"
           "MM4a6c8e0b2d4f6a8c0e2b4d6f8a0c2e4b/Media/ME9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a")
    assert event.text == "my receipt"
    assert event.variables == {"media_count": "1", "media_url": url,
                               "media_content_type": "image/jpeg", "media_urls": url,
                               "wa_id": "4915112345678",
                               **media_variables(media_type="photo", media_id=url,
                                                 media_content_type="image/jpeg")}


def test_several_media() -> None:
    event = inbound_event({**form("media"), "NumMedia": "2", "MediaUrl1": "https://x/2",
                           "MediaContentType1": "application/pdf"})
    assert event.variables["media_count"] == "2"
    assert event.variables["media_urls"].endswith(" https://x/2")


MEDIA_FLOWS = """
[flows.main]
start = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Send the receipt"
variable = "receipt"
validation = "media"
next = "done"
[flows.main.blocks.done]
type = "end"
text = "{{media_type}} {{receipt}} [{{last_message}}] {{latitude}},{{longitude}}"
"""


def twilio_form(**params: str) -> str:
    """A signed inbound form as Twilio posts it, blank parameters included."""
    base = {"MessageSid": "MM" + "1" * 32, "From": USER, "To": SANDBOX, "Body": "",
            "NumMedia": "0", "ProfileName": "Ann", "WaId": "4915112345678"}
    return urlencode({**base, **params})


async def test_a_media_only_message_answers_an_input_asking_for_media(
        tmp_path: Path) -> None:
    """A photo without caption: Body is blank (and signed), NumMedia=1."""
    url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"
    async with whatsapp_harness(tmp_path, MEDIA_FLOWS) as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        assert h.new_bodies() == ["Send the receipt"]
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "2" * 32,
                                                     Body="later"))
        assert h.new_bodies() == ["Please send a photo, a file or a link.", "Send the receipt"]
        status, _ = await h.post("/twilio/whatsapp", twilio_form(
            NumMedia="1", MediaUrl0=url, MediaContentType0="image/jpeg"))
        assert status == 200
        assert h.new_bodies() == [f"photo {url} [] ,"]


@pytest.mark.parametrize(("params", "shown"), [
    ({"Latitude": "52.520008", "Longitude": "13.404954", "Address": "Berlin"},
     "location  [x] 52.520008,13.404954"),
    ({"NumMedia": "1", "MediaUrl0": "https://x/v.ogg", "MediaContentType0": "audio/ogg"},
     "voice https://x/v.ogg [x] ,"),
    ({"NumMedia": "1", "MediaUrl0": "https://x/c.vcf", "MediaContentType0": "text/vcard"},
     "contact  [x] ,"),  # a contact is no file: no media_id
    ({"NumMedia": "1", "MediaUrl0": "https://x/a.pdf", "MediaContentType0":
      "application/pdf", "Body": "the invoice"}, "document https://x/a.pdf [the invoice] ,"),
])
async def test_media_variables_are_named_as_on_telegram(
        tmp_path: Path, params: dict[str, str], shown: str) -> None:
    flows = MEDIA_FLOWS.replace('validation = "media"', "").replace(
        "{{receipt}}", "{{media_id}}")
    async with whatsapp_harness(tmp_path, flows) as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        h.new_bodies()
        await h.post("/twilio/whatsapp", twilio_form(**{"Body": "x", **params}))
        assert h.new_bodies() == [shown]


async def test_a_block_with_a_file_sends_it_as_media_url(tmp_path: Path) -> None:
    flows = """
    [flows.main]
    start = "photo"
    [flows.main.blocks.photo]
    type = "message"
    text = "Your ticket"
    image = "https://cdn.example/t.png"
    next = "terms"
    [flows.main.blocks.terms]
    type = "end"
    [flows.main.blocks.terms_doc]
    type = "message"
    document = "https://cdn.example/terms.pdf"
    """.replace('type = "end"', 'type = "jump"\n    block = "terms_doc"')
    async with whatsapp_harness(tmp_path, flows) as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        sends = h.new_sends()
        assert [(f.get("Body"), f.get("MediaUrl")) for f in sends] == [
            ("Your ticket", "https://cdn.example/t.png"),
            (None, "https://cdn.example/terms.pdf")]  # a file alone: no Body


SEATS = """
[flows.main]
start = "pick"
[flows.main.blocks.pick]
type = "buttons"
image = "https://cdn.example/seats.png"
text = "Pick a seat"
choices = [{ label = "Window", next = "bye" }, { label = "Aisle", next = "bye" }]
[flows.main.blocks.bye]
type = "end"
text = "Bye"
"""  # a question with a picture (the file's failures)

async def test_a_media_url_twilio_refuses_still_delivers_the_question_and_its_choices(
        tmp_path: Path) -> None:
    """Twilio answers 400 / 21620 for a MediaUrl it cannot use: the text and the numbered
    choices go anyway, with the URL in the text, or the user could never answer."""
    async with whatsapp_harness(tmp_path, SEATS) as h:
        h.twilio.fail_next(400, 21620, "Invalid media URL(s)")
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        sends = h.new_sends()
        assert [(f.get("Body"), f.get("MediaUrl")) for f in sends] == [
            ("Pick a seat\n\nhttps://cdn.example/seats.png\n\n1. Window\n2. Aisle\n\n"
             "Reply 1 or 2.", None)]
        assert [r[0] for r in await h.sql("SELECT state FROM outbox")] == ["sent"]
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "1" * 32, Body="2"))
        assert h.new_bodies() == ["Bye"]


@pytest.mark.parametrize(("change", "code"), [
    ({"MessageSid": ""}, "missing_message_sid"),
    ({"From": "+4915112345678"}, "not_whatsapp"),
])
def test_unusable_messages_are_refused(change: dict[str, str], code: str) -> None:
    with pytest.raises(BadRequest) as err:
        inbound_event({**form("inbound_text"), **change})
    assert err.value.code == code


# -- what is sent -----------------------------------------------------------------------------

SERVER = ServerConfig(public_url="https://bot.example.com", path_prefix="/bot")
TAG = "70d4e21d"
BUTTONS = (Button("Pay", f"{TAG}:0"), Button("Wait", f"{TAG}:1"))
LINK = Link("https://bot.example.com/bot/pay?executionId=abc&amount=5", "Pay 5 EUR")


def channel(**config: Any) -> WhatsAppChannel:
    cfg = WhatsAppConfig(enabled=True, account_sid=ACCOUNT_SID, from_=SANDBOX, **config)
    return WhatsAppChannel(cfg, SERVER, runtime=cast(Any, None))


def test_plain_text_buttons_and_link() -> None:
    ch = channel()
    assert ch.params(Message("Hello")) == {"body": "Hello"}
    assert ch.params(Message("Pick", (Button("Yes", f"{TAG}:0"),))) == {
        "body": "Pick\n\n1. Yes\n\nReply 1."}
    assert ch.params(Message("Pick", BUTTONS)) == {
        "body": "Pick\n\n1. Pay\n2. Wait\n\nReply 1 or 2."}
    assert ch.params(Message("Open the page.", link=LINK)) == {
        "body": f"Open the page.\nPay 5 EUR: {LINK.url}"}


def test_quick_reply_template() -> None:
    ch = channel(buttons_content_sid=((2, "HX" + "2" * 32), (3, "HX" + "3" * 32)))
    params = ch.params(Message("Pick", BUTTONS))
    assert params["content_sid"] == "HX" + "2" * 32
    assert json.loads(params["content_variables"]) == {
        "1": "Pick", "2": "Pay", "3": f"{TAG}:0", "4": "Wait", "5": f"{TAG}:1"}
    assert "body" not in params


@pytest.mark.parametrize("message", [
    Message("Pick", (Button("Yes", f"{TAG}:0"),)),  # no template with one button
    Message("Pick", (Button("A label longer than twenty", f"{TAG}:0"), BUTTONS[1])),
    Message("", BUTTONS),  # WhatsApp refuses an empty variable
    Message(" \n ", BUTTONS),  # or a blank one
    Message("x" * 1025, BUTTONS),
])
def test_messages_that_do_not_fit_the_template_go_as_text(message: Message) -> None:
    ch = channel(buttons_content_sid=((2, "HX" + "2" * 32),))
    assert set(ch.params(message)) == {"body"}


def test_call_to_action_template() -> None:
    ch = channel(webview_content_sid="HX" + "4" * 32)
    params = ch.params(Message("Open the page.", link=LINK))
    assert params["content_sid"] == "HX" + "4" * 32
    assert json.loads(params["content_variables"]) == {
        "1": "Open the page.", "2": "pay?executionId=abc&amount=5", "3": "Pay 5 EUR"}
    # a page elsewhere does not fit a template whose URL starts with our public_url
    other = Link("https://pay.example.net/checkout?executionId=abc", "Pay")
    assert set(ch.params(Message("Open the page.", link=other))) == {"body"}
    # unless webview_url_base says so
    ch = channel(webview_content_sid="HX" + "4" * 32, webview_url_base="https://pay.example.net")
    assert json.loads(ch.params(Message("Go", link=other))["content_variables"])["2"] == (
        "checkout?executionId=abc")


def test_rate_limit() -> None:
    assert WhatsAppChannel.rate_limit == RateLimit(per_chat_per_second=1.0,
                                                   global_per_second=80.0, burst=3)


async def test_default_api_base_url_is_twilios(tmp_path: Path) -> None:
    """Captured with aioresponses: the real twilio client builds the real URL and form."""
    config = whatsapp_config(tmp_path, FLOWS, api_base_url="https://api.twilio.com",
                             whatsapp="status_callback = true")
    assert config.channels.whatsapp.api_base_url == "https://api.twilio.com"
    ch = WhatsAppChannel.create(config, cast(Any, None))
    url = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    with aioresponses(passthrough=["http://127.0.0.1"]) as mock:
        await ch.start()
        try:
            mock.post(url, status=201, payload={"sid": "SM" + "1" * 32, "status": "queued"})
            sid = await ch.send(Delivery(7, 1, USER, Message("Pick", BUTTONS)))
        finally:
            await ch.stop()
    assert sid == "SM" + "1" * 32
    [(method, called)] = mock.requests
    assert (method, str(called)) == ("POST", url)
    [call] = mock.requests[(method, called)]
    assert call.kwargs["data"] == {
        "To": USER, "From": SANDBOX, "Body": "Pick\n\n1. Pay\n2. Wait\n\nReply 1 or 2.",
        "StatusCallback": "http://bot.test/twilio/status"}


# -- delivery errors --------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "code", "headers", "permanent", "retry_after"), [
    (400, 63016, {}, True, None),
    (400, 21211, {}, True, None),  # invalid 'To' number
    (401, 20003, {}, True, None),
    (429, 20429, {"Retry-After": "12"}, False, 12.0),
    (429, 20429, {}, False, None),
    (500, 20500, {}, False, None),
    (503, 20503, {"Retry-After": "5"}, False, 5.0),
])
async def test_send_errors(tmp_path: Path, status: int, code: int, headers: dict[str, str],
                           permanent: bool, retry_after: float | None) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        h.twilio.fail_next(status, code, "Something", **headers)
        with pytest.raises(SendError) as err:
            await h.channel.send(Delivery(1, 1, USER, Message("Hello")))
        assert (err.value.permanent, err.value.code, err.value.retry_after) == (
            permanent, str(code), retry_after)
        assert h.twilio.posts == [{"To": USER, "From": SANDBOX, "Body": "Hello"}]


async def test_long_text_goes_in_parts_and_a_retry_sends_only_the_rest(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        text = "\n".join(f"line {i:04d} " + "x" * 60 for i in range(60))  # ~4,200 characters
        delivery = Delivery(1, 1, USER, Message(text))
        h.twilio.succeed_next()
        h.twilio.fail_next(500, 20500, "Internal error")  # the second part fails once
        with pytest.raises(SendError):
            await h.channel.send(delivery)
        await h.channel.send(delivery)  # the outbox's retry
        parts = h.twilio.bodies()
        assert len(parts) == 3 and all(len(part) <= 1600 for part in parts)
        assert "\n".join(parts) == text
        # the user got each part once: the retry did not send the first part again
        assert [post["Body"] for post in h.twilio.posts] == [parts[0], parts[1], *parts[1:]]


async def test_unreachable_api_is_transient(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        await h.twilio.close()
        with pytest.raises(SendError) as err:
            await h.channel.send(Delivery(1, 1, USER, Message("Hello")))
        assert not err.value.permanent


async def test_empty_message_is_not_sent(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOWS) as h:
        assert await h.channel.send(Delivery(1, 1, USER, Message(""))) is None
        assert await h.channel.send(Delivery(2, 1, USER, Message(" \n "))) is None
        assert h.twilio.posts == []


# -- start-up, secrets, config ----------------------------------------------------------------

async def test_missing_auth_token_is_a_clear_error_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    config = whatsapp_config(tmp_path, FLOWS, api_base_url="http://127.0.0.1:9")
    ch = WhatsAppChannel.create(config, cast(Any, None))
    with pytest.raises(FlowbotError, match="environment variable TWILIO_AUTH_TOKEN is not set"):
        await ch.start()


async def test_auth_token_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        async with whatsapp_harness(tmp_path, FLOWS, whatsapp="status_callback = true") as h:
            h.twilio.fail_next(401, 20003, "Authenticate")
            await h.post("/twilio/whatsapp", payload("inbound_text"))
            await h.post("/twilio/whatsapp", payload("quick_reply"), signature="forged")
            await h.post("/twilio/status", payload("status_failed"))
    assert caplog.records
    assert AUTH_TOKEN not in caplog.text
    assert not any(AUTH_TOKEN in str(r.args) for r in caplog.records)


def test_config_keys(tmp_path: Path) -> None:
    cfg = whatsapp_config(tmp_path, FLOWS, api_base_url="https://api.twilio.com/", whatsapp="""
        public_url = "https://bot.example.com/"
        webview_content_sid = "HX44444444444444444444444444444444"
        webview_url_base = "https://pay.example.net/"
        status_callback = true
        [channels.whatsapp.buttons_content_sid]
        3 = "HX33333333333333333333333333333333"
        2 = "HX22222222222222222222222222222222"
    """).channels.whatsapp
    assert cfg.public_url == "https://bot.example.com"
    assert cfg.api_base_url == "https://api.twilio.com"
    assert cfg.buttons_content_sid == ((2, "HX" + "2" * 32), (3, "HX" + "3" * 32))
    assert cfg.webview_url_base == "https://pay.example.net"
    assert cfg.status_callback is True


def test_config_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        whatsapp_config(tmp_path, FLOWS, api_base_url="api.twilio.com", whatsapp="""
            buttons_content_sid = "HX22222222222222222222222222222222"
            webview_content_sid = "MG1"
            auth_token = "abc"
        """)
    errors = "\n".join(err.value.errors)
    assert "channels.whatsapp.api_base_url: must start with http:// or https://" in errors
    assert re.search(r"channels\.whatsapp\.buttons_content_sid: must be a table from the number "
                     r"of buttons to a Content SID", errors)
    assert "channels.whatsapp.webview_content_sid: must be a Content SID" in errors
    assert "channels.whatsapp.auth_token: secrets are not written in the config" in errors
    with pytest.raises(ConfigError) as err:
        whatsapp_config(tmp_path, FLOWS, api_base_url="https://api.twilio.com", whatsapp="""
            buttons_content_sid = { two = "HX2", 11 = "HX1", 3 = "MG3" }
        """)
    assert err.value.errors == [
        "channels.whatsapp.buttons_content_sid.two: must be a number of buttons, 1..10",
        "channels.whatsapp.buttons_content_sid.11: must be a number of buttons, 1..10",
        "channels.whatsapp.buttons_content_sid.3: must be a Content SID (starts with HX)",
    ]
