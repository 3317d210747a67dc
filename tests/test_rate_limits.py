"""The platforms' rate limits, as send times on a virtual clock: a chat gets its burst at
once and then one message a second; the bot as a whole stays under its per-second cap; one
chat's pace never holds back another's. First on the limiter with the channels' own
`RateLimit`s, then end to end: the outbox delivering committed rows through the real
Telegram and WhatsApp channels to the fake APIs. (A 429's retry_after is honoured:
test_telegram.py::test_429_waits_retry_after_then_sends and
test_whatsapp_flow.py::test_rate_limited_send_is_retried_after_retry_after.)"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.clock import FakeClock
from bot.outbox import Outbox, RateLimiter
from bot.server import OUTBOX, build_app, enabled_channels
from channels.base import Channel, Delivery, Message, RateLimit
from channels.telegram import TelegramChannel
from channels.whatsapp import WhatsAppChannel
from storage.store import Store
from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    TOKEN,
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
)
from tests.fake_twilio import whatsapp_harness
from tests.support import VirtualTime, write_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*attribute `retry_after`:telegram.warnings.PTBDeprecationWarning")

END_FLOW = """
[flows.main]
start = "end"
[flows.main.blocks.end]
type = "end"
"""
LIMITS = {"telegram": TelegramChannel.rate_limit, "whatsapp": WhatsAppChannel.rate_limit}


def test_the_platforms_documented_limits() -> None:
    # Telegram: about 1 message a second in one chat, 30 a second in all (Bot API FAQ);
    # WhatsApp through Twilio: 80 messages a second per sender (Twilio's MPS)
    assert LIMITS["telegram"] == RateLimit(per_chat_per_second=1, global_per_second=30, burst=3)
    assert LIMITS["whatsapp"] == RateLimit(per_chat_per_second=1, global_per_second=80, burst=3)


async def send_times(limit: RateLimit, chats: list[str]) -> dict[str, list[float]]:
    """Acquire once per entry of `chats`, all at once; the virtual time each one went."""
    vt = VirtualTime()
    limiter = RateLimiter(limit, vt)
    times: dict[str, list[float]] = defaultdict(list)

    async def send(chat: str) -> None:
        await limiter.acquire(chat)
        times[chat].append(vt.time())

    tasks = [asyncio.create_task(send(chat)) for chat in chats]
    await vt.run(lambda: sum(not t.done() for t in tasks), lambda: all(t.done() for t in tasks))
    return dict(times)


@pytest.mark.parametrize("platform", sorted(LIMITS))
async def test_one_chat_gets_its_burst_then_one_a_second(platform: str) -> None:
    times = await send_times(LIMITS[platform], ["a"] * 63)
    assert times["a"][:6] == [0, 0, 0, 1, 2, 3]
    assert times["a"][-1] == pytest.approx(60)  # steady: 60 more in 60 s


@pytest.mark.parametrize("platform", sorted(LIMITS))
async def test_chats_are_paced_each_on_its_own(platform: str) -> None:
    times = await send_times(LIMITS[platform], ["a"] * 5 + ["b"] * 5 + ["c"])
    assert times == {"a": [0, 0, 0, 1, 2], "b": [0, 0, 0, 1, 2], "c": [0]}


@pytest.mark.parametrize("platform", sorted(LIMITS))
async def test_the_bot_as_a_whole_stays_under_its_cap(platform: str) -> None:
    cap = int(LIMITS[platform].global_per_second or 0)
    chats = [f"c{i}" for i in range(3 * cap)]  # one message each: no chat limit applies
    times = sorted(t for ts in (await send_times(LIMITS[platform], chats)).values() for t in ts)
    assert times[:cap] == [0] * cap  # a second's worth at once
    assert times[cap:] == pytest.approx([k / cap for k in range(1, 2 * cap + 1)])  # then steady
    # the bucket's bound: in any span of d seconds at most cap + cap·d sends (so up to
    # 2·cap in the first second: the burst, then the steady rate)
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= cap + cap * (times[j] - times[i]) + 1e-6


# -- end to end: the outbox, the real channels, the fake platforms --------------------------


def add_rows(store: Store, channel: str, user: str, count: int, now: float) -> None:
    """A database job: `count` due outbox rows for one conversation."""
    conv = store.conversation(channel, user, f"key-{channel}-{user}", now)
    store.conn.executemany(
        "INSERT INTO outbox (conversation_id, channel, user_id, message, next_attempt, created)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(conv.id, channel, user, Message(f"{user} #{i}").to_json(), now, now)
         for i in range(count)])


async def deliver_paced(outbox: Outbox, channel: Channel, name: str, rows: dict[str, int],
                        monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[float, str]]]:
    """Commit `rows` (user → count), deliver them through `channel` with its real limit on a
    virtual clock; (time, text) of each send per user, as the channel was asked."""
    clock = FakeClock()
    for user, count in rows.items():
        await outbox.worker.run(add_rows, name, user, count, clock.now())
    vt = VirtualTime()
    paced = Outbox(outbox.worker, {name: channel}, clock, pace=vt)
    sent: dict[str, list[tuple[float, str]]] = defaultdict(list)
    real_send = channel.send

    async def send(delivery: Delivery) -> str | None:
        sent[delivery.user_id].append((vt.time(), delivery.message.text))
        return await real_send(delivery)

    monkeypatch.setattr(channel, "send", send)
    drain = asyncio.create_task(paced.drain())
    await vt.run(lambda: len(paced._busy), drain.done)
    await drain
    return dict(sent)


@asynccontextmanager
async def telegram_app(tmp_path: Path, fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch
                       ) -> AsyncIterator[tuple[Outbox, Channel]]:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "secret")
    config = write_config(tmp_path, END_FLOW, f"""
        [channels.telegram]
        enabled = true
        api_base_url = "{fake.base_url}"
    """)
    app = build_app(config, channel_factories=enabled_channels(config), clock=FakeClock(),
                    run_background=False)
    async with TestClient(TestServer(app, host="127.0.0.1")):
        assert app[OUTBOX].channels["telegram"].rate_limit == LIMITS["telegram"]
        yield app[OUTBOX], app[OUTBOX].channels["telegram"]


async def test_telegram_sends_are_paced_per_chat_through_the_bot_api(
        tmp_path: Path, fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch) -> None:
    async with telegram_app(tmp_path, fake, monkeypatch) as (outbox, channel):
        sent = await deliver_paced(outbox, channel, "telegram", {"1001": 6, "1002": 2},
                                   monkeypatch)
        assert sent["1001"] == [(t, f"1001 #{i}") for i, t in enumerate([0, 0, 0, 1, 2, 3])]
        assert sent["1002"] == [(0, "1002 #0"), (0, "1002 #1")]
        # what the Bot API got: each chat's messages once, in order
        by_chat: dict[str, list[str]] = defaultdict(list)
        for call in fake.sent("sendMessage"):
            by_chat[str(call["chat_id"])].append(call["text"])
        assert by_chat == {u: [f"{u} #{i}" for i in range(n)] for u, n in (("1001", 6), ("1002", 2))}
        states = await outbox.worker.run(_states)
        assert states == [("sent", 8)]


def _states(store: Store) -> list[tuple[Any, ...]]:
    return store.conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()


async def test_whatsapp_sends_are_paced_per_chat_through_twilio(
        tmp_path: Path, twilio_auth_token: None, monkeypatch: pytest.MonkeyPatch) -> None:
    async with whatsapp_harness(tmp_path, END_FLOW, real_rate_limit=True) as h:
        assert h.channel.rate_limit == LIMITS["whatsapp"]
        a, b = "whatsapp:+4915100000001", "whatsapp:+4915100000002"
        sent = await deliver_paced(h.outbox, h.channel, "whatsapp", {a: 5, b: 1}, monkeypatch)
        assert [t for t, _ in sent[a]] == [0, 0, 0, 1, 2]
        assert [t for t, _ in sent[b]] == [0]
        by_to: dict[str, list[str]] = defaultdict(list)  # what Twilio got, per recipient
        for form in h.twilio.posts:
            by_to[form["To"]].append(form["Body"])
        assert by_to == {a: [f"{a} #{i}" for i in range(5)], b: [f"{b} #0"]}
        assert await h.runtime.worker.run(_states) == [("sent", 6)]

