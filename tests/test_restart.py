"""`flowbot serve` as its own process: waits survive kill -9, and what fell due while the
server was down fires at start-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from bot.config import load_config
from bot.server import RUNTIME, build_app
from channels.base import Inbound
from tests.support import RecordingChannel

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, config: Path, port: int, outbox: Path) -> None:
        self.config, self.port, self.outbox = config, port, outbox
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("flowbot serve did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def lines(self) -> list[dict[str, Any]]:
        if not self.outbox.exists():
            return []
        return [json.loads(x) for x in self.outbox.read_text().splitlines()]

    def wait_for(self, user: str, text: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line["user_id"] == user and line["text"] == text:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{user} never got {text!r}; got {self.lines()}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    config = tmp_path / "flowbot.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        port = {port}
        public_url = "http://127.0.0.1:{port}"
        [storage]
        path = "flowbot.db"
        [channels.web]
        enabled = false
        [channels.file]
        enabled = true
        path = "outbox.jsonl"
    """) + FLOWS)
    srv = Server(config, port, tmp_path / "outbox.jsonl")
    yield srv
    srv.stop()


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
        return {u: (await runtime.worker.run(lambda s, u=u: s.conversation("file", u, "", 0))).key
                for u in users}


async def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(base + path, json=body) as resp:
        return resp.status, await resp.json()


async def test_waits_survive_kill_9_and_overdue_ones_fire_at_start_up(server: Server) -> None:
    keys = await seed(server.config, ["alice", "bob"])
    server.start()
    for user in ("alice", "bob"):
        assert await post(server.base, "/webhook", {"conversation_key": keys[user]}) == \
            (200, {"status": "ok"})
    links = {user: server.wait_for(user, "Pay")["link"] for user in ("alice", "bob")}
    eids = {u: parse_qs(urlsplit(link).query)["executionId"][0] for u, link in links.items()}

    server.kill9()
    # while the server is down, bob's wait falls due
    db = sqlite3.connect(server.config.parent / "flowbot.db")
    with db:
        db.execute("UPDATE waits SET deadline = ? WHERE id = ?", (time.time() - 1, eids["bob"]))
    db.close()

    server.start()
    server.wait_for("bob", "expired while down")
    status, body = await post(server.base, "/webview/callback",
                              {"executionId": eids["alice"], "success": True,
                               "data": {"ref": "R-9"}})
    assert (status, body) == (200, {"status": "ok", "outcome": "success"})
    server.wait_for("alice", "paid R-9")
    status, body = await post(server.base, "/webview/callback",
                              {"executionId": eids["bob"], "success": True})
    assert status == 410 and body["error"] == "expired"
    # every message went out once
    texts = [(x["user_id"], x["text"]) for x in server.lines()]
    assert len(texts) == len(set(texts)), texts
