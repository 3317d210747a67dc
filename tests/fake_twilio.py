"""A local stand-in for Twilio's Messages API on 127.0.0.1 (records every form posted and
answers the way Twilio does), and a harness that drives our app the way Twilio does."""

from __future__ import annotations

import asyncio
import base64
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from bot.clock import FakeClock
from bot.config import Config
from bot.outbox import Outbox
from bot.runtime import Runtime
from bot.server import OUTBOX, RUNTIME, build_app
from channels.base import RateLimit
from channels.whatsapp import WhatsAppChannel
from tests import support
from tests.support import write_config

DATE = "Mon, 06 Jan 2025 10:00:00 +0000"


@dataclass
class Failure:
    """The answer to the next POST instead of a success."""

    status: int
    code: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


class FakeTwilio:
    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.posts: list[dict[str, str]] = []  # every Messages.json form, failed ones too
        self.sent: list[dict[str, str]] = []  # the ones answered 201
        self.failures: list[Failure | None] = []  # answers for the next posts (None: normal)
        # media users sent, by Media SID: (content type, bytes); served behind Basic auth
        self.media: dict[str, tuple[str, bytes]] = {}
        self.media_gets: list[tuple[str, bool]] = []  # (path, authorized) of each media GET
        self.media_redirect = False  # answer 307 to a presigned file-store URL, as Twilio does
        self.media_hang: asyncio.Event | None = None  # set: media GETs wait for it
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", self._create)
        app.router.add_get(
            "/2010-04-01/Accounts/{account}/Messages/{message}/Media/{media}", self._media)
        self.server = TestServer(app, host="127.0.0.1")
        # Twilio's file store, another origin: a media GET redirects there (presigned URL)
        files = web.Application()
        files.router.add_get("/files/{media}", self._file)
        self.files = TestServer(files, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> None:
        await self.server.start_server()
        await self.files.start_server()

    async def close(self) -> None:
        await self.server.close()
        await self.files.close()

    def fail_next(self, status: int, code: int, message: str, **headers: str) -> None:
        self.failures.append(Failure(status, code, message, headers))

    def succeed_next(self) -> None:
        """The next post is answered normally (to fail the one after it)."""
        self.failures.append(None)

    def bodies(self) -> list[str]:
        return [f.get("Body", "") for f in self.sent]

    @staticmethod
    def error(status: int, code: int, message: str, headers: dict[str, str] | None = None
              ) -> web.Response:
        doc = {"code": code, "message": message, "status": status,
               "more_info": f"https://www.twilio.com/docs/errors/{code}"}
        return web.json_response(doc, status=status, headers=headers)

    def media_url(self, media_sid: str, message_sid: str = "MM" + "4" * 32) -> str:
        """The MediaUrl Twilio posts for a stored medium (on api.twilio.com, as in real
        webhooks: the channel sends it to its configured API base URL)."""
        return (f"https://api.twilio.com/2010-04-01/Accounts/{self.account_sid}/Messages/"
                f"{message_sid}/Media/{media_sid}")

    def _authorized(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return (request.match_info["account"] == self.account_sid
                and request.headers.get("Authorization") == f"Basic {expected}")

    async def _media(self, request: web.Request) -> web.StreamResponse:
        """Media are served only with HTTP Basic auth (Account SID, Auth Token)."""
        authorized = self._authorized(request)
        self.media_gets.append((request.path, authorized))
        if not authorized:
            return self.error(401, 20003, "Authenticate")
        if self.media_hang is not None:
            await self.media_hang.wait()
        sid = request.match_info["media"]
        if sid not in self.media:
            return self.error(404, 20404, "The requested resource was not found")
        if self.media_redirect:
            raise web.HTTPTemporaryRedirect(str(self.files.make_url(f"/files/{sid}")))
        return self._medium(sid)

    async def _file(self, request: web.Request) -> web.Response:
        """The presigned file-store URL a media GET redirects to: no auth."""
        sid = request.match_info["media"]
        self.media_gets.append((request.path, "Authorization" in request.headers))
        return self._medium(sid) if sid in self.media else web.Response(status=404)

    def _medium(self, sid: str) -> web.Response:
        content_type, body = self.media[sid]
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self.error(401, 20003, "Authenticate")
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.posts.append(form)
        f = self.failures.pop(0) if self.failures else None
        if f is not None:
            return self.error(f.status, f.code, f.message, f.headers)
        self.sent.append(form)
        sid = f"SM{len(self.sent):032x}"
        doc: dict[str, Any] = {
            "account_sid": self.account_sid, "api_version": "2010-04-01",
            "body": form.get("Body", ""), "date_created": DATE, "date_sent": None,
            "date_updated": DATE, "direction": "outbound-api", "error_code": None,
            "error_message": None, "from": form.get("From"), "messaging_service_sid": None,
            "num_media": "0", "num_segments": "1", "price": None, "price_unit": None,
            "sid": sid, "status": "queued", "to": form.get("To"),
            "subresource_uris": {"media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/"
                                          f"{sid}/Media.json"},
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        return web.json_response(doc, status=201)


# -- a harness: our app with the WhatsApp channel, driven the way Twilio drives it ----------

ACCOUNT_SID = "ACf2a8c1d9e0b34a5c9d7e6f1a2b3c4d5e"
AUTH_TOKEN = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"  # a test value shaped like a real token
SANDBOX = "whatsapp:+14155238886"
USER = "whatsapp:+4915112345678"
PAYLOADS = Path(__file__).parent / "payloads" / "twilio"


def payload(name: str) -> str:
    """A real-shaped form body Twilio posts (tests/payloads/twilio/<name>.txt)."""
    return (PAYLOADS / f"{name}.txt").read_text().strip()


def sign(url: str, body: str, token: str = AUTH_TOKEN) -> str:
    """X-Twilio-Signature as Twilio computes it, by twilio's own RequestValidator."""
    params = MultiDict(parse_qsl(body, keep_blank_values=True))  # Twilio signs blank ones too
    return str(RequestValidator(token).compute_signature(url, params))


def whatsapp_config(tmp_path: Path, flows: str, *, api_base_url: str, server: str = "",
                    whatsapp: str = "", public_url: str = "http://bot.test") -> Config:
    channel = textwrap.dedent(f"""
        [channels.whatsapp]
        enabled = true
        account_sid = "{ACCOUNT_SID}"
        from = "{SANDBOX}"
        api_base_url = "{api_base_url}"
    """) + textwrap.dedent(whatsapp)
    return write_config(tmp_path, flows, channel, public_url=public_url, server=server)


@dataclass
class TwilioHarness:
    client: TestClient[Any, Any]
    runtime: Runtime
    outbox: Outbox
    clock: FakeClock
    channel: WhatsAppChannel
    twilio: FakeTwilio
    prefix: str = ""
    seen: int = 0

    async def post(self, route: str, body: str, *, url: str | None = None,
                   signature: str | None = None, query: str = "") -> tuple[int, Any]:
        """POST a form to one of our Twilio routes ("/twilio/whatsapp"), signed for `url`
        (default: the URL the channel is configured with), then deliver the outbox."""
        if url is None:
            url = self.channel.status_url if route == "/twilio/status" else self.channel.inbound_url
            url += f"?{query}" if query else ""
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        headers["X-Twilio-Signature"] = sign(url, body) if signature is None else signature
        if signature == "":
            del headers["X-Twilio-Signature"]
        path = f"{self.prefix}{route}" + (f"?{query}" if query else "")
        resp = await self.client.post(path, data=body.encode(), headers=headers)
        out = await resp.json() if resp.content_type == "application/json" else await resp.text()
        await self.outbox.drain()
        return resp.status, out

    async def post_json(self, path: str, doc: Any) -> tuple[int, Any]:
        resp = await self.client.post(f"{self.prefix}{path}", json=doc)
        out = await resp.json()
        await self.outbox.drain()
        return resp.status, out

    def new_sends(self) -> list[dict[str, str]]:
        """Messages.json forms accepted since the last call."""
        new = self.twilio.sent[self.seen:]
        self.seen = len(self.twilio.sent)
        return new

    def new_bodies(self) -> list[str]:
        return [f.get("Body", "") for f in self.new_sends()]

    async def sql(self, query: str) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self.runtime.worker.run(support.query, query)
        return rows

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.runtime.fire_due()
        await self.outbox.drain()


@asynccontextmanager
async def whatsapp_harness(tmp_path: Path, flows: str, *, server: str = "", whatsapp: str = "",
                           public_url: str = "http://bot.test", prefix: str = "",
                           real_rate_limit: bool = False) -> AsyncIterator[TwilioHarness]:
    """Our app with the WhatsApp channel against a FakeTwilio. Without `real_rate_limit`
    the channel sends without limits (tests deliver everything at once)."""
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    await twilio.start()
    config = whatsapp_config(tmp_path, flows, api_base_url=twilio.url, server=server,
                             whatsapp=whatsapp, public_url=public_url)

    def make(config: Config, runtime: Runtime) -> WhatsAppChannel:
        channel = WhatsAppChannel.create(config, runtime)
        if not real_rate_limit:  # the real limit waits on the event loop's clock
            channel.rate_limit = RateLimit()
        return channel

    clock = FakeClock()
    app = build_app(config, channel_factories={"whatsapp": make}, clock=clock,
                    run_background=False)
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            outbox = app[OUTBOX]
            channel = outbox.channels["whatsapp"]
            assert isinstance(channel, WhatsAppChannel)
            yield TwilioHarness(client, app[RUNTIME], outbox, clock, channel, twilio, prefix)
    finally:
        await twilio.close()
