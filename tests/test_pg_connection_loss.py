"""PostgreSQL sessions ended under a running server (a database restart, a failover,
`pg_terminate_backend`, a pooler dropping connections): the pool's dead connections cost
no request a 503, and nothing is half applied."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from tests.postgres import empty
from tests.support import Harness, harness, write_config

FLOWS = """
[flows.main]
start = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "Pay"
expiration = 600
on_success = "paid"
on_error = "paid"
on_expired = "late"
[flows.main.blocks.paid]
type = "end"
text = "paid"
[flows.main.blocks.late]
type = "end"
text = "expired"
"""


def end_sessions(url: str) -> int:
    """Terminate every other session on this test's own database; how many."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    return int(row[0]) if row else 0


async def waiting(h: Harness, users: list[str]) -> dict[str, str]:
    eids = {}
    for user in users:
        link = [m for m in await h.say("hi", user) if m.link][-1].link
        assert link is not None
        eids[user] = parse_qs(urlsplit(link.url).query)["executionId"][0]
    return eids


@pytest.mark.parametrize("worker", ["thread", "process"])
async def test_callbacks_after_every_session_was_ended_get_200(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch,
        worker: str) -> None:
    empty(pg_database)
    monkeypatch.setenv("FLOWBOT_TEST_STORAGE", pg_database)
    monkeypatch.setenv("FLOWBOT_TEST_WORKER", worker)
    async with harness(write_config(tmp_path, FLOWS)) as h:
        users = [f"u{i}" for i in range(12)]
        eids = await waiting(h, users)

        async def callback(user: str) -> int:
            resp = await h.client.post("/webview/callback",
                                       json={"executionId": eids[user], "success": True})
            return resp.status

        # several pooled connections in use at once, then all of them ended while idle
        assert await asyncio.gather(*(callback(u) for u in users[:6])) == [200] * 6
        assert end_sessions(pg_database) >= 2
        assert [await callback(u) for u in users[6:]] == [200] * 6
        assert (await h.client.get("/healthz")).status == 200
        await h.flush()
        for user in users:
            assert [m.text for m in h.channel.messages(user)] == ["Pay", "paid"]
