"""Connection limits, in small: 300 WebSocket attempts against caps, 50 slowloris clients
dropped at the header deadline (an injected clock, no sleeping for it), a body that stalls
gets 408 — and meanwhile /healthz, a callback and a webhook are answered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.body import BODY_TIMEOUT
from bot.clock import FakeClock
from bot.errors import ConfigError
from bot.server import CONNECTIONS, RUNTIME, build_app, enabled_channels
from tests.support import write_config
from tests.test_web_channel import SESSION, example_config


class Monotonic:
    """An injected monotonic clock for the slow-client sweep."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    config = example_config(tmp_path, max_websockets=100, max_websockets_per_address=60,
                            max_websockets_per_session=3, header_timeout=10.0)
    app = build_app(config, channel_factories=enabled_channels(config), clock=FakeClock(),
                    run_background=False)
    app[BODY_TIMEOUT] = 0.3  # seconds: a short deadline instead of 30
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert client.server.runner is not None and client.server.runner.server is not None
        guard = app[CONNECTIONS]
        guard.clock = Monotonic()
        guard.watch(client.server.runner.server)
        yield client


async def _reachable(client: TestClient[Any, Any]) -> None:
    """What must keep working during a flood: health, a callback and a webhook answer."""
    resp = await client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    resp = await client.post("/webview/callback", json={"executionId": "nope", "success": True})
    assert (resp.status, (await resp.json())["error"]) == (404, "unknown_execution")
    resp = await client.post("/webhook", json={"conversation_key": "nope"})
    assert (resp.status, (await resp.json())["error"]) == (404, "unknown_conversation")


async def _ws(client: TestClient[Any, Any], session: str) -> aiohttp.ClientWebSocketResponse | int:
    try:
        return await client.ws_connect(f"/ws?session={session}&after=0")
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


async def test_websocket_caps_per_session_address_and_total(
        server: TestClient[Any, Any]) -> None:
    guard = server.server.app[CONNECTIONS]
    opened: list[aiohttp.ClientWebSocketResponse] = []
    # per session: 3, then 429
    for _ in range(3):
        ws = await _ws(server, SESSION)
        assert not isinstance(ws, int)
        opened.append(ws)
    assert await _ws(server, SESSION) == 429
    resp = await server.get(f"/ws?session={SESSION}&after=0", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    doc = await resp.json()
    assert (resp.status, doc["error"]) == (429, "too_many_connections")
    assert "max_websockets_per_session" in doc["message"] and resp.headers["Retry-After"]
    # 300 attempts from one address (60 allowed), each with its own session
    results = await asyncio.gather(*(_ws(server, f"s{i:04d}" + "x" * 16) for i in range(300)))
    opened += [r for r in results if not isinstance(r, int)]
    refused = [r for r in results if isinstance(r, int)]
    assert len(opened) == 60 and set(refused) == {429}
    assert guard.sockets == 60 and guard.refused["address"] >= 240
    await _reachable(server)
    for ws in opened:
        await ws.close()
    for _ in range(100):  # the server notices the closes
        if guard.sockets == 0:
            break
        await asyncio.sleep(0.01)
    assert guard.sockets == 0 and not guard.by_address and not guard.by_session
    ws = await _ws(server, SESSION)  # room again
    assert not isinstance(ws, int)
    await ws.close()


async def test_total_cap_is_503(tmp_path: Path) -> None:
    config = example_config(tmp_path, max_websockets=5, max_websockets_per_address=5,
                            max_websockets_per_session=5)
    app = build_app(config, channel_factories=enabled_channels(config), clock=FakeClock(),
                    run_background=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        socks = [await _ws(client, f"t{i}" + "y" * 16) for i in range(5)]
        assert all(not isinstance(s, int) for s in socks)
        assert await _ws(client, "t9" + "y" * 16) == 503
        await _reachable(client)
        for s in socks:
            assert not isinstance(s, int)
            await s.close()


async def _slowloris(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: 1\r\n")  # never the blank line
    await writer.drain()
    return reader, writer


async def test_50_slowloris_clients_are_dropped_at_the_header_deadline(
        server: TestClient[Any, Any]) -> None:
    guard = server.server.app[CONNECTIONS]
    runner_server = server.server.runner.server  # type: ignore[union-attr]
    assert server.port is not None
    slow = [await _slowloris(server.port) for _ in range(50)]
    for _ in range(200):
        if len(runner_server.connections) >= 50:
            break
        await asyncio.sleep(0.01)
    guard.sweep()  # they are seen idle from now
    for _, writer in slow[:25]:  # another header line does not buy time
        writer.write(b"X-b: 2\r\n")
        await writer.drain()
    await _reachable(server)
    guard.clock.t += 9.9  # type: ignore[attr-defined]
    assert guard.sweep() == 0
    guard.clock.t += 0.2  # type: ignore[attr-defined]
    assert guard.sweep() >= 50
    for reader, writer in slow:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
    assert len(runner_server.connections) <= 1  # our own keep-alive client at most
    await _reachable(server)


async def test_a_stalled_body_is_408_and_the_connection_closed(
        server: TestClient[Any, Any]) -> None:
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /webview/callback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 100\r\n\r\n{\"executionId\": ")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"] == "body_timeout"
    # the page's fetch() can read it: the CORS headers of every other callback answer
    cors = server.server.app[RUNTIME].config.server.cors_allow_origin
    assert f"\r\nAccess-Control-Allow-Origin: {cors}\r\n".encode() in head
    writer.close()
    runtime = server.server.app[RUNTIME]
    assert runtime.metrics.get("callback", 0) == 0


def test_limits_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, "[flows.main]\nstart = \"a\"\n[flows.main.blocks.a]\n"
                     "type = \"end\"\ntext = \"x\"\n", server="""
            header_timeout = 0
            max_websockets = 10
            max_websockets_per_address = 20
        """)
    text = "\n".join(info.value.errors)
    assert "server.header_timeout: must be 1..600" in text
    assert "server.max_websockets_per_address: must not exceed server.max_websockets" in text


def test_defaults_are_sane() -> None:
    from bot.config import ServerConfig

    cfg = ServerConfig()
    assert (cfg.header_timeout, cfg.body_timeout) == (10.0, 30.0)
    assert cfg.max_websockets_per_session <= cfg.max_websockets_per_address <= cfg.max_websockets
    assert replace(cfg, max_websockets=1).max_websockets == 1


def test_client_address_behind_a_local_proxy_is_the_forwarded_one() -> None:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from bot.middleware import client_address

    def request(peer: str, xff: str | None) -> Any:
        headers = {"X-Forwarded-For": xff} if xff else {}
        transport = mock.Mock()
        transport.get_extra_info.return_value = (peer, 1234)
        return make_mocked_request("GET", "/ws", headers=headers, transport=transport)

    assert client_address(request("127.0.0.1", "203.0.113.9")) == "203.0.113.9"
    assert client_address(request("127.0.0.1", "6.6.6.6, 203.0.113.9")) == "203.0.113.9"
    assert client_address(request("::1", "2001:db8::1")) == "2001:db8::1"
    # a client that is not a local proxy cannot pick its own address
    assert client_address(request("198.51.100.7", "203.0.113.9")) == "198.51.100.7"
    assert client_address(request("127.0.0.1", None)) == "127.0.0.1"
