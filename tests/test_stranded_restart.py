"""Renamed and removed waiting blocks across a real restart of `flowbot serve`: `check`
lists them (read-only), start-up moves and tells every user, late calls get 410."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import BotConfig, load_config
from bot.server import build_app
from channels.base import Inbound
from tests.reliability.common import Server, snapshot
from tests.support import RecordingChannel
from tests.test_restart import lines, post, wait_for
from tests.test_stranded import flows, slow_site

KINDS = ("pay", "hook", "ask", "pick", "nap", "call", "other")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path, flows="")
    yield srv
    srv.stop()


async def seed(config_path: Path) -> None:
    """Every user waits at a block of another kind (in-process, on the server's database)."""
    from aiohttp.test_utils import TestClient, TestServer

    app = build_app(load_config(config_path),
                    channel_factories={"file": lambda c, r: RecordingChannel("file")},
                    run_background=False)
    async with TestClient(TestServer(app)):
        from bot.server import RUNTIME

        runtime = app[RUNTIME]
        for user in KINDS:
            await runtime.handle_inbound(Inbound("file", user, "hi"))
            await runtime.handle_inbound(Inbound("file", user, user))


def check(config: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_renamed_waiting_blocks_across_a_real_restart(server: Server) -> None:
    base = server.config.read_text()
    async with slow_site() as slow:
        server.config.write_text(base + flows("", slow))
        assert "no database yet" in check(server.config)
        assert not server.db.exists()  # check creates no database file
        await seed(server.config)
        keys = dict(server.sql("SELECT user_id, key FROM conversations"))
        eid = server.sql("SELECT id FROM waits WHERE kind = 'webview'")[0][0]
        assert "every stored conversation stands at a block" in check(server.config)

        # the admin renames each waiting block (references fixed) and drops flow `other`
        server.config.write_text(base + flows("_v2", slow, other=False))
        before = snapshot(server.db)
        out = check(server.config)
        assert snapshot(server.db) == before  # read-only
        assert "7 conversation(s) stand at blocks this config no longer has" in out
        for place in ("main/pay (webview wait): 1", "main/hook (webhook wait): 1",
                      "main/ask: 1", "main/pick: 1", "main/nap (delay wait): 1",
                      "main/call (http wait): 1", "other/wait (webhook wait): 1"):
            assert f"  {place}\n" in out, out

        server.start()
        for user in KINDS:
            wait_for(server, user, BotConfig.stranded_message)
        # everything committed at start-up is delivered: then each user's lines are whole
        server.until(lambda: server.sql("SELECT count(*) FROM outbox WHERE state = 'pending'")
                     == [(0,)], "the outbox was delivered")
        told = {u: [x["text"] for x in lines(server) if x["user_id"] == u] for u in KINDS}
        # told, then the start of main (delivered one after the other)
        assert all(t[-2:] == [BotConfig.stranded_message, "Pick"] for t in told.values()), told
        assert sorted(server.sql("SELECT flow, block, wait_id FROM conversations")) == \
            [("main", "menu", None)] * len(KINDS)
        assert server.sql("SELECT DISTINCT state FROM waits") == [("removed",)]
        status, body = await post(server.base, "/webview/callback",
                                  {"executionId": eid, "success": True, "data": {"r": 1}})
        assert status == 410 and body["error"] == "gone" and body["message"]
        for user in ("hook", "other"):
            status, body = await post(server.base, f"/webhook?conversation_key={keys[user]}",
                                      {"paid": True})
            assert status == 410 and body["error"] == "gone" and body["message"]
        assert "every stored conversation stands at a block" in check(server.config)
        assert "stood at blocks this config no longer has" in server.log.read_text()
