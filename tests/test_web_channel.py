"""The web chat channel's WebSocket protocol and pages, driven without a browser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bot.clock import FakeClock
from bot.config import Config, load_config
from bot.outbox import Outbox
from bot.runtime import Runtime
from bot.server import OUTBOX, RUNTIME, build_app, enabled_channels
from channels.base import Inbound, Message
from storage.store import Store
from tests.support import query, write_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SESSION = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
GUARD = 5.0  # seconds; only a hung test ever waits this long

HELLO = "Hi! I'm the flowbot demo. I can wait for a web page and for a webhook without losing my place."


def example_config(tmp_path: Path, **server: Any) -> Config:
    """config.example.toml as shipped, with its database in tmp_path."""
    config = load_config(EXAMPLE)
    return replace(config, storage=replace(config.storage, path=tmp_path / "web.db"),
                   server=replace(config.server, **server))


@dataclass
class Chat:
    client: TestClient[Any, Any]
    runtime: Runtime
    outbox: Outbox
    clock: FakeClock

    def tab(self, session: str = SESSION) -> Tab:
        return Tab(self, session)

    async def history(self, session: str, after: int = 0) -> list[int]:
        rows = await self.runtime.worker.run(Store.web_history, session, after)
        return [d.id for d in rows]


@dataclass
class Tab:
    """One browser tab as far as the protocol goes."""

    chat: Chat
    session: str
    ws: aiohttp.ClientWebSocketResponse | None = None
    last: int = 0
    buffered: list[dict[str, Any]] = field(default_factory=list)
    counter: int = 0
    earlier: int | None = None  # an "earlier" frame's `last`: older messages left out

    async def open(self, after: int | None = None) -> list[dict[str, Any]]:
        """Connect; returns the replayed messages (everything before "ready")."""
        after = self.last if after is None else after
        self.ws = await self.chat.client.ws_connect(f"/ws?session={self.session}&after={after}")
        replayed = []
        while (frame := await self.frame())["type"] != "ready":
            if frame["type"] == "earlier":
                assert not replayed and self.earlier is None
                self.earlier = frame["last"]
                continue
            assert frame["type"] == "message"
            replayed.append(frame)
        if replayed:
            self.last = replayed[-1]["id"]
        assert frame["last"] == self.last
        return replayed

    async def close(self) -> None:
        assert self.ws is not None
        await self.ws.close()

    async def frame(self) -> dict[str, Any]:
        if self.buffered:
            return self.buffered.pop(0)
        assert self.ws is not None
        msg = await asyncio.wait_for(self.ws.receive(), GUARD)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        doc: dict[str, Any] = json.loads(msg.data)
        return doc

    async def send(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a frame; returns the server's answer to it (ack or error)."""
        assert self.ws is not None
        await self.ws.send_json(frame)
        kept: list[dict[str, Any]] = []
        while True:
            got = await self.frame()
            if (got["type"] == "ack" and got["id"] == frame.get("id")) or got["type"] == "error":
                self.buffered[:0] = kept
                return got
            kept.append(got)

    async def messages(self) -> list[dict[str, Any]]:
        """Deliver what is due, then read exactly the messages committed for this session."""
        await self.chat.outbox.drain()
        expected = await self.chat.history(self.session, self.last)
        got: list[dict[str, Any]] = []
        while len(got) < len(expected):
            frame = await self.frame()
            if frame["type"] == "message":
                got.append(frame)
        assert [m["id"] for m in got] == expected
        if got:
            self.last = got[-1]["id"]
        return got

    def next_id(self) -> str:
        self.counter += 1
        return f"m{self.counter}"

    async def say(self, text: str, cid: str | None = None) -> list[dict[str, Any]]:
        ack = await self.send({"type": "text", "id": cid or self.next_id(), "text": text})
        assert ack["type"] == "ack" and ack["duplicate"] is False
        return await self.messages()

    async def press(self, message: dict[str, Any], label: str) -> list[dict[str, Any]]:
        button = next(b for b in message["buttons"] if b["label"] == label)
        ack = await self.send({"type": "button", "id": self.next_id(), "label": label,
                               "payload": button["payload"]})
        assert ack["type"] == "ack" and ack["duplicate"] is False
        return await self.messages()


@asynccontextmanager
async def chat_app(config: Config) -> AsyncIterator[Chat]:
    clock = FakeClock()
    app = build_app(config, channel_factories=enabled_channels(config), clock=clock,
                    run_background=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Chat(client, app[RUNTIME], app[OUTBOX], clock)


@pytest.fixture
async def chat(tmp_path: Path) -> AsyncIterator[Chat]:
    async with chat_app(example_config(tmp_path)) as c:
        yield c


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages]


async def to_payment(tab: Tab, name: str = "Ada") -> dict[str, Any]:
    """Walk the demo flow to its WebView message; returns that message."""
    assert texts(await tab.say("hi")) == [HELLO, "What's your name?"]
    [menu] = await tab.say(name)
    assert menu["text"] == f"Nice to meet you, {name}. What would you like to try?"
    assert [b["label"] for b in menu["buttons"]] == ["Pay with a web page", "Wait for a webhook"]
    [pay] = await tab.press(menu, "Pay with a web page")
    return pay


def execution_id(message: dict[str, Any]) -> str:
    return str(parse_qs(urlsplit(message["link"]["url"]).query)["executionId"][0])


# -- pages ---------------------------------------------------------------------------------


async def test_chat_page_demo_page_and_static_files(chat: Chat) -> None:
    resp = await chat.client.get("/")
    page = await resp.text()
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "<title>flowbot demo</title>" in page and "Say hi to start" in page
    assert 'src="static/chat.js"' in page  # relative, so a path prefix works
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]

    resp = await chat.client.get("/demo/webview?executionId=x&name=Ada")
    assert resp.status == 200 and "Demo payment page" in await resp.text()
    assert resp.headers["Referrer-Policy"] == "no-referrer"  # the URL holds an executionId

    for name, kind in [("chat.js", "text/javascript"), ("chat.css", "text/css"),
                       ("webview.js", "text/javascript"), ("webview.css", "text/css")]:
        resp = await chat.client.get(f"/static/{name}")
        assert (resp.status, resp.content_type) == (200, kind), name
    for name in ["nope.js", "chat.html", "..%2Fweb.py", ".hidden.js"]:
        resp = await chat.client.get(f"/static/{name}")
        assert resp.status == 404, name
        assert (await resp.json())["error"] in ("no_such_file", "not_found")


async def test_title_is_escaped(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    config = replace(config, channels=replace(
        config.channels, web=replace(config.channels.web, title="Tom & <Jerry>")))
    async with chat_app(config) as chat:
        page = await (await chat.client.get("/")).text()
    assert "<title>Tom &amp; &lt;Jerry&gt;</title>" in page and "<Jerry>" not in page


async def test_path_prefix(tmp_path: Path) -> None:
    async with chat_app(example_config(tmp_path, path_prefix="/bot")) as chat:
        assert (await chat.client.get("/bot/")).status == 200
        assert (await chat.client.get("/bot/static/chat.js")).status == 200
        assert (await chat.client.get("/bot/demo/webview")).status == 200
        assert (await chat.client.get("/")).status == 404
        resp = await chat.client.get("/bot", allow_redirects=False)
        assert (resp.status, resp.headers["Location"]) == (302, "bot/")
        ws = await chat.client.ws_connect(f"/bot/ws?session={SESSION}")
        assert json.loads((await ws.receive()).data) == {"type": "ready", "last": 0}
        await ws.close()


async def test_plain_get_of_socket_is_a_json_error(chat: Chat) -> None:
    resp = await chat.client.get(f"/ws?session={SESSION}")
    assert resp.status == 400
    assert (await resp.json())["error"] == "not_websocket"


# -- protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "reason"), [
    ("session=short", "bad session id"),
    ("", "bad session id"),
    ("session=" + "x" * 65, "bad session id"),
    ("session=a1b2c3d4e5f6a7b8%2F..%2Fxx", "bad session id"),
    (f"session={SESSION}&after=-1", "bad 'after'"),
    (f"session={SESSION}&after=abc", "bad 'after'"),
    (f"session={SESSION}&after=%C2%B2", "bad 'after'"),  # "²" is a digit to str.isdigit
])
async def test_bad_session_or_after_is_closed_with_a_reason(chat: Chat, query: str,
                                                            reason: str) -> None:
    ws = await chat.client.ws_connect(f"/ws?{query}")
    msg = await asyncio.wait_for(ws.receive(), GUARD)
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert msg.data == 4400 and reason in (msg.extra or "")
    assert (await chat.runtime.worker.run(Store.counts))["conversations"] == 0


async def test_text_and_button_walk_the_demo_flow_to_a_paid_webview(chat: Chat) -> None:
    tab = chat.tab()
    assert await tab.open() == []
    pay = await to_payment(tab)
    assert pay["text"] == "Press the button to open the payment page. You have 2 minutes."
    assert pay["buttons"] == [] and pay["link"]["label"] == "Pay 9.99 EUR"
    url = urlsplit(pay["link"]["url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == "http://127.0.0.1:8080/demo/webview"
    assert parse_qs(url.query)["name"] == ["Ada"] and parse_qs(url.query)["amount"] == ["9.99"]

    # typing while the wait is open gets the pending message
    assert texts(await tab.say("hello?")) == [
        "I'm waiting for the payment page — finish it there (or wait 2 minutes for it to expire)."]

    resp = await chat.client.post("/webview/callback", json={
        "executionId": execution_id(pay), "success": True, "data": {"reference": "PAY-000042"}})
    assert resp.status == 200
    paid, again = await tab.messages()
    assert paid["text"] == "Payment received, thank you Ada! Reference: PAY-000042"
    assert again["text"] == "Anything else?"
    assert [b["label"] for b in again["buttons"]] == ["Back to the menu", "Done"]
    assert paid["link"] is None


async def test_choice_typed_as_a_number_then_the_webhook_completes_it(chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    await tab.say("hi")
    await tab.say("Ada")
    [intro] = await tab.say("2")
    assert intro["text"].startswith("I'm now waiting up to 5 minutes for a webhook.")
    # the command as printed: the conversation's own URL, and curl -d's form label on JSON
    command = next(line for line in intro["text"].splitlines() if line.startswith("curl"))
    url = command.split()[3]
    assert url.startswith("http://127.0.0.1:8080/webhook/")
    body = command.split(" -d ", 1)[1].strip("'")
    resp = await chat.client.post(url.removeprefix("http://127.0.0.1:8080"), data=body,
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 200
    assert texts(await tab.messages()) == ["Webhook received: order A-1001 is shipped.",
                                           "Anything else?"]
    await tab.close()


async def test_reconnect_with_after_replays_only_newer_messages(chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    await to_payment(tab)
    ids = await chat.history(SESSION)
    assert len(ids) == 4
    await tab.close()

    again = chat.tab()
    assert [m["id"] for m in await again.open(after=ids[1])] == ids[2:]
    await again.close()
    reload = chat.tab()
    replayed = await reload.open(after=0)  # a reloaded page: the newest 200, here all
    assert [m["id"] for m in replayed] == ids and reload.earlier is None
    assert replayed[2]["buttons"] and replayed[3]["link"]  # full messages, not only texts
    await reload.close()


async def test_a_reloaded_page_gets_the_newest_messages_and_where_they_start(
        chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    await to_payment(tab)
    ids = await chat.history(SESSION)
    await tab.close()
    chat.outbox.channels["web"].reload_messages = 3  # type: ignore[attr-defined]
    reload = chat.tab()
    assert [m["id"] for m in await reload.open(after=0)] == ids[1:]
    assert reload.earlier == ids[0]  # the newest message left out
    # a reconnect that says what it has still gets everything after it
    again = chat.tab()
    assert [m["id"] for m in await again.open(after=ids[0])] == ids[1:]
    assert again.earlier is None


async def test_messages_committed_while_disconnected_arrive_on_reconnect(chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    await to_payment(tab)
    await tab.close()

    assert await chat.runtime.fire_due() == 0
    chat.clock.advance(121)  # the WebView expires while the tab is closed
    assert await chat.runtime.fire_due() == 1
    await chat.outbox.drain()  # delivered to nobody: still "sent", kept for the replay
    counts = await chat.runtime.worker.run(Store.counts)
    assert counts.get("outbox_pending", 0) == 0

    assert texts(await tab.open()) == ["The payment page expired before it was completed.",
                                       "Anything else?"]


async def test_duplicate_client_message_id_is_handled_once(chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    await tab.say("hi", cid="c1")
    assert len(await tab.say("Ada", cid="c2")) == 1
    before = await chat.history(SESSION)
    # the page re-sends an unacknowledged message after a reconnect
    ack = await tab.send({"type": "text", "id": "c2", "text": "Ada"})
    assert ack == {"type": "ack", "id": "c2", "duplicate": True}
    assert await tab.messages() == []
    assert await chat.history(SESSION) == before
    # the same id in another session is another event
    other = chat.tab("f" * 32)
    await other.open()
    assert (await other.send({"type": "text", "id": "c2", "text": "hi"}))["duplicate"] is False
    await other.close()
    await tab.close()


async def test_every_tab_of_a_session_gets_live_messages_other_sessions_do_not(chat: Chat) -> None:
    one, two, stranger = chat.tab(), chat.tab(), chat.tab("s" * 20)
    for t in (one, two, stranger):
        await t.open()
    said = await one.say("hi")
    assert texts(said) == [HELLO, "What's your name?"]
    assert texts(await two.messages()) == [HELLO, "What's your name?"]
    assert await stranger.messages() == []
    assert await chat.history("s" * 20) == []
    for t in (one, two, stranger):
        await t.close()


async def test_bad_frames_get_an_error_and_the_socket_stays_open(chat: Chat) -> None:
    tab = chat.tab()
    await tab.open()
    assert tab.ws is not None
    await tab.ws.send_str("not json")
    assert await tab.frame() == {"type": "error", "message": "That frame is not JSON."}
    bad: list[tuple[Any, str]] = [
        ([1, 2], "JSON object"),
        ({"type": "text", "text": "hi"}, "'id'"),
        ({"type": "text", "id": "a b", "text": "hi"}, "'id'"),
        ({"type": "text", "id": "x1", "text": "   "}, "'text'"),
        ({"type": "text", "id": "x1", "text": "x" * 4097}, "'text'"),
        ({"type": "button", "id": "x1", "label": "Go"}, "'payload'"),
        ({"type": "sticker", "id": "x1"}, "'type'"),
    ]
    for frame, says in bad:
        answer = await tab.send(frame)
        assert answer["type"] == "error" and says in answer["message"], frame
    assert await chat.history(SESSION) == []
    assert texts(await tab.say("hi", cid="x1")) == [HELLO, "What's your name?"]
    await tab.close()


async def test_server_shutdown_closes_open_sockets(tmp_path: Path) -> None:
    """aiohttp waits (60 s by default) for running handlers at shutdown; an open chat socket
    must not hold `flowbot serve` up after Ctrl-C. (TestClient would close it itself.)"""
    config = example_config(tmp_path)
    runner = web.AppRunner(build_app(config, channel_factories=enabled_channels(config)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws?session={SESSION}")
        assert json.loads((await ws.receive()).data)["type"] == "ready"
        started = loop.time()
        await asyncio.wait_for(runner.cleanup(), GUARD)
        assert loop.time() - started < 2
        msg = await asyncio.wait_for(ws.receive(), GUARD)
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1001,
                                                   "server shutting down")


# -- a slow reader ---------------------------------------------------------------------------


def add_web_rows(store: Store, session: str, texts: list[str], now: float) -> None:
    """A database job: due outbox rows for one web chat session (a burst of replies)."""
    conv = store.conversation("web", session, f"key-{session}", now)
    store.conn.executemany(
        "INSERT INTO outbox (conversation_id, channel, user_id, message, next_attempt, created)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(conv.id, "web", session, Message(t).to_json(), now, now) for t in texts])


async def test_a_reader_too_slow_for_its_queue_is_dropped_and_gets_everything_on_reconnect(
        chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page that stops reading (a frozen tab, a dead link): the socket's buffers fill,
    frames queue up to MAX_QUEUED, then the server closes it with 1013 "reconnect". Nothing
    is lost: the page reconnects with its last id and gets the rest, in order, once each."""
    import channels.web

    monkeypatch.setattr(channels.web, "MAX_QUEUED", 20)
    tab = chat.tab()
    assert await tab.open() == []
    assert tab.ws is not None
    big = "x" * 60_000  # big frames fill the TCP buffers quickly
    sent = [f"{i:04d} {big}" for i in range(200)]  # ~100 fill them here
    await chat.runtime.worker.run(add_web_rows, SESSION, sent, chat.clock.now())
    await chat.outbox.drain()  # the page reads nothing meanwhile: aiohttp stops reading for it

    got: list[str] = []
    while True:  # now the page wakes up: what was in flight, then the close
        msg = await asyncio.wait_for(tab.ws.receive(), GUARD)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        frame = json.loads(msg.data)
        assert frame["type"] == "message"
        got.append(frame["text"])
        tab.last = frame["id"]
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert (msg.data, msg.extra) == (1013, "too many unsent messages; reconnect")
    assert 0 < len(got) < len(sent)  # it was cut off on the way
    replayed = [m["text"] for m in await tab.open()]  # the page reconnects
    assert got + replayed == sent


async def test_the_page_is_told_when_a_webview_wait_ends(chat: Chat) -> None:
    """So the page can turn the link inactive: a `wait_ended` frame with the outcome, for a
    callback, an expiry and a restart alike, to that session only."""
    async def ended(tab: Tab) -> dict[str, Any]:
        while (frame := await tab.frame())["type"] != "wait_ended":
            pass
        return frame

    paid, late, restarted = (chat.tab(f"session-{n}-0123456789abcdef") for n in range(3))
    for tab in (paid, late, restarted):
        await tab.open()
    eids = [execution_id(await to_payment(tab)) for tab in (paid, late, restarted)]

    resp = await chat.client.post("/webview/callback",
                                  json={"executionId": eids[0], "success": False})
    assert resp.status == 200
    assert await ended(paid) == {"type": "wait_ended", "executionId": eids[0],
                                 "outcome": "error"}
    await restarted.send({"type": "text", "id": restarted.next_id(), "text": "restart"})
    assert await ended(restarted) == {"type": "wait_ended", "executionId": eids[2],
                                      "outcome": "cancelled"}
    chat.clock.advance(121)
    assert await chat.runtime.fire_due() == 1
    assert await ended(late) == {"type": "wait_ended", "executionId": eids[1],
                                 "outcome": "expired"}
    for tab in (paid, late, restarted):  # each heard of its own wait only
        assert [f for f in tab.buffered if f["type"] == "wait_ended"] == []


async def test_a_page_offline_when_its_webview_waits_ended_learns_it_on_reconnect(
        chat: Chat) -> None:
    """A wait that ended while the page had no socket (its tab asleep, its network gone, a
    reload): the page asks about the links it still shows open, once it has its replay, and
    hears `wait_ended` for each that ended, however it ended; nothing for one still open."""
    async def ask(tab: Tab, ids: list[str]) -> list[dict[str, Any]]:
        assert tab.ws is not None
        await tab.ws.send_json({"type": "waits", "id": tab.next_id(), "executionIds": ids})
        # a text frame after it: the server answers frames in order, so its ack comes last
        ack = await tab.send({"type": "text", "id": tab.next_id(), "text": "are you there?"})
        assert ack["type"] == "ack"
        told = [f for f in tab.buffered if f["type"] == "wait_ended"]
        tab.buffered = [f for f in tab.buffered if f["type"] != "wait_ended"]
        return told

    expired, paid, cancelled = (chat.tab(f"session-{n}-0123456789abcdef") for n in range(3))
    eids = {}
    for tab in (expired, paid, cancelled):
        await tab.open()
        eids[tab.session] = execution_id(await to_payment(tab))
        await tab.close()  # offline from here on
    # all three end while no page is connected
    resp = await chat.client.post("/webview/callback", json={
        "executionId": eids[paid.session], "success": True, "data": {"reference": "R-1"}})
    assert resp.status == 200
    await chat.runtime.handle_inbound(Inbound("web", cancelled.session, "restart"))
    chat.clock.advance(121)
    assert await chat.runtime.fire_due() == 1

    tab = expired
    await tab.open()  # resumes after its last message: the expiry's message comes back
    assert await ask(tab, [eids[tab.session]]) == [
        {"type": "wait_ended", "executionId": eids[tab.session], "outcome": "expired"}]
    await paid.open(after=0)  # a reload
    assert await ask(paid, [eids[paid.session]]) == [
        {"type": "wait_ended", "executionId": eids[paid.session], "outcome": "success"}]
    await cancelled.open()
    assert await ask(cancelled, [eids[cancelled.session]]) == [
        {"type": "wait_ended", "executionId": eids[cancelled.session], "outcome": "cancelled"}]
    # a wait still open: nothing; an id the database no longer has (pruned) or another
    # session's: "gone" (nothing about another session's wait is told)
    fresh = chat.tab("session-9-0123456789abcdef")
    await fresh.open()
    still = execution_id(await to_payment(fresh))
    assert await ask(fresh, [still, "x" * 24, eids[paid.session]]) == [
        {"type": "wait_ended", "executionId": "x" * 24, "outcome": "gone"},
        {"type": "wait_ended", "executionId": eids[paid.session], "outcome": "gone"}]
    # a malformed question is refused, and the socket stays open
    for bad in ("nope", ["short"], ["x" * 24] * 201, [1]):
        assert fresh.ws is not None
        await fresh.ws.send_json({"type": "waits", "id": "w1", "executionIds": bad})
        refused = await fresh.frame()
        assert refused["type"] == "error" and refused["id"] == "w1"
        assert "executionIds" in refused["message"]


async def test_the_page_is_told_when_a_webview_wait_is_removed_with_its_block(
        chat: Chat) -> None:
    """A wait whose block is gone (a node with an older config wrote it) ends "removed"
    when a callback or the timer meets it: its page hears it as of any other end."""
    tab = chat.tab()
    await tab.open()
    eid = execution_id(await to_payment(tab))
    await chat.runtime.worker.run(query, "UPDATE waits SET block = 'old_pay' WHERE id = ?",
                                  (eid,))
    await chat.runtime.worker.run(query, "UPDATE conversations SET block = 'old_pay'")
    resp = await chat.client.post("/webview/callback", json={"executionId": eid,
                                                             "success": True})
    assert resp.status == 410 and (await resp.json())["error"] == "gone"
    while (frame := await tab.frame())["type"] != "wait_ended":
        pass
    assert frame == {"type": "wait_ended", "executionId": eid, "outcome": "removed"}
    assert texts(await tab.messages())[0].startswith("Sorry, this conversation was changed")


async def test_an_input_asking_for_media_takes_a_link_in_the_web_chat(tmp_path: Path) -> None:
    """The web chat carries links, not files: a typed http(s) link answers
    `validation = "media"`, other text is asked again."""
    config = write_config(tmp_path, """
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
        text = "Got {{receipt}}"
    """)
    config = replace(config, channels=replace(
        config.channels, web=replace(config.channels.web, enabled=True)))
    async with chat_app(config) as c:
        tab = c.tab()
        await tab.open()
        assert texts(await tab.say("hi")) == ["Send the receipt"]
        assert texts(await tab.say("it's on my desk")) == [
            "Please send a photo, a file or a link.", "Send the receipt"]
        assert texts(await tab.say(" https://files.example/r.pdf ")) == [
            "Got https://files.example/r.pdf"]


async def test_a_block_with_an_image_sends_it_to_the_page(tmp_path: Path) -> None:
    config = write_config(tmp_path, """
        [flows.main]
        start = "photo"
        [flows.main.blocks.photo]
        type = "message"
        text = "Your ticket"
        image = "https://cdn.example/t.png"
    """)
    config = replace(config, channels=replace(
        config.channels, web=replace(config.channels.web, enabled=True)))
    async with chat_app(config) as c:
        tab = c.tab()
        await tab.open()
        await tab.send({"type": "text", "id": "m1", "text": "hi"})
        [message] = await tab.messages()
        assert (message["text"], message["media"]) == (
            "Your ticket", {"kind": "image", "url": "https://cdn.example/t.png"})
        page = await c.client.get("/")
        assert "img-src 'self' data: https:;" in page.headers["Content-Security-Policy"]
