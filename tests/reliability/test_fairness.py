"""Fair delivery: one chat's backlog, held back by that chat's own rate limit, never delays
another chat's messages. Through the real channels (PTB against the fake Bot API, twilio
against the fake Messages API, the web chat's WebSocket) with their real rate limits and
the outbox's own loop running, as in production.

The figure (first-reply latency of a fresh chat behind a 1,000-row backlog) is printed
with `pytest tests/reliability/test_fairness.py -s` and recorded in bench/README.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.clock import FakeClock
from bot.outbox import Outbox
from bot.server import OUTBOX, build_app, enabled_channels
from channels.base import Message
from storage.store import Store
from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    TOKEN,
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
    payload,
)
from tests.fake_twilio import SANDBOX, sign, whatsapp_harness
from tests.support import write_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*attribute `retry_after`:telegram.warnings.PTBDeprecationWarning")

BACKLOG = 1000
BOUND = 2.0  # seconds: the bound for the fresh chat's first reply
FLOWS = """
[flows.main]
start = "hello"
[flows.main.blocks.hello]
type = "end"
text = "Hello, fresh chat"
"""


def seed_backlog(store: Store, channel: str, user: str, count: int, now: float) -> int:
    """A database job: `count` due outbox rows for one conversation, as a burst of
    replies to a flooding user leaves them. Returns the conversation id."""
    conv = store.conversation(channel, user, f"backlog-{channel}-{user}", now)
    store.conn.executemany(
        "INSERT INTO outbox (conversation_id, channel, user_id, message, next_attempt, created)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(conv.id, channel, user, Message(f"backlog {i}").to_json(), now, now)
         for i in range(count)])
    return conv.id


@contextlib.asynccontextmanager
async def outbox_loop(outbox: Outbox) -> AsyncIterator[None]:
    """The outbox's own loop, as `flowbot serve` runs it."""
    task = asyncio.create_task(outbox.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def first_reply_latency(outbox: Outbox, channel: str, busy_user: str,
                              backlog_started: Callable[[], bool],
                              fresh_chat: Callable[[], Awaitable[None]],
                              replied: Callable[[], bool], clock: FakeClock) -> float:
    """Seed the backlog, let the outbox start on it, then time the fresh chat's reply."""
    await outbox.worker.run(seed_backlog, channel, busy_user, BACKLOG, clock.now())
    async with outbox_loop(outbox):
        outbox.notify()
        await until(backlog_started)
        start = time.monotonic()
        await fresh_chat()
        await until(replied, timeout=10)
        latency = time.monotonic() - start
    print(f"\n{channel}: first reply of a fresh chat behind a {BACKLOG}-row backlog: "
          f"{latency * 1000:.0f} ms")
    return latency


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """A safety cap, not a sleep: returns as soon as `check()` holds."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not met within {timeout} s")
        await asyncio.sleep(0.005)


async def test_telegram_fresh_chat_is_not_queued_behind_a_rate_limited_chat(
        tmp_path: Path, fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "secret")
    config = write_config(tmp_path, FLOWS, f"""
        [channels.telegram]
        enabled = true
        api_base_url = "{fake.base_url}"
    """)
    clock = FakeClock()
    app = build_app(config, channel_factories=enabled_channels(config), clock=clock,
                    run_background=False)
    busy, fresh = 1001, 1002

    def to(chat: int) -> list[str]:
        return [p["text"] for p in fake.sent() if int(p["chat_id"]) == chat]

    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        async def fresh_chat() -> None:
            update = payload("text_message")
            update["message"]["chat"]["id"] = update["message"]["from"]["id"] = fresh
            resp = await client.post("/telegram", json=update,
                                     headers={"X-Telegram-Bot-Api-Secret-Token": "secret"})
            assert resp.status == 200

        latency = await first_reply_latency(
            app[OUTBOX], "telegram", str(busy), lambda: bool(to(busy)), fresh_chat,
            lambda: bool(to(fresh)), clock)
    assert to(fresh) == ["Hello, fresh chat"]
    assert latency < BOUND
    # the busy chat kept its own pace: a burst of 3, then about one a second
    assert 1 <= len(to(busy)) <= 3 + latency + 2
    assert to(busy) == [f"backlog {i}" for i in range(len(to(busy)))]


async def test_whatsapp_fresh_chat_is_not_queued_behind_a_rate_limited_chat(
        tmp_path: Path, twilio_auth_token: None) -> None:
    busy, fresh = "whatsapp:+4915100000001", "whatsapp:+4915100000002"
    async with whatsapp_harness(tmp_path, FLOWS, real_rate_limit=True) as wa:
        def to(user: str) -> list[str]:
            return [f["Body"] for f in wa.twilio.sent if f["To"] == user]

        async def fresh_chat() -> None:
            body = urlencode({"MessageSid": "SMfresh0000000000000000000000001", "From": fresh,
                              "To": SANDBOX, "Body": "hi", "NumMedia": "0"})
            resp = await wa.client.post("/twilio/whatsapp", data=body.encode(), headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": sign(wa.channel.inbound_url, body)})
            assert resp.status == 200

        latency = await first_reply_latency(
            wa.outbox, "whatsapp", busy, lambda: bool(to(busy)), fresh_chat,
            lambda: bool(to(fresh)), wa.clock)
        assert to(fresh) == ["Hello, fresh chat"]
        assert latency < BOUND
        assert to(busy) == [f"backlog {i}" for i in range(len(to(busy)))]
        assert len(to(busy)) <= 3 + latency + 2


async def test_web_chat_fresh_session_is_not_queued_behind_a_backlog(tmp_path: Path) -> None:
    config = write_config(tmp_path, FLOWS)
    web = replace(config.channels.web, enabled=True)
    config = replace(config, channels=replace(config.channels, web=web))
    clock = FakeClock()
    app = build_app(config, channel_factories=enabled_channels(config), clock=clock,
                    run_background=False)
    got: list[dict[str, object]] = []
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        ws = await client.ws_connect("/ws?session=" + "f" * 32 + "&after=0")
        assert json.loads((await ws.receive()).data)["type"] == "ready"

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    got.append(json.loads(msg.data))

        reader = asyncio.create_task(read())

        async def fresh_chat() -> None:
            await ws.send_json({"type": "text", "id": "m1", "text": "hi"})

        latency = await first_reply_latency(
            app[OUTBOX], "web", "b" * 32, lambda: True, fresh_chat,
            lambda: any(f.get("type") == "message" for f in got), clock)
        reader.cancel()
        await ws.close()
    assert [f["text"] for f in got if f.get("type") == "message"] == ["Hello, fresh chat"]
    assert latency < BOUND
