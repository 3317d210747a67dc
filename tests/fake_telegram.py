"""A local fake of the Telegram Bot API: a real aiohttp server on 127.0.0.1 that answers
`/bot<token>/<method>` like Telegram does, records every call, and can be told to fail.

Also: `sign_init_data`, which signs Mini App initData the way Telegram does, and
`no_internet`, an autouse fixture that fails a test making any HTTP request off 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

TOKEN = "123456789:AAFakeTokenForTestsOnly_abcdefghijk"
BOT_USER = {"id": 123456789, "is_bot": True, "first_name": "Flowbot Test",
            "username": "flowbot_test_bot", "can_join_groups": True,
            "can_read_all_group_messages": False, "supports_inline_queries": False,
            "can_connect_to_business": False, "has_main_web_app": False}
PAYLOADS = Path(__file__).parent / "payloads" / "telegram"
# PTB sends form fields; these carry JSON-serialized values.
JSON_FIELDS = {"reply_markup", "allowed_updates", "link_preview_options", "entities"}


def utf16_len(text: str) -> int:
    """How Telegram counts text lengths: UTF-16 code units (an astral emoji is 2)."""
    return len(text.encode("utf-16-le")) // 2


def payload(name: str) -> dict[str, Any]:
    """A real-shaped update from tests/payloads/telegram/<name>.json (a fresh copy)."""
    data: dict[str, Any] = json.loads((PAYLOADS / f"{name}.json").read_text())
    return data


@dataclass
class Call:
    method: str
    params: dict[str, Any]


@dataclass
class FakeTelegram:
    token: str = TOKEN
    calls: list[Call] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)  # served by getUpdates
    webhook: dict[str, Any] = field(default_factory=lambda: {"url": ""})
    # answers for the next calls of a method (None: answered normally)
    failures: dict[str, list[tuple[int, dict[str, Any]] | None]] = field(default_factory=dict)
    base_url: str = ""
    _next_message_id: int = 1000
    _changed: asyncio.Condition | None = None
    _closing: bool = False

    # -- what tests use -------------------------------------------------------------------

    def sent(self, method: str = "sendMessage") -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.method == method]

    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    def fail_next(self, method: str, status: int, description: str,
                  parameters: Mapping[str, Any] | None = None) -> None:
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if parameters:
            body["parameters"] = dict(parameters)
        self.failures.setdefault(method, []).append((status, body))

    def hang_up_next(self, method: str = "sendMessage") -> None:
        """The next call gets no answer: the connection is closed, as a dropped one is."""
        self.failures.setdefault(method, []).append((0, {}))

    def succeed_next(self, method: str = "sendMessage") -> None:
        """The next call is answered normally (to fail the one after it)."""
        self.failures.setdefault(method, []).append(None)

    def flood(self, retry_after: int, method: str = "sendMessage") -> None:
        """The next call answers 429 like Telegram's flood control."""
        self.fail_next(method, 429, f"Too Many Requests: retry after {retry_after}",
                       {"retry_after": retry_after})

    def block(self, method: str = "sendMessage") -> None:
        self.fail_next(method, 403, "Forbidden: bot was blocked by the user")

    async def queue_update(self, update: dict[str, Any]) -> None:
        self.updates.append(update)
        await self._notify()

    async def wait_for(self, check: Callable[[FakeTelegram], bool], timeout: float = 5.0) -> None:
        """Until `check(self)` holds after some call (a safety cap, not a sleep)."""
        assert self._changed is not None

        async def waiting() -> None:
            assert self._changed is not None
            async with self._changed:
                await self._changed.wait_for(lambda: check(self))

        await asyncio.wait_for(waiting(), timeout)

    # -- the server -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        return app

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            for key, value in (await request.post()).items():
                value = value if isinstance(value, str) else str(value)
                params[key] = json.loads(value) if key in JSON_FIELDS else value
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401,
                                      "description": "Unauthorized"}, status=401)
        params = await self._params(request)
        self.calls.append(Call(method, params))
        await self._notify()
        queued = self.failures.get(method)
        failure = queued.pop(0) if queued else None
        if failure is not None:
            status, body = failure
            if status == 0 and request.transport is not None:
                request.transport.abort()
            return web.json_response(body, status=status or 500)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return web.json_response({"ok": False, "error_code": 404,
                                      "description": "Not Found"}, status=404)
        result = await handler(params)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"ok": True, "result": result})

    async def _m_getMe(self, params: dict[str, Any]) -> Any:
        return BOT_USER

    async def _m_sendMessage(self, params: dict[str, Any]) -> Any:
        if str(params.get("chat_id")) == "404":
            return web.json_response({"ok": False, "error_code": 400,
                                      "description": "Bad Request: chat not found"}, status=400)
        for row in (params.get("reply_markup") or {}).get("inline_keyboard", []):
            for button in row:
                url = button.get("url") or (button.get("web_app") or {}).get("url", "")
                if re.match(r"https?://(localhost|127\.0\.0\.1)[:/]", url):
                    return web.json_response({"ok": False, "error_code": 400, "description":
                                              f"Bad Request: inline keyboard button URL '{url}' "
                                              "is invalid: wrong HTTP URL"}, status=400)
        # the text as shown: markup parsed, entities apart; at most 4,096 UTF-16 code units
        text = html.unescape(re.sub(r"<[^>]+>", "", params["text"]))
        if not text.strip() or utf16_len(text) > 4096:
            return web.json_response({"ok": False, "error_code": 400, "description":
                                      "Bad Request: message is too long" if text.strip()
                                      else "Bad Request: message text is empty"}, status=400)
        self._next_message_id += 1
        chat_id = int(params["chat_id"])
        message: dict[str, Any] = {
            "message_id": self._next_message_id,
            "from": {k: BOT_USER[k] for k in ("id", "is_bot", "first_name", "username")},
            "chat": {"id": chat_id, "first_name": "Ada", "type": "private"},
            "date": 1_700_000_000,
            "text": text,
        }
        if "reply_markup" in params:
            message["reply_markup"] = params["reply_markup"]
        return message

    async def _m_sendPhoto(self, params: dict[str, Any]) -> Any:
        return self._file_message(params, "photo")

    async def _m_sendDocument(self, params: dict[str, Any]) -> Any:
        return self._file_message(params, "document")

    def _file_message(self, params: dict[str, Any], kind: str) -> Any:
        """Telegram fetches a file given by URL; refuses a caption over 1,024 characters
        (UTF-16 code units, counted after entities parsing)."""
        caption = html.unescape(re.sub(r"<[^>]+>", "", params.get("caption", "")))
        if utf16_len(caption) > 1024:
            return web.json_response({"ok": False, "error_code": 400, "description":
                                      "Bad Request: message caption is too long"}, status=400)
        self._next_message_id += 1
        file = {"file_id": f"F{self._next_message_id}", "file_unique_id": "u"}
        message: dict[str, Any] = {
            "message_id": self._next_message_id, "date": 1_700_000_000,
            "chat": {"id": int(params["chat_id"]), "type": "private"},
            kind: [{**file, "width": 1, "height": 1}] if kind == "photo" else file,
        }
        if caption:
            message["caption"] = caption
        return message

    async def _m_answerCallbackQuery(self, params: dict[str, Any]) -> Any:
        return True

    async def _m_setWebhook(self, params: dict[str, Any]) -> Any:
        self.webhook = {"url": params["url"], "secret_token": params.get("secret_token"),
                        "allowed_updates": params.get("allowed_updates")}
        return True

    async def _m_deleteWebhook(self, params: dict[str, Any]) -> Any:
        self.webhook = {"url": ""}
        return True

    async def _m_getWebhookInfo(self, params: dict[str, Any]) -> Any:
        info: dict[str, Any] = {"url": self.webhook["url"], "has_custom_certificate": False,
                                "pending_update_count": len(self.updates)}
        if self.webhook["url"]:
            info.update(max_connections=40, ip_address="203.0.113.7",
                        allowed_updates=self.webhook.get("allowed_updates") or [],
                        last_error_date=1_700_000_000,
                        last_error_message="Wrong response from the webhook: 502 Bad Gateway")
        return info

    async def _m_getUpdates(self, params: dict[str, Any]) -> Any:
        if self.webhook["url"]:
            return web.json_response({"ok": False, "error_code": 409, "description":
                                      "Conflict: can't use getUpdates method while webhook is "
                                      "active; use deleteWebhook to delete the webhook first"},
                                     status=409)
        offset = int(params.get("offset", 0) or 0)
        self.updates = [u for u in self.updates if u["update_id"] >= offset]  # confirmed
        if not self.updates and int(params.get("timeout", 0) or 0) > 0:
            assert self._changed is not None
            try:
                async with self._changed:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: bool(self.updates) or self._closing),
                        float(params["timeout"]))
            except TimeoutError:
                pass
        limit = int(params.get("limit", 100) or 100)
        return self.updates[:limit]


@pytest.fixture(name="fake")
async def fake_telegram_fixture() -> AsyncIterator[FakeTelegram]:
    """A started FakeTelegram; point api_base_url at `fake.base_url`."""
    fake = FakeTelegram()
    fake._changed = asyncio.Condition()
    # no access log: it would show the token in the URL, as Telegram's own logs would
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server(access_log=None)
    fake.base_url = str(server.make_url("/bot"))
    try:
        yield fake
    finally:
        fake._closing = True
        await fake._notify()
        await server.close()


@pytest.fixture(name="no_internet", autouse=True)
def no_internet_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test on any HTTP request PTB (httpx) makes to a host other than 127.0.0.1."""
    real = httpx.AsyncHTTPTransport.handle_async_request

    async def guarded(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if request.url.host not in ("127.0.0.1", "localhost"):
            pytest.fail(f"a test tried to reach {request.url.host}")
        return await real(self, request)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", guarded)
    yield


def sign_init_data(fields: Mapping[str, str], bot_token: str = TOKEN) -> str:
    """initData as Telegram builds it for a Mini App: the fields plus their hash, URL-encoded.
    Written from Telegram's description, independently of channels/telegram_auth.py."""
    data_check_string = "\n".join(f"{k}={fields[k]}" for k in sorted(fields))
    secret_key = hmac.new(key=b"WebAppData", msg=bot_token.encode(), digestmod=hashlib.sha256)
    digest = hmac.new(key=secret_key.digest(), msg=data_check_string.encode(),
                      digestmod=hashlib.sha256).hexdigest()
    return urlencode({**fields, "hash": digest})
