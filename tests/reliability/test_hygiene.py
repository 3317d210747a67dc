"""Odd text and non-JSON numbers at the edge: invalid UTF-8, lone surrogates, NaN, Infinity,
1e999 and deep nesting get a 400 JSON error on HTTP and an error frame on the web chat's
WebSocket (which stays open), never a 500, a 1011 close or a traceback; a refused frame
names its id so the page can drop it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.reliability.common import App, load, snapshot, write_config
from tests.test_web_channel import SESSION, Chat, chat_app, example_config, texts


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = await App(load(write_config(tmp_path))).start()
    for user in ("a", "b"):
        await app.say(user, "hi")
        await app.say(user, "pay" if user == "a" else "hook")
    await app.flush()
    yield app
    await app.close()


async def _raw(app: App, path: str, body: bytes,
               content_type: str = "application/json") -> tuple[int, str, Any]:
    assert app.client is not None
    resp = await app.client.post(path, data=body, headers={"Content-Type": content_type})
    text = await resp.text()
    return resp.status, resp.content_type, json.loads(text)


LONE = b'"\\ud800"'  # a JSON escape of a lone UTF-16 surrogate
BAD_BODIES = [
    (b'{"executionId": ' + LONE + b', "success": true}', "bad_text"),
    (b'{"executionId": "x", "success": true, "data": {"k": ' + LONE + b"}}", "bad_text"),
    (b'{"executionId": "x", "success": true, "data": {' + LONE + b": 1}}", "bad_text"),
    (b'{"conversation_key": ' + LONE + b"}", "bad_text"),
    (b'{"conversation_key": "k", "amount": "\\udfff\\ud800"}', "bad_text"),
    (b'{"executionId": "\xed\xa0\x80", "success": true}', "bad_text"),  # CESU surrogate
    (b'{"executionId": "\xff", "success": true}', "bad_text"),
    (b'{"conversation_key": "k", "amount": NaN}', "bad_number"),
    (b'{"conversation_key": "k", "amount": Infinity}', "bad_number"),
    (b'{"conversation_key": "k", "amount": -Infinity}', "bad_number"),
    (b'{"conversation_key": "k", "amount": 1e999}', "bad_number"),
    (b'{"conversation_key": "k", "amount": -1e400}', "bad_number"),
]


@pytest.mark.parametrize("path", ["/webview/callback", "/webhook"])
@pytest.mark.parametrize(("body", "code"), BAD_BODIES)
async def test_bad_text_and_numbers_are_400_json_and_change_nothing(
        app: App, path: str, body: bytes, code: str) -> None:
    before = snapshot(Path(app.config.storage.path))
    status, content_type, doc = await _raw(app, path, body)
    assert (status, content_type, doc["error"]) == (400, "application/json", code), doc
    assert doc["message"]
    assert snapshot(Path(app.config.storage.path)) == before


async def test_a_pending_webhook_payload_with_nan_is_refused_not_stored(app: App) -> None:
    key = (await app.runtime.worker.run(_key_of, "b"))
    before = snapshot(Path(app.config.storage.path))
    body = json.dumps({"conversation_key": key, "order": {"status": float("nan")}}).encode()
    assert b"NaN" in body  # Python's json writes it; RFC 8259 does not allow it
    status, _, doc = await _raw(app, "/webhook", body)
    assert (status, doc["error"]) == (400, "bad_number")
    assert snapshot(Path(app.config.storage.path)) == before
    # the same payload with a finite number goes through
    body = json.dumps({"conversation_key": key, "order": {"status": 1e300}}).encode()
    assert (await _raw(app, "/webhook", body))[0] == 200
    await app.flush()
    assert app.texts("b")[-1] == "hooked 1e+300"


def _key_of(store: Any, user: str) -> str:
    return str(store.conversation("rec", user, "", 0).key)


async def test_form_with_invalid_utf8_escape_is_400(app: App) -> None:
    status, _, doc = await _raw(app, "/webhook?conversation_key=k", b"amount=%FF%FE",
                                "application/x-www-form-urlencoded")
    assert (status, doc["error"]) == (400, "bad_body")  # neither JSON nor a UTF-8 form


# -- the web chat's WebSocket -----------------------------------------------------------


@pytest.fixture
async def chat(tmp_path: Path) -> AsyncIterator[Chat]:
    async with chat_app(example_config(tmp_path)) as c:
        yield c


@pytest.mark.parametrize(("raw", "says"), [
    ('{"type": "text", "id": "s1", "text": "\\ud800"}', "surrogate"),
    ('{"type": "text", "id": "s1", "text": "a\\udc00b"}', "surrogate"),
    ('{"type": "text", "id": "s1", "text": "hi", "n": NaN}', "not a JSON number"),
    ('{"type": "text", "id": "s1", "text": "hi", "n": 1e999}', "out of range"),
    ('{"type": "text", "id": "s1", "text": "hi", "x": ' + "[" * 7000 + "]" * 7000 + "}",
     "nested"),
    ("[" * 15_000, "nested"),  # unclosed, and too deep to parse
    ('{"type": "text", "id": "s1", "text": "hi", "x": ' + '{"a":' * 50 + "1" + "}" * 50 + "}",
     "nested"),
])
async def test_bad_frames_get_an_error_frame_with_their_id_and_the_socket_stays_open(
        chat: Chat, raw: str, says: str) -> None:
    tab = chat.tab()
    await tab.open()
    assert tab.ws is not None
    await tab.ws.send_str(raw)
    answer = await tab.frame()
    assert answer["type"] == "error" and says in answer["message"], answer
    if raw.startswith("{") and len(raw) < 1000:  # (too deep even to find its id: no id)
        assert answer.get("id") == "s1"  # the page drops exactly that message
    assert await chat.history(SESSION) == []
    # the socket is still open and the conversation goes on
    assert texts(await tab.say("hi", cid="s2"))[-1] == "What's your name?"
    assert not tab.ws.closed
    await tab.close()


async def test_emoji_rtl_and_nul_go_through(chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    await tab.say("hi")
    name = "שלום 👋🏽 a\x00b"
    [menu] = await tab.say(name)
    assert menu["text"] == f"Nice to meet you, {name}. What would you like to try?"
    await tab.close()


async def test_ws_frame_over_the_size_limit_closes_with_1009_not_1011(chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    assert tab.ws is not None
    await tab.ws.send_str('{"type": "text", "id": "big", "text": "' + "x" * 20_000 + '"}')
    msg = await tab.ws.receive()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert tab.ws.close_code == 1009
