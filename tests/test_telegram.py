"""The Telegram channel: real PTB code against a local fake Bot API, real update JSON posted
to our webhook, and the exact Bot API parameters we send back."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.clock import FakeClock
from bot.config import Config
from bot.errors import ConfigError
from bot.outbox import Outbox
from bot.runtime import Runtime
from bot.server import OUTBOX, RUNTIME, build_app
from channels.base import Delivery, Link, Message, RateLimit, SendError
from channels.telegram import (
    _LINK_REFUSED,
    MAX_UPDATE_BYTES,
    TelegramChannel,
    TelegramSetupError,
    webhook_info,
)
from storage.store import Store
from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    TOKEN,
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
    payload,
    sign_init_data,
)
from tests.support import db_rows, query, write_config

# channels/telegram.py silences this PTB 22 notice at import; pytest resets filters per test
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*attribute `retry_after`:telegram.warnings.PTBDeprecationWarning")

SECRET = "s3cr3t-webhook_token"
CHAT = 4242

FLOWS = """
[flows.main]
start = "ask_name"

[flows.main.blocks.ask_name]
type = "input"
text = "Hi {{user_name}}! What's your name?"
variable = "name"
next = "menu"

[flows.main.blocks.menu]
type = "buttons"
text = "Nice to meet you, {{name}}. What would you like to try?"
variable = "choice"
choices = [
  { label = "Pay with a web page", next = "pay" },
  { label = "Not now", next = "bye" },
]

[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Press the button to pay."
button = "Pay 9.99 EUR"
input_variables = ["name"]
expiration = 120
response_variable = "payment"
{verify}
on_success = "paid"
on_error = "failed"
on_expired = "expired"

[flows.main.blocks.paid]
type = "end"
text = "Payment received, thank you {{name}}! Reference: {{payment.reference}}"

[flows.main.blocks.failed]
type = "end"
text = "The payment failed."

[flows.main.blocks.expired]
type = "end"
text = "The payment page expired."

[flows.main.blocks.bye]
type = "end"
text = "Bye!"
"""


def tg_config(tmp_path: Path, fake: FakeTelegram, telegram: str = "", verify: str = "",
              flows: str = FLOWS) -> Config:
    return write_config(tmp_path, flows.replace("{verify}", verify), f"""
        [channels.telegram]
        enabled = true
        api_base_url = "{fake.base_url}"
        {telegram}
    """)


@dataclass
class Tg:
    client: TestClient[Any, Any]
    fake: FakeTelegram
    runtime: Runtime
    outbox: Outbox
    clock: FakeClock
    channel: TelegramChannel

    async def post_update(self, update: dict[str, Any], secret: str | None = SECRET
                          ) -> tuple[int, Any]:
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
        resp = await self.client.post("/telegram", json=update, headers=headers)
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        await self.outbox.drain()
        return resp.status, body

    async def say(self, text: str, update_id: int, **sender: Any) -> list[dict[str, Any]]:
        """The user writes `text`; returns the sendMessage calls it caused."""
        update = payload("text_message")
        update["update_id"] = update_id
        update["message"]["text"] = text
        update["message"]["from"].update(sender)
        before = len(self.fake.sent())
        status, _ = await self.post_update(update)
        assert status == 200
        return self.fake.sent()[before:]

    async def press(self, callback_data: str, update_id: int) -> list[dict[str, Any]]:
        update = payload("callback_query")
        update["update_id"] = update_id
        update["callback_query"]["data"] = callback_data
        for row in update["callback_query"]["message"]["reply_markup"]["inline_keyboard"]:
            row[0]["callback_data"] = callback_data if row[0]["text"] == "Pay with a web page" \
                else "other:1"
        before = len(self.fake.sent())
        status, _ = await self.post_update(update)
        assert status == 200
        return self.fake.sent()[before:]

    async def outbox_rows(self) -> list[tuple[Any, ...]]:
        return await self.runtime.worker.run(
            query, "SELECT state, attempts, next_attempt, error, platform_id FROM outbox "
            "ORDER BY id")


@asynccontextmanager
async def telegram(config: Config, fake: FakeTelegram) -> AsyncIterator[Tg]:
    made: list[TelegramChannel] = []

    def factory(c: Config, r: Runtime) -> TelegramChannel:
        channel = TelegramChannel.create(c, r)
        # these tests send a few messages to one chat at once; the real limit is tested apart
        channel.rate_limit = RateLimit(per_chat_per_second=1000, global_per_second=1000)
        channel.poll_backoff = 0.01  # polling: the first wait after a failed getUpdates
        made.append(channel)
        return channel

    clock = FakeClock()
    app = build_app(config, channel_factories={"telegram": factory}, clock=clock,
                    run_background=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Tg(client, fake, app[RUNTIME], app[OUTBOX], clock, made[0])


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", SECRET)


def keyboard(call: dict[str, Any]) -> list[list[dict[str, Any]]]:
    rows: list[list[dict[str, Any]]] = call["reply_markup"]["inline_keyboard"]
    return rows


async def to_menu(tg: Tg) -> list[dict[str, Any]]:
    await tg.say("hello", 1)
    return await tg.say("Ada", 2)


# -- start-up ------------------------------------------------------------------------------


async def test_start_checks_the_token_and_registers_the_webhook(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake):
        assert fake.methods() == ["getMe", "setWebhook"]
        assert fake.sent("setWebhook") == [{
            "url": "http://bot.test/telegram", "secret_token": SECRET,
            "allowed_updates": ["message", "callback_query"]}]
    assert TelegramChannel.rate_limit == RateLimit(per_chat_per_second=1, global_per_second=30)


async def test_register_webhook_false_leaves_the_webhook_alone(
        tmp_path: Path, fake: FakeTelegram) -> None:
    config = tg_config(tmp_path, fake, "register_webhook = false")
    async with telegram(config, fake):
        assert fake.methods() == ["getMe"]


async def test_an_empty_token_variable_is_a_clear_error(
        tmp_path: Path, fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN")
    with pytest.raises(TelegramSetupError, match="environment variable TELEGRAM_BOT_TOKEN is "
                       "empty; put the bot token from @BotFather in it"):
        build_app(tg_config(tmp_path, fake),
                  channel_factories={"telegram": TelegramChannel.create})


async def test_webhook_mode_needs_a_secret(
        tmp_path: Path, fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "")
    with pytest.raises(TelegramSetupError, match="TELEGRAM_WEBHOOK_SECRET is empty"):
        build_app(tg_config(tmp_path, fake),
                  channel_factories={"telegram": TelegramChannel.create})
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "not allowed!")
    with pytest.raises(TelegramSetupError, match="may only hold 1-256 letters, digits, _ and -"):
        build_app(tg_config(tmp_path, fake),
                  channel_factories={"telegram": TelegramChannel.create})


async def test_a_rejected_token_fails_start_without_showing_it(
        tmp_path: Path, fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "999999:WrongTokenWrongTokenWrongToken_xyz"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", wrong)
    with pytest.raises(TelegramSetupError) as info:
        async with telegram(tg_config(tmp_path, fake), fake):
            pass
    assert str(info.value) == ("Telegram rejected the bot token in TELEGRAM_BOT_TOKEN; copy it "
                               "again from @BotFather (/mybots → API Token).")
    assert info.value.__context__ is None and info.value.__cause__ is None


async def test_a_refused_webhook_fails_start_with_the_reason(
        tmp_path: Path, fake: FakeTelegram) -> None:
    fake.fail_next("setWebhook", 400, "Bad Request: bad webhook: An HTTPS URL must "
                            "be provided for webhook")
    with pytest.raises(TelegramSetupError, match=re.escape(
            "Telegram refused the webhook http://bot.test/telegram: Bad webhook: an https url "
            "must be provided for webhook. Telegram needs a public https:// server.public_url")):
        async with telegram(tg_config(tmp_path, fake), fake):
            pass


async def test_the_token_never_reaches_the_log(
        tmp_path: Path, fake: FakeTelegram, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        fake.flood(1)
        await tg.say("hello", 1)
    assert fake.calls and caplog.records
    assert TOKEN not in caplog.text
    assert TOKEN.split(":")[1] not in caplog.text


# -- inbound -------------------------------------------------------------------------------


async def test_a_text_message_is_answered_in_html_mode(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        status, body = await tg.post_update(payload("text_message"))
        assert (status, body) == (200, "")
        assert fake.sent() == [{"chat_id": "4242", "parse_mode": "HTML",
                                         "text": "Hi Ada Lovelace! What's your name?"}]
        rows = await tg.outbox_rows()
        assert [(r[0], r[4]) for r in rows] == [("sent", "1001")]  # Telegram's message_id


async def test_a_user_named_with_markup_sees_it_literally(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        sent = await tg.say("hi", 1, first_name="<b>x</b> & co", last_name=None)
        assert sent[0]["text"] == "Hi &lt;b&gt;x&lt;/b&gt; &amp; co! What's your name?"
        assert sent[0]["parse_mode"] == "HTML"


async def test_a_wrong_or_missing_secret_is_refused_and_changes_nothing(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        for secret in (None, "", "wrong", SECRET + "x"):
            status, body = await tg.post_update(payload("text_message"), secret=secret)
            assert status == 403
            assert body["error"] == "bad_secret"
            assert "X-Telegram-Bot-Api-Secret-Token header is missing or wrong" in body["message"]
        assert fake.sent() == []
        counts = await tg.runtime.worker.run(Store.counts)
        assert not any(v for k, v in counts.items() if k.startswith("conversations"))
        # the refused update was not recorded: Telegram's own delivery of it still works
        assert (await tg.post_update(payload("text_message")))[0] == 200
        assert len(fake.sent()) == 1


async def test_a_redelivered_update_is_handled_once(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        assert (await tg.post_update(payload("text_message")))[0] == 200
        assert (await tg.post_update(payload("text_message")))[0] == 200
        assert [p["text"] for p in fake.sent()] == ["Hi Ada Lovelace! What's your name?"]
        assert tg.runtime.metrics["inbound_duplicates"] == 1


async def test_updates_we_cannot_use_are_200_and_logged(
        tmp_path: Path, fake: FakeTelegram, caplog: pytest.LogCaptureFixture) -> None:
    """Telegram sends an update again for a day unless it gets a 2xx: one we cannot use
    is answered 200 and logged (a wrong secret still gets 403: that is not Telegram)."""
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        empty = await tg.runtime.worker.run(db_rows)
        headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
        for body, reason in [(b"{not json", "bad_json"),
                             (json.dumps({"message": {}}).encode(), "not_an_update"),
                             (b"x" * (MAX_UPDATE_BYTES + 1), "too_large")]:
            with caplog.at_level(logging.WARNING, logger="channels.telegram"):
                resp = await tg.client.post("/telegram", data=body, headers=headers)
            assert resp.status == 200
            assert (await resp.json())["reason"] == reason
            assert f"ignored an update ({reason})" in caplog.text
        assert fake.sent() == []
        assert await tg.runtime.worker.run(db_rows) == empty  # no event, no conversation


def _reshaped(name: str, path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    update = payload(name)
    target = update
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return update


@pytest.mark.parametrize(("name", "path", "value"), [
    ("text_message", ("message", "text"), 42),
    ("text_message", ("message", "text"), {"a": 1}),
    ("text_message", ("message", "chat"), None),
    ("text_message", ("message", "chat"), KeyError),
    ("text_message", ("message", "date"), 2 ** 70),
    ("callback_query", ("callback_query", "data"), 7),
    ("callback_query", ("callback_query", "from"), KeyError),
    ("callback_query", ("callback_query", "message", "reply_markup", "inline_keyboard", 0, 0,
                        "text"), None),
    ("edited_message", ("edited_message", "edit_date"), 2 ** 70),
])
async def test_an_update_with_fields_of_the_wrong_shape_is_200_and_changes_nothing(
        tmp_path: Path, fake: FakeTelegram, name: str, path: tuple[str | int, ...],
        value: Any) -> None:
    """PTB's de_json does not check types: such an update used to fail later, inside the
    handler, with 500, which Telegram answers by sending it again for a day."""
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.say("hello", 1)
        before = await tg.runtime.worker.run(db_rows)
        update = _reshaped(name, path, value)
        update["update_id"] = 2
        status, body = await tg.post_update(update)
        assert (status, body["reason"]) == (200, "not_an_update")
        assert await tg.runtime.worker.run(db_rows) == before
        assert len(fake.sent()) == 1


async def test_an_oversized_update_during_a_conversation_changes_nothing(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.say("hi", 1)
        before, sent = await tg.runtime.worker.run(db_rows), len(fake.sent())
        update = payload("text_message")
        update["update_id"] = 2
        update["message"]["text"] = "x" * (MAX_UPDATE_BYTES + 1)
        status, body = await tg.post_update(update)
        assert status == 200 and body["reason"] == "too_large"  # 200: Telegram stops resending
        await tg.outbox.drain()
        assert len(fake.sent()) == sent
        assert await tg.runtime.worker.run(db_rows) == before


async def test_a_4096_emoji_reply_to_another_is_an_ordinary_update(
        tmp_path: Path, fake: FakeTelegram) -> None:
    """~100 KB of \\u-escaped JSON: above server.max_body_bytes, far below what Telegram
    may send; it reaches the flow like any message."""
    long = "😀" * 4096
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.say("hello", 1)
        update = payload("text_message")
        update["update_id"] = 2
        update["message"]["text"] = long
        update["message"]["reply_to_message"] = {**payload("text_message")["message"],
                                                 "message_id": 3, "text": long}
        body = json.dumps(update).encode()  # ensure_ascii: every emoji as \ud83d\ude00
        assert 90_000 < len(body) < MAX_UPDATE_BYTES and len(body) > 65536
        resp = await tg.client.post("/telegram", data=body, headers={
            "X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"})
        assert resp.status == 200
        await tg.outbox.drain()
        conv = await tg.runtime.worker.run(Store.conversation, "telegram", str(CHAT), "k", 0)
        assert conv.variables["name"] == long
        assert "".join(p["text"] for p in fake.sent()[1:]).count("😀") == 4096


@pytest.mark.parametrize("name", ["edited_message"])
async def test_other_updates_are_acknowledged_and_ignored(
        tmp_path: Path, fake: FakeTelegram, name: str) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        assert (await tg.post_update(payload(name)))[0] == 200
        assert fake.sent() == []
        assert tg.runtime.metrics["inbound_telegram"] == 0


async def test_start_restarts_and_group_commands_lose_the_bot_mention(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.say("hello", 1)
        await tg.say("Ada", 2)
        assert (await tg.post_update(payload("start_command")))[0] == 200
        assert fake.sent()[-1]["text"] == "Hi Ada Lovelace! What's your name?"
        await tg.say("Ada", 3)
        assert (await tg.post_update(payload("group_command")))[0] == 200
        assert fake.sent()[-1] == {"chat_id": "-1001234567890", "parse_mode": "HTML",
                                            "text": "Hi Ada Lovelace! What's your name?"}


DEEP_LINK_FLOWS = """
[flows.main]
start = "hello"
[flows.main.blocks.hello]
type = "message"
text = "Payload: [{{start_payload}}]"
next = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Your name?"
variable = "name"
next = "done"
[flows.main.blocks.done]
type = "end"
text = "Thanks {{name}}"
"""


@pytest.mark.parametrize(("chat", "text", "restarts", "start_payload"), [
    (CHAT, "/start pay_42", True, "pay_42"),  # t.me/<bot>?start=pay_42
    (CHAT, "/start", True, ""),  # a plain /start clears the last payload
    (-1001234567890, "/start@flowbot_test_bot ref-7", True, "ref-7"),  # in a group
    (-1001234567890, "/START@FlowBot_Test_Bot  ref-7 ", True, "ref-7"),
    (-1001234567890, "/start@flowbot_test_bot\nref-7", True, "ref-7"),
    (-1001234567890, "/start@other_bot ref-7", False, None),  # another bot's command
    (-1001234567890, "/START@other_bot", False, None),
    (-1001234567890, "/help@other_bot\nmore", False, None),
])
async def test_deep_link_start_restarts_with_its_payload(
        tmp_path: Path, fake: FakeTelegram, chat: int, text: str, restarts: bool,
        start_payload: str | None) -> None:
    """A deep link t.me/<bot>?start=<payload> makes Telegram send "/start <payload>": it
    is the restart word, not an answer to the open question, and the payload is the
    flow's variable start_payload."""
    async with telegram(tg_config(tmp_path, fake, flows=DEEP_LINK_FLOWS), fake) as tg:
        def update(update_id: int, words: str) -> dict[str, Any]:
            u = payload("text_message")
            u["update_id"] = update_id
            u["message"]["chat"] = {"id": chat, "type": "private" if chat > 0 else "supergroup"}
            u["message"]["text"] = words
            return u

        assert (await tg.post_update(update(1, "/start old")))[0] == 200
        assert [p["text"] for p in fake.sent()] == ["Payload: [old]", "Your name?"]
        before = len(fake.sent())
        assert (await tg.post_update(update(2, text)))[0] == 200
        got = [p["text"] for p in fake.sent()[before:]]
        conv = await tg.runtime.worker.run(Store.conversation, "telegram", str(chat), "k", 0)
        if restarts:
            assert got == [f"Payload: [{start_payload}]", "Your name?"]
            assert conv.variables["start_payload"] == start_payload
            assert "name" not in conv.variables
        else:  # not ours: no restart, and no answer to our question either
            assert got == []
            assert conv.variables["start_payload"] == "old"
            assert "name" not in conv.variables and conv.block == "ask"
            assert tg.runtime.stats.ignored.labels("telegram", "unsupported")._value.get() == 1


async def test_web_app_data_becomes_text_and_a_variable(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.say("hello", 1)
        assert (await tg.post_update(payload("web_app_data")))[0] == 200
        conv = await tg.runtime.worker.run(Store.conversation, "telegram", "4242", "k", 0)
        assert conv.variables["web_app_data"] == '{"size":"M","color":"blue"}'
        assert conv.variables["name"] == '{"size":"M","color":"blue"}'  # the input's answer


# -- buttons, WebView and the full flow ----------------------------------------------------


async def test_buttons_become_an_inline_keyboard_and_a_press_is_answered(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        [menu] = await to_menu(tg)
        assert menu["text"] == "Nice to meet you, Ada. What would you like to try?"
        [[pay], [later]] = keyboard(menu)
        assert pay["text"] == "Pay with a web page" and later["text"] == "Not now"
        assert set(pay) == {"text", "callback_data"}
        assert pay["callback_data"] != later["callback_data"]

        [webview] = await tg.press(pay["callback_data"], 3)
        await fake.wait_for(lambda f: bool(f.sent("answerCallbackQuery")))
        assert fake.sent("answerCallbackQuery") == [
            {"callback_query_id": "1822130478459614511"}]
        assert webview["text"] == "Press the button to pay."
        [[button]] = keyboard(webview)
        assert set(button) == {"text", "url"} and button["text"] == "Pay 9.99 EUR"
        url = urlsplit(button["url"])
        assert (url.scheme, url.netloc, url.path) == ("https", "pay.example", "/checkout")
        assert parse_qs(url.query)["name"] == ["Ada"]
        conv = await tg.runtime.worker.run(Store.conversation, "telegram", "4242", "k", 0)
        assert conv.variables["choice"] == "Pay with a web page"


async def test_a_full_flow_waits_for_the_webview_callback(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        [menu] = await to_menu(tg)
        [webview] = await tg.press(keyboard(menu)[0][0]["callback_data"], 3)
        execution_id = parse_qs(urlsplit(keyboard(webview)[0][0]["url"]).query)["executionId"][0]

        [pending] = await tg.say("are you there?", 4)
        assert pending["text"].startswith("Please finish the step above first")

        resp = await tg.client.post("/webview/callback", json={
            "executionId": execution_id, "success": True, "data": {"reference": "R-<1>"}})
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "outcome": "success"}
        await tg.outbox.drain()
        assert fake.sent()[-1] == {
            "chat_id": "4242", "parse_mode": "HTML",
            "text": "Payment received, thank you Ada! Reference: R-&lt;1&gt;"}
        assert [r[0] for r in await tg.outbox_rows()] == ["sent"] * 5


async def test_callback_data_fits_64_bytes_whatever_the_labels(
        tmp_path: Path, fake: FakeTelegram) -> None:
    long = "Ünïcödé label that goes on and on " * 6
    flows = FLOWS.replace('{ label = "Pay with a web page", next = "pay" }',
                          f'{{ label = "{long}", next = "pay" }}')
    async with telegram(tg_config(tmp_path, fake, flows=flows), fake) as tg:
        [menu] = await to_menu(tg)
        [[first], [_]] = keyboard(menu)
        assert first["text"] == long
        assert len(first["callback_data"].encode()) <= 64


async def test_web_app_buttons_open_a_mini_app(tmp_path: Path, fake: FakeTelegram) -> None:
    config = tg_config(tmp_path, fake, 'webview_button = "web_app"')
    async with telegram(config, fake) as tg:
        [menu] = await to_menu(tg)
        [webview] = await tg.press(keyboard(menu)[0][0]["callback_data"], 3)
        [[button]] = keyboard(webview)
        assert set(button) == {"text", "web_app"}
        assert button["web_app"]["url"].startswith("https://pay.example/checkout?executionId=")


async def test_a_button_url_telegram_refuses_is_sent_as_text(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        link = Link("http://127.0.0.1:8080/demo/webview?executionId=abc", "Pay")
        message_id = await tg.channel.send(Delivery(1, 1, "4242", Message("Pay here.", link=link)))
        first, second = fake.sent()
        assert keyboard(first) == [[{"text": "Pay", "url": link.url}]]
        assert second == {"chat_id": "4242", "parse_mode": "HTML",
                          "text": f"Pay here.\n\nPay: {link.url}"}
        assert message_id == "1001"


@pytest.mark.parametrize("description, link_refused", [
    # Telegram's words for a link it will not put on a button (as reported by bot authors)
    ("Bad Request: BUTTON_URL_INVALID", True),
    ("Bad Request: inline keyboard button URL 'http://localhost:8080/x' is invalid: "
     "Wrong HTTP URL", True),
    ("Bad Request: inline keyboard button URL 'happ://add/x' is invalid: Unsupported URL "
     "protocol", True),
    ("Bad Request: BUTTON_TYPE_INVALID", True),  # a Mini App button outside a private chat
    # refusals that a plain link would not fix: recorded as they are
    ("Bad Request: chat not found", False),
    ("Bad Request: message is too long", False),
    ("Bad Request: can't parse entities: unsupported start tag", False),
])
def test_which_refusals_fall_back_to_the_link_as_text(description: str,
                                                      link_refused: bool) -> None:
    assert bool(_LINK_REFUSED.search(description)) is link_refused


async def test_a_mini_app_link_that_is_not_https_falls_back_to_a_url_button(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        link = Link("http://pay.example/x", "Pay", web_app=True)
        await tg.channel.send(Delivery(1, 1, "4242", Message("Pay here.", link=link)))
        assert keyboard(fake.sent()[0]) == [[{"text": "Pay", "url": link.url}]]


async def test_long_texts_are_split_with_the_keyboard_on_the_last_part(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        text = "\n".join(f"line {i:05d} " + "x" * 80 for i in range(100))  # ~9 000 characters
        await tg.channel.send(Delivery(1, 1, "4242", Message(text, link=Link("https://a.example", "Go"))))
        parts = fake.sent()
        assert len(parts) == 3
        assert all(len(p["text"]) <= 4096 for p in parts)
        assert "\n".join(p["text"] for p in parts) == text
        assert ["reply_markup" in p for p in parts] == [False, False, True]


async def test_a_retry_after_a_failed_part_sends_only_the_rest(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        text = "\n".join(f"line {i:05d} " + "x" * 80 for i in range(100))  # ~9 000 characters
        delivery = Delivery(1, 1, "4242", Message(text))
        fake.succeed_next()
        fake.flood(retry_after=3)  # the second part is refused once
        with pytest.raises(SendError):
            await tg.channel.send(delivery)
        await tg.channel.send(delivery)  # the outbox's retry
        parts = [call["text"] for call in fake.sent()]
        assert len(parts) == 4 and parts[1] == parts[2]  # the failed call, then its retry
        assert "\n".join([parts[0], *parts[2:]]) == text  # the first part went once


# -- delivery errors -----------------------------------------------------------------------


async def test_429_waits_retry_after_then_sends(tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        fake.flood(retry_after=7)
        assert await tg.say("hello", 1) == [{"chat_id": "4242", "parse_mode": "HTML",
                                             "text": "Hi Ada Lovelace! What's your name?"}]
        [(state, attempts, next_attempt, error, _)] = await tg.outbox_rows()
        assert (state, attempts) == ("pending", 1)
        assert next_attempt == tg.clock.now() + 7
        assert error == "rate_limited: Flood control exceeded. Retry in 7 seconds"

        tg.clock.advance(6)
        await tg.outbox.drain()
        assert len(fake.sent()) == 1  # not before retry_after
        tg.clock.advance(1)
        await tg.outbox.drain()
        first, second = fake.sent()
        assert first == second
        assert [r[:2] for r in await tg.outbox_rows()] == [("sent", 2)]


async def test_a_blocked_bot_is_recorded_and_not_retried(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        fake.block()
        await tg.say("hello", 1)
        [(state, attempts, _, error, _)] = await tg.outbox_rows()
        assert (state, attempts) == ("failed", 1)
        assert error == "bot_blocked: Forbidden: bot was blocked by the user"
        tg.clock.advance(3600)
        await tg.outbox.drain()
        assert len(fake.sent()) == 1


async def test_an_unknown_chat_is_a_permanent_error(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        with pytest.raises(SendError) as info:
            await tg.channel.send(Delivery(1, 1, "404", Message("hi")))
        assert (info.value.permanent, info.value.code) == (True, "chat_not_found")
        assert str(info.value) == "Chat not found"  # PTB drops the "Bad Request: " prefix


@pytest.mark.parametrize("failure", ["502 Bad Gateway", "connection dropped"])
async def test_network_errors_are_retried(tmp_path: Path, fake: FakeTelegram, failure: str) -> None:
    """Send, fail, wait the backoff, send again, delivered: through the fake Bot API."""
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        if failure == "502 Bad Gateway":
            fake.fail_next("sendMessage", 502, "Bad Gateway")
        else:
            fake.hang_up_next("sendMessage")
        greeting = {"chat_id": "4242", "parse_mode": "HTML",
                    "text": "Hi Ada Lovelace! What's your name?"}
        assert await tg.say("hello", 1) == [greeting]  # tried once: it failed
        [(state, attempts, next_attempt, error, _)] = await tg.outbox_rows()
        assert (state, attempts) == ("pending", 1) and error.startswith("network: ")
        assert 0.8 <= next_attempt - tg.clock.now() <= 1.2  # the first backoff: 1 s ± 20 %

        tg.clock.advance(0.75)
        await tg.outbox.drain()
        assert fake.sent() == [greeting]  # not before its time
        tg.clock.advance(next_attempt - tg.clock.now())
        await tg.outbox.drain()
        assert fake.sent() == [greeting, greeting]  # the retry, delivered
        assert [r[:2] for r in await tg.outbox_rows()] == [("sent", 2)]
        [menu] = await tg.say("Ada", 2)
        assert menu["text"] == "Nice to meet you, Ada. What would you like to try?"


# -- verified WebView callbacks ------------------------------------------------------------


def init_data(tg: Tg, user_id: int = CHAT, age: float = 30, token: str = TOKEN) -> str:
    user = (f'{{"id":{user_id},"first_name":"Ada","last_name":"Lovelace","username":"ada_l",'
            '"language_code":"en","allows_write_to_pm":true}')
    return sign_init_data({"query_id": "AAHdF6IQAAAAAN0XohDhrOrc", "user": user,
                           "auth_date": str(int(tg.clock.now() - age))}, token)


async def test_a_verified_webview_needs_telegrams_init_data(
        tmp_path: Path, fake: FakeTelegram) -> None:
    config = tg_config(tmp_path, fake, verify='verify = "telegram"')
    async with telegram(config, fake) as tg:
        [menu] = await to_menu(tg)
        [webview] = await tg.press(keyboard(menu)[0][0]["callback_data"], 3)
        [[button]] = keyboard(webview)
        assert set(button) == {"text", "web_app"}  # initData exists only inside a Mini App
        execution_id = parse_qs(urlsplit(button["web_app"]["url"]).query)["executionId"][0]

        async def callback(**extra: Any) -> tuple[int, Any]:
            resp = await tg.client.post("/webview/callback", json={
                "executionId": execution_id, "success": True, "data": {"reference": "R-9"},
                **extra})
            return resp.status, await resp.json()

        refused = [
            ({}, "missing_init_data", "telegramInitData is missing"),
            ({"telegramInitData": init_data(tg, token="1:other")}, "bad_init_data",
             "not signed by Telegram for this bot"),
            ({"telegramInitData": init_data(tg, age=3601)}, "bad_init_data",
             "3601 s old, more than the 3600 s allowed"),
            ({"telegramInitData": init_data(tg, user_id=777)}, "wrong_user",
             "belongs to another Telegram user"),
        ]
        sent_before = len(fake.sent())
        for extra, code, words in refused:
            status, body = await callback(**extra)
            assert (status, body["error"]) == (401, code)
            assert words in body["message"]
        await tg.outbox.drain()
        assert len(fake.sent()) == sent_before  # nothing moved on

        assert await callback(telegramInitData=init_data(tg)) == (
            200, {"status": "ok", "outcome": "success"})
        await tg.outbox.drain()
        assert fake.sent()[-1]["text"] == "Payment received, thank you Ada! Reference: R-9"


# -- polling -------------------------------------------------------------------------------


async def test_polling_mode_fetches_updates_and_confirms_them(
        tmp_path: Path, fake: FakeTelegram) -> None:
    fake.webhook = {"url": "https://old.example/telegram"}
    config = tg_config(tmp_path, fake, 'mode = "polling"')
    async with telegram(config, fake) as tg:
        assert fake.methods()[:2] == ["getMe", "deleteWebhook"]
        resp = await tg.client.post("/telegram", json=payload("text_message"))
        assert resp.status == 404  # no webhook route in polling mode

        await fake.queue_update(payload("text_message"))
        await fake.wait_for(lambda f: any(
            p.get("offset") == "813375002" for p in f.sent("getUpdates")))
        await tg.outbox.drain()
        assert [p["text"] for p in fake.sent()] == ["Hi Ada Lovelace! What's your name?"]
        first_poll = fake.sent("getUpdates")[0]
        assert first_poll["timeout"] == "30"
        assert first_poll["allowed_updates"] == ["message", "callback_query"]
        assert "offset" not in first_poll
    assert fake.updates == []


async def test_polling_survives_errors(tmp_path: Path, fake: FakeTelegram) -> None:
    config = tg_config(tmp_path, fake, 'mode = "polling"')
    fake.fail_next("getUpdates", 502, "Bad Gateway")
    async with telegram(config, fake) as tg:
        await fake.queue_update(payload("text_message"))
        await fake.wait_for(lambda f: any(
            p.get("offset") == "813375002" for p in f.sent("getUpdates")))
        await tg.outbox.drain()
        assert len(fake.sent()) == 1
        assert len(fake.sent("getUpdates")) >= 3  # failed, fetched, confirmed


# -- webhook-info and config checks --------------------------------------------------------


async def test_webhook_info_shows_what_telegram_has(
        tmp_path: Path, fake: FakeTelegram) -> None:
    config = tg_config(tmp_path, fake)
    text = await webhook_info(config)
    assert "webhook url:     (none: updates wait for getUpdates, i.e. polling)" in text
    assert "config: expects http://bot.test/telegram" in text
    async with telegram(config, fake):
        pass
    text = await webhook_info(config)
    assert text.splitlines() == [
        "bot:             @flowbot_test_bot",
        "webhook url:     http://bot.test/telegram",
        "pending updates: 0",
        "allowed updates: message, callback_query",
        "max connections: 40",
        "ip address:      203.0.113.7",
        "last error:      2023-11-14 22:13:20 UTC: Wrong response from the webhook: 502 Bad Gateway",
        "config: ok, Telegram delivers to http://bot.test/telegram",
    ]


def test_check_refuses_a_mini_app_url_that_is_not_https(
        tmp_path: Path, fake: FakeTelegram) -> None:
    flows = FLOWS.replace('url = "https://pay.example/checkout"', 'url = "/pay"')
    with pytest.raises(ConfigError) as info:
        tg_config(tmp_path, fake, 'webview_button = "web_app"', flows=flows)
    assert info.value.errors == [
        'flows.main.blocks.pay.url: Telegram opens Mini Apps ([channels.telegram] '
        'webview_button = "web_app") only from https:// URLs, but this one is '
        'http://bot.test/pay (server.public_url is not https)']
    flows = FLOWS.replace("https://pay.example", "http://pay.example")
    with pytest.raises(ConfigError) as info:
        tg_config(tmp_path, fake, verify='verify = "telegram"', flows=flows)
    assert info.value.errors == [
        'flows.main.blocks.pay.url: Telegram opens Mini Apps (verify = "telegram") only from '
        'https:// URLs, but this one is http://pay.example/checkout']
    assert tg_config(tmp_path, fake, 'webview_button = "web_app"')


# -- a group upgraded to a supergroup ------------------------------------------------------

OLD_GROUP, SUPERGROUP = -555, -1001777


def group_text(update_id: int, text: str, chat: int = OLD_GROUP) -> dict[str, Any]:
    u = payload("text_message")
    u["update_id"] = update_id
    u["message"]["chat"] = {"id": chat, "title": "Testers",
                            "type": "group" if chat == OLD_GROUP else "supergroup"}
    u["message"]["text"] = text
    return u


def migration_notice(update_id: int, side: str) -> dict[str, Any]:
    """The service message Telegram sends in the old group ("to") or the new one ("from")."""
    u = payload("text_message")
    u["update_id"] = update_id
    del u["message"]["text"]
    if side == "to":
        u["message"]["chat"] = {"id": OLD_GROUP, "title": "Testers", "type": "group"}
        u["message"]["migrate_to_chat_id"] = SUPERGROUP
    else:
        u["message"]["chat"] = {"id": SUPERGROUP, "title": "Testers", "type": "supergroup"}
        u["message"]["migrate_from_chat_id"] = OLD_GROUP
    return u


async def conversations(tg: Tg) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = await tg.runtime.worker.run(
        query, "SELECT user_id, key, block, variables FROM conversations ORDER BY id")
    return rows


def sent_to(fake: FakeTelegram, chat: int) -> list[str]:
    return [p["text"] for p in fake.sent() if int(p["chat_id"]) == chat]


@pytest.mark.usefixtures("both_backends")
async def test_a_send_to_an_upgraded_group_follows_it_with_the_conversation(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        assert (await tg.post_update(group_text(1, "hello")))[0] == 200
        [(_, key, _, _)] = await conversations(tg)
        fake.fail_next("sendMessage", 400, "Bad Request: group chat was upgraded to a "
                       "supergroup chat", {"migrate_to_chat_id": SUPERGROUP})
        assert (await tg.post_update(group_text(2, "Ada")))[0] == 200
        assert sent_to(fake, SUPERGROUP) == [
            "Nice to meet you, Ada. What would you like to try?"]
        assert await tg.outbox_rows() and all(r[0] == "sent" for r in await tg.outbox_rows())
        [(user_id, moved_key, block, variables)] = await conversations(tg)
        assert (user_id, moved_key, block) == (str(SUPERGROUP), key, "menu")
        assert '"name":"Ada"' in variables and f'"user_id":"{SUPERGROUP}"' in variables
        # the group goes on from the new id, where it stood
        assert (await tg.post_update(group_text(3, "Not now", SUPERGROUP)))[0] == 200
        assert sent_to(fake, SUPERGROUP)[-1] == "Bye!"
        assert len(await conversations(tg)) == 1


@pytest.mark.parametrize("notices", [["to"], ["from"], ["to", "from"], ["from", "to"]])
@pytest.mark.usefixtures("both_backends")
async def test_migration_notices_move_the_conversation_and_its_open_wait(
        tmp_path: Path, fake: FakeTelegram, notices: list[str]) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.post_update(group_text(1, "hello"))
        await tg.post_update(group_text(2, "Ada"))
        await tg.post_update(group_text(3, "Pay with a web page"))
        pay = fake.sent()[-1]
        url = keyboard(pay)[0][0]["url"]
        for i, side in enumerate(notices):
            before = len(fake.calls)
            assert (await tg.post_update(migration_notice(10 + i, side)))[0] == 200
            assert fake.methods()[before:] == []  # a service message is not answered
        [(user_id, _, block, _)] = await conversations(tg)
        assert (user_id, block) == (str(SUPERGROUP), "pay")
        resp = await tg.client.post("/webview/callback", json={
            "executionId": parse_qs(urlsplit(url).query)["executionId"][0],
            "success": True, "data": {"reference": "R-1"}})
        assert resp.status == 200
        await tg.outbox.drain()
        assert sent_to(fake, SUPERGROUP) == ["Payment received, thank you Ada! Reference: R-1"]


async def test_an_update_from_the_supergroup_before_the_notice_starts_no_second_flow(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.post_update(group_text(1, "hello"))
        await tg.post_update(group_text(2, "hi", SUPERGROUP))  # raced ahead of the notice
        await tg.post_update(migration_notice(3, "from"))
        await tg.post_update(group_text(4, "Ada", SUPERGROUP))  # answers the old question
        assert sent_to(fake, SUPERGROUP)[-1] == (
            "Nice to meet you, Ada. What would you like to try?")
        rows = await conversations(tg)
        assert [r[0] for r in rows] == [str(SUPERGROUP), f"{SUPERGROUP}~replaced~2"]


@pytest.mark.parametrize("first", ["to", "from", "send"])
@pytest.mark.usefixtures("both_backends")
async def test_a_late_update_from_the_old_group_reaches_the_moved_conversation(
        tmp_path: Path, fake: FakeTelegram, first: str) -> None:
    """Webhooks reorder: an update the old group sent just before the upgrade can arrive
    after the conversation moved (a notice, or a send refused with migrate_to_chat_id). It
    answers the moved conversation; it does not start a second one at the old id, which
    the other notice would then move over the real one (losing its key, variables, wait)."""
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        await tg.post_update(group_text(1, "hello"))
        [(_, key, _, _)] = await conversations(tg)
        if first == "send":
            fake.fail_next("sendMessage", 400, "Bad Request: group chat was upgraded to a "
                           "supergroup chat", {"migrate_to_chat_id": SUPERGROUP})
            await tg.post_update(group_text(2, "Ada"))
        else:
            await tg.post_update(group_text(2, "Ada"))
            await tg.post_update(migration_notice(10, first))
        await tg.post_update(group_text(3, "Pay with a web page"))  # late, from the old id
        for i, side in enumerate(["to", "from"]):
            await tg.post_update(migration_notice(20 + i, side))
        [(user_id, moved_key, block, variables)] = await conversations(tg)
        assert (user_id, moved_key, block) == (str(SUPERGROUP), key, "pay")
        assert '"name":"Ada"' in variables
        assert sent_to(fake, SUPERGROUP)[-1] == "Press the button to pay."


@pytest.mark.parametrize("first", ["to", "from", "send"])
@pytest.mark.usefixtures("both_backends")
async def test_a_late_update_from_the_old_group_after_a_restart_reaches_the_moved_one(
        tmp_path: Path, fake: FakeTelegram, first: str) -> None:
    """The old → new address is kept in the database with the move: a restart between the
    move and a late update from the old group forgets nothing. The update answers the moved
    conversation: no greeting to the group, no second conversation, the message not lost."""
    config = tg_config(tmp_path, fake)
    async with telegram(config, fake) as tg:
        await tg.post_update(group_text(1, "hello"))
        [(_, key, _, _)] = await conversations(tg)
        if first == "send":
            fake.fail_next("sendMessage", 400, "Bad Request: group chat was upgraded to a "
                           "supergroup chat", {"migrate_to_chat_id": SUPERGROUP})
            await tg.post_update(group_text(2, "Ada"))
        else:
            await tg.post_update(group_text(2, "Ada"))
            await tg.post_update(migration_notice(10, first))
    before = len(fake.sent())
    async with telegram(config, fake) as tg:  # a new runtime on the same database
        assert (await tg.post_update(group_text(3, "Pay with a web page")))[0] == 200
        await tg.outbox.drain()
        [(user_id, moved_key, block, variables)] = await conversations(tg)
        assert (user_id, moved_key, block) == (str(SUPERGROUP), key, "pay")
        assert '"name":"Ada"' in variables
        assert [(int(p["chat_id"]), p["text"]) for p in fake.sent()[before:]] == [
            (SUPERGROUP, "Press the button to pay.")]
        assert [p["text"] for p in fake.sent()].count(
            "Hi Ada Lovelace! What's your name?") == 1  # the first one, before the move


# -- recovery: what a user sees when Telegram or our side fails ----------------------------


async def test_an_update_that_keeps_failing_is_retried_then_skipped(
        tmp_path: Path, fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Polling: an update that cannot be committed (here: its database job fails each time)
    is fetched again POISON_ATTEMPTS times, then skipped; the next user is not stuck."""
    from channels.telegram import POISON_ATTEMPTS

    config = tg_config(tmp_path, fake, 'mode = "polling"')
    async with telegram(config, fake) as tg:
        real = tg.channel._inbound
        tries = 0

        async def inbound(event: Any) -> bool:
            nonlocal tries
            if event.text == "poison":
                tries += 1
                raise RuntimeError("database or disk is full")
            return await real(event)

        monkeypatch.setattr(tg.channel, "_inbound", inbound)
        bad, good = payload("text_message"), payload("text_message")
        bad["message"]["text"] = "poison"
        good["update_id"] = bad["update_id"] + 1
        good["message"]["chat"]["id"] = good["message"]["from"]["id"] = 5151
        with caplog.at_level(logging.WARNING, logger="channels.telegram"):
            await fake.queue_update(bad)
            await fake.queue_update(good)
            await fake.wait_for(lambda f: any(
                p.get("offset") == str(good["update_id"] + 1) for p in f.sent("getUpdates")))
            await tg.outbox.drain()
        assert tries == POISON_ATTEMPTS
        assert [(p["chat_id"], p["text"]) for p in fake.sent()] == [
            ("5151", "Hi Ada Lovelace! What's your name?")]  # the next update went through
        assert f"update {bad['update_id']} failed {POISON_ATTEMPTS} times; skipping it" in caplog.text
        assert await tg.runtime.worker.run(query, "SELECT user_id FROM conversations") == [
            ("5151",)]


async def test_a_failing_answer_callback_query_does_not_stop_the_flow(
        tmp_path: Path, fake: FakeTelegram, caplog: pytest.LogCaptureFixture) -> None:
    async with telegram(tg_config(tmp_path, fake), fake) as tg:
        [menu] = await to_menu(tg)
        fake.fail_next("answerCallbackQuery", 400, "Bad Request: query is too old and response "
                       "timeout expired or query ID is invalid")
        with caplog.at_level(logging.WARNING, logger="channels.telegram"):
            [webview] = await tg.press(keyboard(menu)[0][0]["callback_data"], 3)
            await fake.wait_for(lambda f: bool(f.sent("answerCallbackQuery")))
            await tg.channel.stop()  # lets the pending answer finish
        assert webview["text"] == "Press the button to pay."  # the press moved the flow on
        assert "answerCallbackQuery failed: Query is too old" in caplog.text
        assert TOKEN not in caplog.text


async def test_an_unreachable_bot_api_at_start_says_so_without_the_token(tmp_path: Path) -> None:
    """`flowbot serve` stops at start with this one line (and exit status 1)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/bot"
    broken = write_config(tmp_path, FLOWS.replace("{verify}", ""), f"""
        [channels.telegram]
        enabled = true
        api_base_url = "{closed}"
    """)
    app = build_app(broken, channel_factories={"telegram": TelegramChannel.create},
                    clock=FakeClock(), run_background=False)
    with pytest.raises(TelegramSetupError) as info:
        async with TestClient(TestServer(app, host="127.0.0.1")):
            pass
    message = str(info.value)
    assert message.startswith(f"cannot reach the Telegram Bot API at {closed}")
    assert TOKEN not in message


# -- media in ------------------------------------------------------------------------------

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
text = "{{media_type}} {{receipt}} [{{last_message}}] {{media_content_type}} {{media_file_name}}"
"""
SHOW_FLOWS = """
[flows.main]
start = "show"
[flows.main.blocks.show]
type = "end"
text = "{{media_type}}|{{media_id}}|{{last_message}}|""" + \
    """{{latitude}},{{longitude}}|{{contact_name}}/{{contact_phone}}"
"""


def media_update(update_id: int, **fields: Any) -> dict[str, Any]:
    u = payload("text_message")
    u["update_id"] = update_id
    del u["message"]["text"]
    u["message"].update(fields)
    return u


@pytest.mark.parametrize(("fields", "shown"), [
    ({"photo": payload("photo_message")["message"]["photo"], "caption": "my receipt"},
     "photo|AgACAgIAAxkBAAIBZ2V5|my receipt|,|/"),
    ({"document": {"file_id": "BQACAgIAAxkBAAIB", "file_unique_id": "u1",
                   "file_name": "invoice.pdf", "mime_type": "application/pdf"}},
     "document|BQACAgIAAxkBAAIB||,|/"),
    ({"voice": {"file_id": "AwACAgIAAxkBAAIC", "file_unique_id": "u2", "duration": 3,
                "mime_type": "audio/ogg"}}, "voice|AwACAgIAAxkBAAIC||,|/"),
    ({"video": {"file_id": "BAACAgIAAxkBAAID", "file_unique_id": "u3", "width": 640,
                "height": 480, "duration": 5}, "caption": "look"},
     "video|BAACAgIAAxkBAAID|look|,|/"),
    # a GIF: Telegram sets both `animation` and `document` (backward compatibility)
    ({"animation": {"file_id": "CgACAgIAAxkBAAIE", "file_unique_id": "u4", "width": 320,
                    "height": 240, "duration": 2, "mime_type": "video/mp4"},
      "document": {"file_id": "CgACAgIAAxkBAAIE", "file_unique_id": "u4",
                   "mime_type": "video/mp4"}},
     "video|CgACAgIAAxkBAAIE||,|/"),
    ({"location": {"latitude": 52.520008, "longitude": 13.404954}},
     "location|||52.520008,13.404954|/"),
    ({"contact": {"phone_number": "+4915112345678", "first_name": "Grace",
                  "last_name": "Hopper", "user_id": 77}},
     "contact|||,|Grace Hopper/+4915112345678"),
])
async def test_media_reach_the_flow_as_variables(
        tmp_path: Path, fake: FakeTelegram, fields: dict[str, Any], shown: str) -> None:
    async with telegram(tg_config(tmp_path, fake, flows=SHOW_FLOWS), fake) as tg:
        assert (await tg.post_update(media_update(1, **fields)))[0] == 200
        assert [p["text"] for p in fake.sent()] == [shown]
        # the next text message carries none of it, nor does a button press
        await tg.say("plain", 2)
        assert fake.sent()[-1]["text"] == "||plain|,|/"
        await tg.post_update(media_update(3, **fields))
        await tg.press("other:1", 4)
        assert fake.sent()[-1]["text"].startswith("||")


async def test_an_input_asking_for_media_takes_a_photo_without_caption(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake, flows=MEDIA_FLOWS), fake) as tg:
        await tg.say("hello", 1)
        assert [p["text"] for p in await tg.say("no photo, sorry", 2)] == [
            "Please send a photo, a file or a link.", "Send the receipt"]
        await tg.post_update(media_update(3, document={
            "file_id": "BQACAgIAAxkBAAIB", "file_unique_id": "u1", "file_name": "r.pdf",
            "mime_type": "application/pdf"}))
        assert fake.sent()[-1]["text"] == "document BQACAgIAAxkBAAIB [] application/pdf r.pdf"


@pytest.mark.parametrize("fields", [
    {"location": {"latitude": 52.520008, "longitude": 13.404954}},
    {"venue": {"location": {"latitude": 52.52, "longitude": 13.4}, "title": "TV tower",
               "address": "Panoramastr. 1A"},
     "location": {"latitude": 52.52, "longitude": 13.4}},
    {"contact": {"phone_number": "+4915112345678", "first_name": "Grace"}},
])
async def test_an_input_asking_for_media_asks_again_for_a_location_or_a_contact(
        tmp_path: Path, fake: FakeTelegram, fields: dict[str, Any]) -> None:
    """validation = "media" wants a file (photo, document, voice, audio, video)."""
    async with telegram(tg_config(tmp_path, fake, flows=MEDIA_FLOWS), fake) as tg:
        await tg.say("hello", 1)
        await tg.post_update(media_update(2, **fields))
        assert [p["text"] for p in fake.sent()[-2:]] == [
            "Please send a photo, a file or a link.", "Send the receipt"]
        await tg.post_update(media_update(3, voice={
            "file_id": "AwACAgIAAxkBAAIC", "file_unique_id": "u2", "duration": 3,
            "mime_type": "audio/ogg"}))
        assert fake.sent()[-1]["text"] == "voice AwACAgIAAxkBAAIC [] audio/ogg "


# -- media out -----------------------------------------------------------------------------

MEDIA_OUT_FLOWS = """
[flows.main]
start = "photo"
[flows.main.blocks.photo]
type = "message"
text = "Your <ticket>, {{user_name}}"
image = "https://cdn.example/t/{{user_name}}.png"
next = "terms"
[flows.main.blocks.terms]
type = "message"
text = "{long}"
document = "https://cdn.example/terms.pdf"
next = "pick"
[flows.main.blocks.pick]
type = "buttons"
image = "https://cdn.example/seats.png"
text = "Pick a seat"
choices = [{ label = "Window", next = "bye" }, { label = "Aisle", next = "bye" }]
[flows.main.blocks.bye]
type = "end"
"""


async def test_a_block_sends_its_image_or_document_natively_with_the_text_as_caption(
        tmp_path: Path, fake: FakeTelegram) -> None:
    long = "Terms and conditions. " * 70  # 1,540 characters: over the 1,024 of a caption
    flows = MEDIA_OUT_FLOWS.replace("{long}", long.strip())
    async with telegram(tg_config(tmp_path, fake, flows=flows), fake) as tg:
        await tg.say("hello", 1, first_name="Ada", last_name="")
        calls = [(c.method, c.params) for c in fake.calls
                 if c.method in ("sendPhoto", "sendDocument", "sendMessage")]
        assert [m for m, _ in calls] == ["sendPhoto", "sendDocument", "sendMessage",
                                         "sendPhoto"]
        photo = calls[0][1]
        assert (photo["photo"], photo["caption"], photo["parse_mode"]) == (
            "https://cdn.example/t/Ada.png", "Your &lt;ticket&gt;, Ada", "HTML")
        doc, rest = calls[1][1], calls[2][1]
        assert doc["document"] == "https://cdn.example/terms.pdf"
        assert len(doc["caption"]) <= 1024 and "reply_markup" not in doc
        # no line break: cut at a space (dropped), never mid-word
        assert doc["caption"].split()[-1] in ("Terms", "and", "conditions.")
        assert doc["caption"] + " " + rest["text"] == long.strip()
        seats = calls[3][1]
        assert (seats["photo"], seats["caption"]) == ("https://cdn.example/seats.png",
                                                     "Pick a seat")
        assert [row[0]["text"] for row in keyboard(seats)] == ["Window", "Aisle"]
        assert all(r[0] == "sent" for r in await tg.outbox_rows())


@pytest.mark.parametrize("refusal", [
    "Bad Request: failed to get HTTP URL content",
    "Bad Request: wrong type of the web page content",
    "Bad Request: wrong file identifier/HTTP URL specified",
    "Bad Request: IMAGE_PROCESS_FAILED",
])
async def test_a_file_telegram_cannot_fetch_still_delivers_the_text_and_the_buttons(
        tmp_path: Path, fake: FakeTelegram, refusal: str) -> None:
    """Telegram downloads the file itself and refuses the whole sendPhoto when it cannot
    (the host is down, the page is HTML, the image too large): the question and its
    buttons must still reach the user, with the file as a link, or the user is stuck."""
    flows = MEDIA_OUT_FLOWS.replace("{long}", "Terms")
    async with telegram(tg_config(tmp_path, fake, flows=flows), fake) as tg:
        fake.fail_next("sendPhoto", 400, refusal)
        fake.fail_next("sendPhoto", 400, refusal)
        await tg.say("hello", 1, first_name="Ada", last_name="")
        texts = [p["text"] for p in fake.sent()]
        assert texts == ["Your &lt;ticket&gt;, Ada\n\nhttps://cdn.example/t/Ada.png",
                         "Pick a seat\n\nhttps://cdn.example/seats.png"]
        assert [row[0]["text"] for row in keyboard(fake.sent()[-1])] == ["Window", "Aisle"]
        assert all(r[0] == "sent" for r in await tg.outbox_rows())
        assert [c.method for c in fake.calls].count("sendDocument") == 1  # its own went


FILE_FROM_VARIABLE_FLOWS = """
[flows.main]
start = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Which picture?"
variable = "pic"
next = "show"
[flows.main.blocks.show]
type = "message"
text = "Here"
image = "{{pic}}"
next = "ask"
"""


@pytest.mark.parametrize(("answer", "photo"), [
    ("https://cdn.example/a/b.png?size=2&x=%20", "https://cdn.example/a/b.png?size=2&x=%20"),
    ("  http://cdn.example/c.jpg ", "http://cdn.example/c.jpg"),
    ("not a url", None),  # no http(s) URL: the text goes alone
    ("https://", None),
    ("javascript:alert(1)", None),
])
async def test_a_file_url_taken_from_a_variable_is_sent_as_it_is(
        tmp_path: Path, fake: FakeTelegram, answer: str, photo: str | None) -> None:
    """`image = "{{pic}}"` passes `check`; the URL the variable holds is the file's URL, not
    a percent-encoded value (https%3A%2F%2F… Telegram cannot fetch)."""
    flows = FILE_FROM_VARIABLE_FLOWS
    async with telegram(tg_config(tmp_path, fake, flows=flows), fake) as tg:
        await tg.say("hi", 1)
        await tg.say(answer, 2)
        photos = fake.sent("sendPhoto")
        if photo is None:
            assert photos == [] and fake.sent()[-2]["text"] == "Here"
        else:
            assert [(p["photo"], p["caption"]) for p in photos] == [(photo, "Here")]
        assert fake.sent()[-1]["text"] == "Which picture?"


async def test_a_deep_link_starts_a_new_conversation_with_its_payload_whatever_the_restart_words(
        tmp_path: Path, fake: FakeTelegram) -> None:
    """With `/start` not among restart_words, a new user arriving by t.me/<bot>?start=ref_9
    still starts the flow with start_payload = ref_9 (it is the first message); later,
    "/start x" is an answer like any text."""
    config = write_config(tmp_path, DEEP_LINK_FLOWS, f"""
        [channels.telegram]
        enabled = true
        api_base_url = "{fake.base_url}"
        [bot]
        restart_words = ["menu"]
    """)
    async with telegram(config, fake) as tg:
        sent = await tg.say("/start ref_9", 1)
        assert [p["text"] for p in sent] == ["Payload: [ref_9]", "Your name?"]
        assert [p["text"] for p in await tg.say("/start other", 2)] == ["Thanks /start other"]
        assert [p["text"] for p in await tg.say("hello", 3)] == ["Payload: []", "Your name?"]


ALBUM_FLOWS = """
[flows.main]
start = "receipt"
[flows.main.blocks.receipt]
type = "input"
text = "Photo of the receipt?"
validation = "media"
variable = "receipt"
next = "id"
[flows.main.blocks.id]
type = "input"
text = "Photo of your ID?"
validation = "media"
variable = "id_photo"
next = "done"
[flows.main.blocks.done]
type = "end"
text = "Got {{receipt}} and {{id_photo}}"
"""


def photo(file_id: str) -> list[dict[str, Any]]:
    return [{"file_id": f"{file_id}-s", "file_unique_id": "s", "width": 90, "height": 90},
            {"file_id": file_id, "file_unique_id": "l", "width": 800, "height": 800}]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1]])
async def test_an_album_answers_one_question_not_the_ones_after_it(
        tmp_path: Path, fake: FakeTelegram, order: list[int]) -> None:
    """Several photos sent at once reach a bot as one update each, sharing a
    media_group_id (webhooks may reorder them). The album answers the open question once;
    its other photos must not silently answer the questions that follow."""
    async with telegram(tg_config(tmp_path, fake, flows=ALBUM_FLOWS), fake) as tg:
        await tg.say("hi", 1)
        album = [media_update(10 + i, photo=photo(f"P{i}"), media_group_id="13579")
                 for i in range(3)]
        for i in order:
            assert (await tg.post_update(album[i]))[0] == 200
        assert [p["text"] for p in fake.sent()] == ["Photo of the receipt?", "Photo of your ID?"]
        assert (await tg.post_update(album[order[0]]))[0] == 200  # redelivered: nothing new
        await tg.post_update(media_update(20, photo=photo("ID")))
        assert fake.sent()[-1]["text"] == f"Got P{order[0]} and ID"


@pytest.mark.parametrize("text", ["{{greeting}} {{name}}", "\\n\\n{{name}}\\n"])
async def test_a_question_whose_text_renders_blank_still_brings_its_buttons(
        tmp_path: Path, fake: FakeTelegram, text: str) -> None:
    """Telegram refuses a message of only spaces and line breaks ("message text is
    empty"), for good: the buttons with it never arrived and the user was stuck."""
    flows = f"""
[flows.main]
start = "pick"
[flows.main.blocks.pick]
type = "buttons"
text = "{text}"
choices = [{{ label = "Yes", next = "bye" }}, {{ label = "No", next = "bye" }}]
[flows.main.blocks.bye]
type = "end"
text = "Bye"
"""
    async with telegram(tg_config(tmp_path, fake, flows=flows), fake) as tg:
        [sent] = await tg.say("hi", 1)
        assert sent["text"] == "…"
        assert [row[0]["text"] for row in keyboard(sent)] == ["Yes", "No"]
        assert all(r[0] == "sent" for r in await tg.outbox_rows())
