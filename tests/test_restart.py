"""`flowbot serve` as its own process: waits survive kill -9, and what fell due while the
server was down fires at start-up."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from bot.config import load_config
from bot.server import RUNTIME, build_app
from channels.base import Inbound
from tests.reliability.common import Server
from tests.support import RecordingChannel, conversation_key

FLOWS = """
[flows.main]
start = "hook"
[flows.main.blocks.hook]
type = "webhook"
text = "waiting"
timeout = 300
on_success = "pay"
on_failure = "bye"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/p"
text = "Pay"
expiration = 600
response_variable = "payment"
on_success = "paid"
on_error = "bye"
on_expired = "expired"
[flows.main.blocks.paid]
type = "message"
text = "paid {{payment.ref}}"
[flows.main.blocks.expired]
type = "message"
text = "expired while down"
[flows.main.blocks.bye]
type = "end"
"""


def lines(server: Server) -> list[dict[str, Any]]:
    if not server.jsonl.exists():
        return []
    return [json.loads(x) for x in server.jsonl.read_text().splitlines()]


def wait_for(server: Server, user: str, text: str) -> dict[str, Any]:
    """The file channel's line carrying `text` to `user`, once the server wrote it (however
    slow the machine: see `Server.until`)."""
    def found() -> dict[str, Any] | None:
        return next((line for line in lines(server)
                     if line["user_id"] == user and line["text"] == text), None)

    return server.until(found, f"{user} got {text!r}")


@pytest.fixture
def server(tmp_path: Path, serve: Callable[..., Server]) -> Server:
    return serve(tmp_path, flows=FLOWS)


async def seed(config_path: Path, users: list[str]) -> dict[str, str]:
    """Start conversations in-process on the same DB; returns user → conversation_key."""
    config = load_config(config_path)
    app = build_app(config, channel_factories={"file": lambda c, r: RecordingChannel("file")},
                    run_background=False)
    from aiohttp.test_utils import TestClient, TestServer
    async with TestClient(TestServer(app)):
        runtime = app[RUNTIME]
        for user in users:
            await runtime.handle_inbound(Inbound("file", user, "hi"))
        return {u: await runtime.worker.run(conversation_key, "file", u) for u in users}


async def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(base + path, json=body) as resp:
        return resp.status, await resp.json()


async def test_waits_survive_kill_9_and_overdue_ones_fire_at_start_up(server: Server) -> None:
    keys = await seed(server.config, ["alice", "bob"])
    server.start()
    for user in ("alice", "bob"):
        assert await post(server.base, "/webhook", {"conversation_key": keys[user]}) == \
            (200, {"status": "ok"})
    links = {user: wait_for(server, user, "Pay")["link"] for user in ("alice", "bob")}
    eids = {u: parse_qs(urlsplit(link).query)["executionId"][0] for u, link in links.items()}

    server.kill9()
    # while the server is down, bob's wait falls due
    db = sqlite3.connect(server.db)
    with db:
        db.execute("UPDATE waits SET deadline = ? WHERE id = ?", (time.time() - 1, eids["bob"]))
    db.close()

    server.start()
    wait_for(server, "bob", "expired while down")
    status, body = await post(server.base, "/webview/callback",
                              {"executionId": eids["alice"], "success": True,
                               "data": {"ref": "R-9"}})
    assert (status, body) == (200, {"status": "ok", "outcome": "success"})
    wait_for(server, "alice", "paid R-9")
    status, body = await post(server.base, "/webview/callback",
                              {"executionId": eids["bob"], "success": True})
    assert status == 410 and body["error"] == "expired"
    # every message went out once
    texts = [(x["user_id"], x["text"]) for x in lines(server)]
    assert len(texts) == len(set(texts)), texts
