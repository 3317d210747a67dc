"""The platform endpoints in the shipped OpenAPI document (bot/openapi.json): each answer
the real channel gives is a documented status, with a body of the documented schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis

import bot
from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
    payload,
)
from tests.fake_twilio import sign, whatsapp_harness
from tests.test_telegram import SECRET, env, telegram, tg_config  # noqa: F401 - env
from tests.test_whatsapp import twilio_form

SPEC_PATH = Path(bot.__file__).parent / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())


def check(path: str, status: int, content_type: str, body: Any) -> None:
    """`status` is documented for POST `path`, and `body` fits its schema."""
    responses = SPEC["paths"][path]["post"]["responses"]
    assert str(status) in responses, f"{path} answered {status}, which is not documented"
    content = responses[str(status)]["content"]
    assert content_type in content, f"{path} {status}: {content_type} not documented"
    schema = {**content[content_type]["schema"], "components": SPEC["components"]}
    if content_type == "application/json":
        jsonschema_rs.validator_for(schema).validate(body)


def test_the_document_is_valid_openapi_with_the_platform_endpoints() -> None:
    schema = schemathesis.openapi.from_path(SPEC_PATH)
    operations = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert {("POST", "/telegram"), ("POST", "/twilio/whatsapp"),
            ("POST", "/twilio/status")} <= operations


async def test_telegram_answers_as_documented(tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        update = payload("text_message")
        resp = await tg.client.post("/telegram", json=update,
                                    headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
        assert resp.status == 200 and await resp.read() == b""
        for body, secret, status in [(b"{not json", SECRET, 200), (b"[]", SECRET, 200),
                                     (b"{}", "wrong", 403), (b"{}", None, 403)]:
            headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
            resp = await tg.client.post("/telegram", data=body, headers=headers)
            assert resp.status == status
            check("/telegram", status, resp.content_type, await resp.json())


@pytest.mark.usefixtures("twilio_auth_token")
async def test_twilio_endpoints_answer_as_documented(tmp_path: Path) -> None:
    flows = """
    [flows.main]
    start = "a"
    [flows.main.blocks.a]
    type = "end"
    text = "hi"
    """
    async with whatsapp_harness(tmp_path, flows, whatsapp="status_callback = true\n"
                                "max_body_bytes = 40000") as h:
        cases = [
            ("/twilio/whatsapp", twilio_form(Body="hello"), None, 200),
            ("/twilio/whatsapp", twilio_form(Body="hello"), "forged", 403),
            ("/twilio/whatsapp", twilio_form(MessageSid=""), None, 400),
            ("/twilio/whatsapp", twilio_form(From="+4915112345678"), None, 400),
            ("/twilio/whatsapp", twilio_form(Body="x" * 50_000), None, 413),
            ("/twilio/status", "MessageSid=SM1&MessageStatus=delivered", None, 200),
            ("/twilio/status", "MessageSid=SM1", None, 400),
            ("/twilio/status", "MessageSid=SM1&MessageStatus=read", "forged", 403),
        ]
        for route, body, signature, status in cases:
            url = h.channel.status_url if route == "/twilio/status" else h.channel.inbound_url
            resp = await h.client.post(route, data=body.encode(), headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": signature or sign(url, body)})
            assert resp.status == status, (route, body[:40])
            doc = await resp.json() if resp.content_type == "application/json" else None
            check(route, status, resp.content_type, doc)
