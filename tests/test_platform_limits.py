"""The platform endpoints' own body limits as config keys ([channels.telegram]
max_update_bytes, [channels.whatsapp] max_body_bytes), and the count of platform updates
answered 200 but not used (flowbot_platform_updates_ignored_total), read from GET /metrics."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from bot.channel_config import TELEGRAM_MAX_UPDATE_BYTES, WHATSAPP_MAX_BODY_BYTES
from bot.config import load_config
from bot.errors import ConfigError
from channels.whatsapp import EMPTY_TWIML
from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
    payload,
)
from tests.fake_twilio import whatsapp_harness
from tests.test_telegram import SECRET, env, telegram, tg_config  # noqa: F401 - env
from tests.test_whatsapp import twilio_form

FLOW = """
[flows.main]
start = "a"
[flows.main.blocks.a]
type = "end"
text = "got {{last_message}}"
"""


def load(tmp_path: Path, channels: str) -> Any:
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        public_url = "https://bot.example"
        [channels.web]
        enabled = false
        {channels}
    """) + FLOW)
    return load_config(path)


def test_the_limits_default_to_the_platforms_maxima(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.channels.telegram.max_update_bytes == TELEGRAM_MAX_UPDATE_BYTES == 1048576
    assert config.channels.whatsapp.max_body_bytes == WHATSAPP_MAX_BODY_BYTES == 262144
    config = load(tmp_path, """
        [channels.telegram]
        max_update_bytes = 2097152
        [channels.whatsapp]
        max_body_bytes = 65536
    """)
    assert config.channels.telegram.max_update_bytes == 2097152
    assert config.channels.whatsapp.max_body_bytes == 65536


@pytest.mark.parametrize(("table", "error"), [
    ("[channels.telegram]\nmax_update_bytes = 65536",
     "channels.telegram.max_update_bytes: must be 131072..16777216, not 65536"),
    ("[channels.telegram]\nmax_update_bytes = 99999999",
     "channels.telegram.max_update_bytes: must be 131072..16777216, not 99999999"),
    ('[channels.telegram]\nmax_update_bytes = "1 MiB"',
     "channels.telegram.max_update_bytes: must be a whole number"),
    ("[channels.whatsapp]\nmax_body_bytes = 1024",
     "channels.whatsapp.max_body_bytes: must be 32768..16777216, not 1024"),
    ("[channels.whatsapp]\nmax_body_bytes = 1.5",
     "channels.whatsapp.max_body_bytes: must be a whole number"),
])
def test_check_refuses_limits_outside_their_range(tmp_path: Path, table: str,
                                                  error: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, table)
    assert any(e.startswith(error) for e in info.value.errors), info.value.errors


async def ignored(client: TestClient[Any, Any], channel: str) -> dict[str, float]:
    """flowbot_platform_updates_ignored_total of one channel, by reason, from GET /metrics."""
    text = await (await client.get("/metrics")).text()
    found = re.findall(r'^flowbot_platform_updates_ignored_total\{channel="(\w+)",'
                       r'reason="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {reason: float(value) for ch, reason, value in found if ch == channel}


async def test_telegram_uses_its_configured_limit_and_counts_what_it_ignores(
        tmp_path: Path, fake: FakeTelegram) -> None:
    config = tg_config(tmp_path, fake, telegram="max_update_bytes = 200000", flows=FLOW)
    async with telegram(config, fake) as tg:
        counts = await ignored(tg.client, "telegram")
        assert counts == dict.fromkeys(
            ("too_large", "bad_json", "not_an_update", "unsupported", "other"), 0.0)
        update = payload("text_message")
        update["message"]["text"] = "é" * 25_000  # ~150 KB as \u-escaped JSON: taken
        assert 140_000 < len(json.dumps(update)) < 200_000
        status, _ = await tg.post_update(update)
        assert status == 200 and fake.sent()[0]["text"].startswith("got éé")
        big = payload("text_message")
        big["update_id"] += 1
        big["message"]["text"] = "é" * 40_000  # ~240 KB: over this config's limit
        status, doc = await tg.post_update(big)
        assert status == 200 and doc["reason"] == "too_large"
        assert "max_update_bytes" in doc["message"]
        headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
        for body in (b"{not json", b'{"update_id": 1, "message": [[[' + b"[" * 300 + b"]}",
                     json.dumps({"message": {}}).encode()):
            resp = await tg.client.post("/telegram", data=body, headers=headers)
            assert resp.status == 200
        sticker = payload("text_message")
        sticker["update_id"] += 2
        del sticker["message"]["text"]
        sticker["message"]["sticker"] = {
            "file_id": "CAACAgIAAxkBAAIB", "file_unique_id": "s1", "type": "regular",
            "width": 512, "height": 512, "is_animated": False, "is_video": False}
        assert (await tg.post_update(sticker))[0] == 200
        assert await ignored(tg.client, "telegram") == {
            "too_large": 1.0, "bad_json": 2.0, "not_an_update": 1.0, "unsupported": 1.0,
            "other": 0.0}
        resp = await tg.client.post("/telegram", data=b"{}", headers={
            "X-Telegram-Bot-Api-Secret-Token": "wrong"})
        assert resp.status == 403  # not Telegram: refused, not counted
        assert sum((await ignored(tg.client, "telegram")).values()) == 5.0


@pytest.mark.usefixtures("twilio_auth_token")
async def test_whatsapp_uses_its_configured_limit_and_counts_what_it_ignores(
        tmp_path: Path) -> None:
    async with whatsapp_harness(tmp_path, FLOW, whatsapp="max_body_bytes = 40000") as h:
        status, _ = await h.post("/twilio/whatsapp", twilio_form(Body="x" * 30_000))
        assert status == 200 and h.new_bodies()[0].startswith("got xxx")  # 30 KB: taken
        status, doc = await h.post("/twilio/whatsapp", twilio_form(
            MessageSid="SM" + "2" * 32, Body="x" * 50_000))
        assert status == 413
        assert doc == {"error": "too_large", "message": "The form is larger than 40000 bytes "
                       "([channels.whatsapp] max_body_bytes), more than Twilio posts."}
        # a message with nothing a flow can take: 200, no transition, counted
        events = await h.sql("SELECT count(*) FROM events")
        status, doc = await h.post("/twilio/whatsapp", twilio_form(
            MessageSid="SM" + "3" * 32, MessageType="unsupported"))
        assert (status, doc) == (200, EMPTY_TWIML)
        assert h.new_bodies() == []
        assert await h.sql("SELECT count(*) FROM events") == events
        assert (await ignored(h.client, "whatsapp"))["unsupported"] == 1.0
