"""The built-in web chat: a page at `/`, a WebSocket per browser tab, and the demo WebView page."""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web

from bot import jobs
from bot.body import parse_json_text
from bot.errorlog import ErrorLog
from bot.errorlog import kind as kind_of
from bot.errors import ApiError, BadRequest, NotFound, StorageUnavailable
from channels.base import Delivery, Inbound, Message, RateLimit, Route

if TYPE_CHECKING:
    from bot.config import Config
    from bot.runtime import Runtime

log = logging.getLogger(__name__)
_errors = ErrorLog(log)

SESSION = re.compile(r"[A-Za-z0-9_-]{16,64}")  # made by the page: 32 hex digits
CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MESSAGE_ID = re.compile(r"[0-9]{1,18}")
EXECUTION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
MAX_ASKED = 200  # WebView links one "waits" frame may ask about (a reload shows at most 200)
MAX_TEXT = 4096  # characters of one typed message
MAX_FRAME = 16 * 1024  # bytes of one frame from the browser
MAX_QUEUED = 1000  # frames waiting for a slow socket before we drop it (it replays on reconnect)
HISTORY_PAGE = 200
RELOAD_MESSAGES = 200  # what a reloaded page gets back of its conversation: the newest
CLOSE_BAD_REQUEST = 4400  # private-use close code: the page must not reconnect as it is

# Pages load their scripts and styles from files (no inline code), so a strict CSP holds.
# Images a flow sends (`image = "https://…"`) load from their own sites.
_CSP_CHAT = ("default-src 'none'; script-src 'self'; style-src 'self'; "
             "img-src 'self' data: https:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The demo page may post to a callback on another origin (the different-origin test).
_CSP_DEMO = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
             "connect-src *; base-uri 'none'; form-action 'none'")
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@functools.cache
def _shipped() -> frozenset[str]:
    """The names of the files in channels/static."""
    return frozenset(p.name for p in resources.files("channels").joinpath("static").iterdir()
                     if p.is_file())


def _static(name: str) -> bytes:
    return resources.files("channels").joinpath("static", name).read_bytes()


def _page(body: str, csp: str) -> web.Response:
    # The demo page's URL holds an executionId: never leak it through Referer.
    return web.Response(text=body, content_type="text/html", headers={
        "Content-Security-Policy": csp, "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


async def demo_webview_page(request: web.Request) -> web.Response:
    """The demo WebView page (also mounted alone on a second server by the browser tests)."""
    return _page(_static("webview.html").decode(), _CSP_DEMO)


async def static_file(request: web.Request) -> web.Response:
    """`GET /static/{name}`: one of the shipped scripts or stylesheets, nothing else."""
    name = request.match_info["name"]
    suffix = name[name.rfind("."):] if "." in name else ""
    # only names from the shipped list reach the file system: a NUL, a 300-character name
    # or a path is "no such file" (404), not an OSError
    if name not in _shipped() or suffix not in _CONTENT_TYPES:
        shown = name if len(name) <= 64 else name[:64] + "…"
        raise NotFound("no_such_file", f"There is no static file named {shown!r}.")
    body = _static(name)
    return web.Response(body=body, content_type=_CONTENT_TYPES[suffix],
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


def message_frame(delivery: Delivery) -> dict[str, Any]:
    """What the page receives for one outgoing message."""
    m: Message = delivery.message
    return {
        "type": "message",
        "id": delivery.id,
        "text": m.text,
        "buttons": [{"label": b.label, "payload": b.payload} for b in m.buttons],
        "link": {"url": m.link.url, "label": m.link.label} if m.link else None,
        "media": {"kind": m.media.kind, "url": m.media.url} if m.media else None,
    }


@dataclass(eq=False)
class _Socket:
    """One open WebSocket. Everything it is sent goes through `queue`, written by one task,
    so `send()` never waits for a slow browser and frames never interleave."""

    ws: web.WebSocketResponse
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None
    dropped: bool = False

    def push(self, frame: dict[str, Any]) -> None:
        if self.queue.qsize() >= MAX_QUEUED:
            self.dropped = True
            if self.writer is not None:
                self.writer.cancel()  # the handler then closes it; the page reconnects
            return
        self.queue.put_nowait(frame)


async def _replay(sock: _Socket, deliveries: list[Delivery], last: int) -> int:
    """Send committed messages to one socket; returns the id of the newest sent."""
    for delivery in deliveries:
        await sock.ws.send_json(message_frame(delivery))
        last = delivery.id
    return last


class WebChannel:
    name = "web"
    rate_limit = RateLimit()  # a socket on this very server: no platform limits

    def __init__(self, runtime: Runtime, title: str, path_prefix: str = "") -> None:
        self.runtime = runtime
        self.title = title
        self.path_prefix = path_prefix
        self.reload_messages = RELOAD_MESSAGES
        self._sockets: dict[str, set[_Socket]] = {}  # session id → its open sockets

    @classmethod
    def create(cls, config: Config, runtime: Runtime) -> WebChannel:
        channel = cls(runtime, config.channels.web.title, config.server.path_prefix)
        runtime.on_webview_ended[cls.name] = channel.webview_ended
        return channel

    def webview_ended(self, session: str, execution_id: str, outcome: str) -> None:
        """A WebView wait of this session ended: its open pages turn the link inactive.
        (A page that was not connected asks on its next connection: a "waits" frame.)"""
        frame = {"type": "wait_ended", "executionId": execution_id, "outcome": outcome}
        for sock in self._sockets.get(session, ()):
            sock.push(frame)

    def routes(self) -> Sequence[Route]:
        routes = [
            Route("GET", "/", self._chat_page),
            Route("GET", "/ws", self._socket),
            Route("GET", "/demo/webview", demo_webview_page),
            Route("GET", "/static/{name}", static_file),
        ]
        if self.path_prefix:  # "/bot" → "/bot/": the page's relative URLs need the slash
            routes.append(Route("GET", "", self._to_chat_page))
        return routes

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.close_connections()

    async def close_connections(self) -> None:
        """Close every socket (server shutdown): aiohttp waits for open handlers otherwise."""
        sockets = [s for group in self._sockets.values() for s in group]
        await asyncio.gather(*(s.ws.close(code=WSCloseCode.GOING_AWAY,
                                          message=b"server shutting down") for s in sockets),
                             return_exceptions=True)

    async def send(self, delivery: Delivery) -> str | None:
        # No await before returning: a socket that registers after this call finds the
        # message in history (the outbox marks it sent before our history query runs).
        frame = message_frame(delivery)
        for sock in self._sockets.get(delivery.user_id, ()):
            sock.push(frame)
        return None  # delivered to whoever is connected; others get it on reconnect

    # -- HTTP ------------------------------------------------------------------------------

    async def _to_chat_page(self, request: web.Request) -> web.Response:
        last_segment = self.path_prefix.rsplit("/", 1)[1]
        raise web.HTTPFound(f"{last_segment}/")  # relative: survives a rewriting proxy

    async def _chat_page(self, request: web.Request) -> web.Response:
        page = _static("chat.html").decode().replace("{{title}}", html.escape(self.title))
        return _page(page, _CSP_CHAT)

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_FRAME)
        if not ws.can_prepare(request).ok:
            raise BadRequest("not_websocket", "GET /ws is the chat page's WebSocket; open the "
                             "chat page at / instead.")
        await ws.prepare(request)
        session = request.query.get("session", "")
        after_raw = request.query.get("after", "0")
        if not SESSION.fullmatch(session):
            await ws.close(code=CLOSE_BAD_REQUEST,
                           message=b"bad session id: use 16-64 characters of A-Z a-z 0-9 _ -")
            return ws
        if not MESSAGE_ID.fullmatch(after_raw):
            await ws.close(code=CLOSE_BAD_REQUEST,
                           message=b"bad 'after': use the id of the last message seen, or 0")
            return ws

        sock = _Socket(ws)
        group = self._sockets.setdefault(session, set())
        group.add(sock)  # before the history query: see send()
        sock.writer = asyncio.create_task(self._write(sock, session, int(after_raw)))
        reader = asyncio.create_task(self._read(sock, session))
        try:
            await asyncio.wait({sock.writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            group.discard(sock)
            if not group:
                self._sockets.pop(session, None)
            sock.writer.cancel()
            reader.cancel()
            results = await asyncio.gather(sock.writer, reader, return_exceptions=True)
        code, why = WSCloseCode.OK, b""
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, ConnectionError):
                log.error("web chat socket failed", exc_info=result)
                code, why = WSCloseCode.INTERNAL_ERROR, b"server error; reconnecting helps"
        if sock.dropped:
            code, why = WSCloseCode.TRY_AGAIN_LATER, b"too many unsent messages; reconnect"
        await ws.close(code=code, message=why)
        return ws

    async def _write(self, sock: _Socket, session: str, after: int) -> None:
        """Replay what the page missed, then forward live frames (skipping replayed ones).
        A page with nothing (after=0: a reload) gets the newest `reload_messages`, after
        an "earlier" frame if there were more (its `last`: the newest one left out)."""
        last = after
        if after == 0:
            newest: list[Delivery] = await self.runtime.worker.run(
                jobs.web_history, session, 0, self.reload_messages + 1, True)
            if len(newest) > self.reload_messages:
                await sock.ws.send_json({"type": "earlier", "last": newest.pop(0).id})
            last = await _replay(sock, newest, last)
        while True:
            page: list[Delivery] = await self.runtime.worker.run(
                jobs.web_history, session, last, HISTORY_PAGE)
            last = await _replay(sock, page, last)
            if len(page) < HISTORY_PAGE:
                break
        await sock.ws.send_json({"type": "ready", "last": last})
        while True:
            frame = await sock.queue.get()
            if frame["type"] == "message":
                if frame["id"] <= last:
                    continue  # already replayed
                last = frame["id"]
            await sock.ws.send_json(frame)

    async def _read(self, sock: _Socket, session: str) -> None:
        async for msg in sock.ws:
            if msg.type != WSMsgType.TEXT:
                continue  # close and error frames end the loop by themselves
            try:
                await self._receive(sock, session, msg.data)
            except _Refused as exc:
                # the page drops a refused frame for good; "retry": it keeps it and sends it
                # again later (the server could not store it just now)
                frame: dict[str, Any] = {"type": "error", "message": exc.message}
                if exc.cid is not None:
                    frame["id"] = exc.cid
                if exc.retry:
                    frame["retry"] = True
                sock.push(frame)

    async def _receive(self, sock: _Socket, session: str, data: str) -> None:
        """Handle one frame from the page; raises `_Refused` (an error frame, the socket
        stays open) for one we cannot take."""
        try:
            doc = parse_json_text(data)
        except BadRequest as exc:
            why = ("That frame is not JSON." if exc.code == "bad_json"
                   else f"That frame was refused: {exc.message}")
            raise _Refused(why, _frame_id(data)) from None
        if not isinstance(doc, dict):
            raise _Refused("A frame must be a JSON object.")
        kind, cid = doc.get("type"), doc.get("id")
        if not isinstance(cid, str) or not CLIENT_ID.fullmatch(cid):
            raise _Refused("'id' must be 1-64 characters of A-Z a-z 0-9 _ -.")
        if kind == "waits":
            await self._ended_waits(sock, session, doc.get("executionIds"), cid)
            return
        error = self._check(doc, kind)
        if error:
            raise _Refused(error, cid)
        text = str(doc.get("text") if kind == "text" else doc.get("label", ""))
        payload = doc.get("payload") if kind == "button" else None
        try:
            fresh = await self.runtime.handle_inbound(Inbound(
                self.name, session, text=text, payload=payload,
                event_id=f"web:{session}:{cid}"))
        except StorageUnavailable as exc:
            _errors.error(kind_of(exc), f"web chat: {exc.message}")
            raise _Refused("The server cannot store messages right now; this one will be "
                           "sent again in a moment.", cid, retry=True) from None
        except ApiError as exc:
            raise _Refused(exc.message, cid) from None
        except Exception as exc:
            _errors.error(kind_of(exc), "web chat: a message could not be handled", exc)
            raise _Refused("The server failed to handle this message (a bug, logged); "
                           "it was not stored.", cid) from None
        sock.push({"type": "ack", "id": cid, "duplicate": not fresh})

    async def _ended_waits(self, sock: _Socket, session: str, asked: object, cid: str) -> None:
        """A (re)connected page names the WebView links it still shows open, once it has
        its replay ("ready"): each whose wait ended meanwhile — while the page was offline,
        or before a reload — gets its `wait_ended` frame, as a live end would. One that the
        database no longer has (pruned) or that is not this session's is "gone". Waits that
        end after this socket registered are pushed live, so none is missed in between."""
        if (not isinstance(asked, list) or len(asked) > MAX_ASKED
                or not all(isinstance(e, str) and EXECUTION_ID.fullmatch(e) for e in asked)):
            raise _Refused(f"'executionIds' must be a list of at most {MAX_ASKED} "
                           "executionIds from the page's WebView links.", cid)
        ids = list(dict.fromkeys(asked))
        try:
            states: dict[str, str] = await self.runtime.worker.run(
                jobs.webview_states, self.name, session, ids)
        except StorageUnavailable as exc:  # the links stay live until the next connection
            _errors.error(kind_of(exc), f"web chat: {exc.message}")
            return
        for execution_id in ids:
            state = states.get(execution_id, "gone")
            if state != "pending":
                sock.push({"type": "wait_ended", "executionId": execution_id,
                           "outcome": state})

    @staticmethod
    def _check(doc: dict[str, Any], kind: object) -> str | None:
        """The error sentence for a frame's fields, or None."""
        if kind == "text":
            text = doc.get("text")
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
                return f"'text' must be a non-empty string of at most {MAX_TEXT} characters."
        elif kind == "button":
            payload, label = doc.get("payload"), doc.get("label", "")
            if not isinstance(payload, str) or not 0 < len(payload) <= 64:
                return "'payload' must be the button's payload, as the message gave it."
            if not isinstance(label, str) or len(label) > 256:
                return "'label' must be a string of at most 256 characters."
        else:
            return "'type' must be 'text', 'button' or 'waits'."
        return None


class _Refused(Exception):
    """A frame the server will not take: answered with an error frame naming its id."""

    def __init__(self, message: str, cid: str | None = None, *, retry: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.cid = cid
        self.retry = retry


def _frame_id(data: str) -> str | None:
    """The id of a frame the strict parser refused, if a lenient one can find it, so the
    page learns which of its messages was refused."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    cid = doc.get("id") if isinstance(doc, dict) else None
    return cid if isinstance(cid, str) and CLIENT_ID.fullmatch(cid) else None
