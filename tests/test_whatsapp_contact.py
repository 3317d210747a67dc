"""A contact shared on WhatsApp: Twilio posts it as a vCard behind MediaUrl0 (Basic auth);
the channel reads its name and number into `contact_name` / `contact_phone`, as Telegram
gives them. The vCard reader is tested on the shapes phones write."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import aiohttp
import pytest

from channels.vcard import Contact, decode, parse
from tests.fake_twilio import ACCOUNT_SID, AUTH_TOKEN, sign, whatsapp_harness
from tests.test_whatsapp import twilio_form

pytestmark = pytest.mark.usefixtures("twilio_auth_token")

# as WhatsApp on Android writes a shared contact (vCard 3.0, waid parameter, item groups)
WA_CARD = (
    "BEGIN:VCARD\r\nVERSION:3.0\r\nN:Hopper;Grace;Brewster;Rear Admiral;\r\n"
    "FN:Grace Hopper\r\nitem1.TEL;waid=4915112345678:+49 151 12345678\r\n"
    "item1.X-ABLabel:Mobile\r\nEND:VCARD\r\n")


# -- the reader ------------------------------------------------------------------------------

@pytest.mark.parametrize(("card", "expected"), [
    (WA_CARD, Contact("Grace Hopper", "+49 151 12345678")),
    # folded lines (RFC 6350 3.2): CRLF + one space or tab continues the line
    ("BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Grace\r\n  Hopper\r\nTEL:+1 555\r\n 0100\r\nEND:VCARD",
     Contact("Grace Hopper", "+1 5550100")),
    ("BEGIN:VCARD\nFN:Ada\n\tLovelace\nTEL:1\nEND:VCARD", Contact("AdaLovelace", "1")),
    # several numbers: the preferred one (3.0 TYPE=pref, 4.0 PREF=1, 2.1 bare PREF), else first
    ("BEGIN:VCARD\r\nFN:A\r\nTEL;TYPE=HOME:+1 111\r\nTEL;TYPE=CELL,pref:+1 222\r\nEND:VCARD",
     Contact("A", "+1 222")),
    ("BEGIN:VCARD\r\nVERSION:4.0\r\nFN:A\r\nTEL;VALUE=uri;TYPE=work:tel:+1-333\r\n"
     "TEL;VALUE=uri;PREF=1;TYPE=cell:tel:+1-444\r\nEND:VCARD", Contact("A", "+1-444")),
    ("BEGIN:VCARD\nVERSION:2.1\nFN:A\nTEL;HOME:111\nTEL;CELL;PREF:222\nEND:VCARD",
     Contact("A", "222")),
    ("BEGIN:VCARD\r\nFN:A\r\nTEL;TYPE=HOME:+1 111\r\nTEL;TYPE=CELL:+1 222\r\nEND:VCARD",
     Contact("A", "+1 111")),
    # vCard 2.1 quoted-printable in its CHARSET, with a soft line break
    ("BEGIN:VCARD\r\nVERSION:2.1\r\nN;CHARSET=UTF-8;ENCODING=QUOTED-PRINTABLE:M=C3=BCller;J=\r\n"
     "=C3=BCrgen;;;\r\nTEL;CELL:+49 30 1\r\nEND:VCARD", Contact("Jürgen Müller", "+49 30 1")),
    ("BEGIN:VCARD\r\nVERSION:2.1\r\nFN;CHARSET=ISO-8859-1;QUOTED-PRINTABLE:Ren=E9e\r\n"
     "END:VCARD", Contact("Renée", "")),
    # no FN: N as "Given Family"; escapes undone (RFC 6350 3.4)
    ("BEGIN:VCARD\r\nN:O\\;Brien;Conan;;;\r\nEND:VCARD", Contact("Conan O;Brien", "")),
    ("BEGIN:VCARD\r\nFN:Smith\\, John\r\nEND:VCARD", Contact("Smith, John", "")),
    # a quoted parameter may hold ":" and ";"
    ('BEGIN:VCARD\r\nFN;X-NOTE="a:b;c":Bo\r\nTEL;TYPE="cell,voice":+1 9\r\nEND:VCARD',
     Contact("Bo", "+1 9")),
    # right-to-left and astral text pass through untouched
    ("BEGIN:VCARD\r\nFN:מרים כהן 👩‍💻\r\nTEL:+972 50 1\r\nEND:VCARD",
     Contact("מרים כהן 👩‍💻", "+972 50 1")),
    # several cards: the first; lines outside a card and garbage are skipped
    ("junk\r\nBEGIN:VCARD\r\nFN:First\r\nEND:VCARD\r\nBEGIN:VCARD\r\nFN:Second\r\nEND:VCARD",
     Contact("First", "")),
    ("not a vcard at all", Contact()),
    ("", Contact()),
    ("BEGIN:VCARD\r\nFN\r\n:\r\nTEL;:\r\nEND:VCARD", Contact()),
])
def test_vcard_reader(card: str, expected: Contact) -> None:
    assert parse(card) == expected


def test_vcard_bytes_are_decoded_in_the_named_charset_else_utf8_else_latin1() -> None:
    assert decode("Müller".encode("cp1252"), "windows-1252") == "Müller"
    assert decode("Müller".encode()) == "Müller"
    assert decode("Müller".encode("latin-1")) == "Müller"  # not UTF-8: Latin-1
    assert decode(b"x", "no-such-charset") == "x"


# -- through the channel ---------------------------------------------------------------------

SHOW = """
[flows.main]
start = "show"
[flows.main.blocks.show]
type = "end"
text = "{{media_type}}|{{media_id}}|{{contact_name}}|{{contact_phone}}|{{last_message}}"
"""
CONTACT_SID = "ME" + "c" * 32


def contact_form(url: str, content_type: str = "text/vcard") -> str:
    return twilio_form(NumMedia="1", MediaUrl0=url, MediaContentType0=content_type)


@pytest.mark.parametrize("content_type", ["text/vcard", "text/x-vcard"])
@pytest.mark.parametrize("redirect", [False, True])
async def test_a_shared_contact_fills_contact_name_and_phone(
        tmp_path: Path, content_type: str, redirect: bool) -> None:
    async with whatsapp_harness(tmp_path, SHOW) as h:
        h.twilio.media[CONTACT_SID] = (f"{content_type}; charset=utf-8", WA_CARD.encode())
        h.twilio.media_redirect = redirect
        status, _ = await h.post("/twilio/whatsapp",
                                 contact_form(h.twilio.media_url(CONTACT_SID), content_type))
        assert status == 200
        # named and filled as on Telegram; a contact is no file: no media_id
        assert h.new_bodies() == ["contact||Grace Hopper|+49 151 12345678|"]
        fetched = [(p.rsplit("/", 1)[1], auth) for p, auth in h.twilio.media_gets]
        # Basic auth to Twilio; none to the presigned file store it redirects to
        assert fetched == [(CONTACT_SID, True)] + ([(CONTACT_SID, False)] if redirect else [])


async def test_the_fake_serves_media_only_with_the_right_basic_auth(tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, SHOW) as h:
        h.twilio.media[CONTACT_SID] = ("text/vcard", WA_CARD.encode())
        url = h.twilio.url + h.twilio.media_url(CONTACT_SID).removeprefix(
            "https://api.twilio.com")
        async with aiohttp.ClientSession() as http:
            for user, password, status in [(ACCOUNT_SID, AUTH_TOKEN, 200),
                                           (ACCOUNT_SID, "0" * 32, 401),
                                           ("AC" + "0" * 32, AUTH_TOKEN, 401)]:
                async with http.get(url, auth=aiohttp.BasicAuth(user, password)) as resp:
                    assert resp.status == status
            async with http.get(url) as resp:
                assert resp.status == 401
            basic = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
            async with http.get(url, headers={"Authorization": f"Bearer {basic}"}) as resp:
                assert resp.status == 401


async def test_a_contact_whose_vcard_is_refused_still_reaches_the_flow(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Wrong credentials (the console's token changed): 401 from Twilio, logged with the
    hint; the flow gets the contact without name and phone, the webhook is answered 200."""
    async with whatsapp_harness(tmp_path, SHOW) as h:
        h.twilio.media[CONTACT_SID] = ("text/vcard", WA_CARD.encode())
        h.twilio.auth_token = "0" * 32  # Twilio now wants another token than ours
        body = contact_form(h.twilio.media_url(CONTACT_SID))
        with caplog.at_level(logging.WARNING, logger="channels.whatsapp"):
            resp = await h.client.post("/twilio/whatsapp", data=body.encode(), headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": sign(h.channel.inbound_url, body)})
        assert resp.status == 200
        assert h.twilio.media_gets == [(h.twilio.media_gets[0][0], False)]
        assert "Twilio answered 401 (check channels.whatsapp.account_sid" in caplog.text
        h.twilio.auth_token = AUTH_TOKEN
        await h.outbox.drain()
        assert h.new_bodies() == ["contact||||"]
        assert h.runtime.metrics["whatsapp_vcard_unread"] == 1


@pytest.mark.parametrize("case", ["missing", "not_twilio", "timeout"])
async def test_an_unreadable_vcard_leaves_the_contact_without_name_and_phone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    async with whatsapp_harness(tmp_path, SHOW) as h:
        url = h.twilio.media_url(CONTACT_SID)  # nothing stored under it: 404
        if case == "not_twilio":
            url = "https://evil.example/c.vcf"  # credentials go to Twilio only
        if case == "timeout":
            h.twilio.media[CONTACT_SID] = ("text/vcard", WA_CARD.encode())
            h.twilio.media_hang = asyncio.Event()
            h.channel.vcard_timeout = 0.2  # a network timeout: the loop's clock, not ours
        with caplog.at_level(logging.WARNING, logger="channels.whatsapp"):
            status, _ = await h.post("/twilio/whatsapp", contact_form(url))
        if h.twilio.media_hang is not None:
            h.twilio.media_hang.set()
        assert status == 200
        assert h.new_bodies() == ["contact||||"]
        assert "its vCard was not read" in caplog.text
        expected = {"missing": "Twilio answered 404", "not_twilio": "not a Twilio media URL",
                    "timeout": "fetching it failed: "}[case]
        assert expected in caplog.text
        assert h.twilio.media_gets == ([] if case == "not_twilio" else [
            (h.twilio.media_gets[0][0], True)])


async def test_a_large_vcard_is_read_up_to_the_cap(tmp_path: Path) -> None:
    """A card with a photo: name and number come first, the photo is cut off."""
    photo = "PHOTO;ENCODING=b;TYPE=JPEG:" + "A" * 200_000 + "\r\n"
    card = WA_CARD.replace("END:VCARD", photo + "END:VCARD")
    async with whatsapp_harness(tmp_path, SHOW) as h:
        h.twilio.media[CONTACT_SID] = ("text/vcard", card.encode())
        await h.post("/twilio/whatsapp", contact_form(h.twilio.media_url(CONTACT_SID)))
        assert h.new_bodies() == ["contact||Grace Hopper|+49 151 12345678|"]


ASK = """
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
text = "got {{media_type}}"
"""


@pytest.mark.parametrize("params", [
    {"Latitude": "52.520008", "Longitude": "13.404954"},
    {"NumMedia": "1", "MediaContentType0": "text/vcard"},
])
async def test_media_validation_asks_again_for_a_location_or_a_contact(
        tmp_path: Path, params: dict[str, str]) -> None:
    """validation = "media" wants a file: a location or a contact is not one."""
    async with whatsapp_harness(tmp_path, ASK) as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        assert h.new_bodies() == ["Send the receipt"]
        h.twilio.media[CONTACT_SID] = ("text/vcard", WA_CARD.encode())
        if "MediaContentType0" in params:
            params = {**params, "MediaUrl0": h.twilio.media_url(CONTACT_SID)}
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "1" * 32, **params))
        assert h.new_bodies() == ["Please send a photo, a file or a link.", "Send the receipt"]
        await h.post("/twilio/whatsapp", twilio_form(
            MessageSid="SM" + "2" * 32, NumMedia="1", MediaUrl0="https://x/v.mp4",
            MediaContentType0="video/mp4"))
        assert h.new_bodies() == ["got video"]


async def test_a_redelivered_contact_is_handled_once(tmp_path: Path) -> None:
    """Twilio may post a MessageSid again; the card is read again (before the commit that
    dedupes), the flow sees the contact once."""
    async with whatsapp_harness(tmp_path, SHOW) as h:
        h.twilio.media[CONTACT_SID] = ("text/vcard", WA_CARD.encode())
        body = contact_form(h.twilio.media_url(CONTACT_SID))
        assert (await h.post("/twilio/whatsapp", body))[0] == 200
        assert (await h.post("/twilio/whatsapp", body))[0] == 200
        assert h.new_bodies() == ["contact||Grace Hopper|+49 151 12345678|"]
        assert await h.sql("SELECT count(*) FROM events") == [(1,)]
