"""A file Twilio accepted (201) but could not fetch, told later by a status callback
(63019): the message's text and choices go again without the file, once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.fake_twilio import whatsapp_harness
from tests.test_whatsapp import SEATS, status_form, twilio_form

pytestmark = pytest.mark.usefixtures("twilio_auth_token")

QUESTION = "Pick a seat\n\n1. Window\n2. Aisle\n\nReply 1 or 2."
AGAIN = "Pick a seat\n\nhttps://cdn.example/seats.png\n\n1. Window\n2. Aisle\n\nReply 1 or 2."


def sid(n: int) -> str:
    """The SID the fake Twilio gives the n-th message it accepts."""
    return f"SM{n:032x}"


async def test_a_file_twilio_could_not_fetch_sends_the_question_again_as_text_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with whatsapp_harness(tmp_path, SEATS, whatsapp="status_callback = true") as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        assert [(f.get("Body"), f.get("MediaUrl")) for f in h.new_sends()] == [
            (QUESTION, "https://cdn.example/seats.png")]
        caplog.set_level(logging.WARNING, "channels.whatsapp")
        for _ in range(2):  # Twilio retries a callback: the second one changes nothing
            status, _ = await h.post("/twilio/status", status_form(sid(1), "failed", "63019"))
            assert status == 200
        assert [(f.get("Body"), f.get("MediaUrl")) for f in h.new_sends()] == [(AGAIN, None)]
        assert await h.sql("SELECT platform_id, state, platform_status, error FROM outbox "
                           "ORDER BY id") == [(sid(1), "sent", "failed", "63019"),
                                              (sid(2), "sent", None, None)]
        assert h.runtime.metrics["whatsapp_media_fallbacks"] == 1
        assert "its text goes again without the file" in caplog.text
        # a late "undelivered" for the same message is final too: nothing more
        await h.post("/twilio/status", status_form(sid(1), "undelivered", "63019"))
        assert h.new_sends() == []
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "1" * 32, Body="2"))
        assert h.new_bodies() == ["Bye"]  # the flow waited for the answer and goes on


async def test_a_split_message_is_matched_by_the_part_that_carried_the_file(
        tmp_path: Path) -> None:
    text = "\n".join(f"line {i:04d} " + "x" * 60 for i in range(40))  # ~2,800 characters
    flows = f'''
    [flows.main]
    start = "terms"
    [flows.main.blocks.terms]
    type = "message"
    image = "https://cdn.example/terms.png"
    text = """{text}"""
    '''
    async with whatsapp_harness(tmp_path, flows, whatsapp="status_callback = true") as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        parts = h.new_sends()
        assert [bool(f.get("MediaUrl")) for f in parts] == [True, False]
        assert "\n".join(f["Body"] for f in parts) == text
        # the row carries the SID of the part with the file, not the last part's
        assert await h.sql("SELECT platform_id FROM outbox") == [(sid(1),)]
        await h.post("/twilio/status", status_form(sid(2), "delivered"))  # the text part
        await h.post("/twilio/status", status_form(sid(1), "undelivered", "63019"))
        again = h.new_sends()
        assert all("MediaUrl" not in f for f in again)
        assert "\n".join(f["Body"] for f in again) == f"{text}\n\nhttps://cdn.example/terms.png"
        assert await h.sql("SELECT count(*) FROM early_statuses") == [(1,)]  # sid(2) only


async def test_a_file_failure_told_before_the_sent_commit_is_applied_by_that_commit(
        tmp_path: Path) -> None:
    # Twilio can call back before the outbox has stored the SID its send returned
    async with whatsapp_harness(tmp_path, SEATS, whatsapp="status_callback = true") as h:
        for _ in range(2):
            await h.post("/twilio/status", status_form(sid(1), "failed", "63019"))
        assert await h.sql("SELECT count(*) FROM outbox") == [(0,)]
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        assert [(f.get("Body"), f.get("MediaUrl")) for f in h.new_sends()] == [
            (QUESTION, "https://cdn.example/seats.png"), (AGAIN, None)]
        assert await h.sql("SELECT platform_status FROM outbox ORDER BY id") == [
            ("failed",), (None,)]


@pytest.mark.parametrize(("status", "code"), [
    ("failed", "63016"),  # outside the 24-hour window: sending again would fail the same
    ("undelivered", "30008"),
    ("delivered", ""),
])
async def test_other_statuses_of_a_message_with_a_file_send_nothing_again(
        tmp_path: Path, status: str, code: str) -> None:
    async with whatsapp_harness(tmp_path, SEATS, whatsapp="status_callback = true") as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        assert len(h.new_sends()) == 1
        await h.post("/twilio/status", status_form(sid(1), status, code))
        assert h.new_sends() == []
        assert await h.sql("SELECT platform_status FROM outbox") == [(status,)]
        assert h.runtime.metrics["whatsapp_media_fallbacks"] == 0


async def test_a_media_failure_of_a_text_message_sends_nothing_again(tmp_path: Path) -> None:
    flows = SEATS.replace('image = "https://cdn.example/seats.png"\n', "")
    async with whatsapp_harness(tmp_path, flows, whatsapp="status_callback = true") as h:
        await h.post("/twilio/whatsapp", twilio_form(MessageSid="SM" + "0" * 32, Body="hi"))
        assert h.new_bodies() == [QUESTION]
        await h.post("/twilio/status", status_form(sid(1), "failed", "63019"))
        assert h.new_sends() == []
        assert await h.sql("SELECT platform_status FROM outbox") == [("failed",)]
