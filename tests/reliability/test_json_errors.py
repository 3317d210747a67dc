"""Every error is `{"error", "message"}` JSON: the router's 404/405, static-file names that
used to raise OSError, bugs (500), and database trouble — read-only, locked past its
timeout, full — which answers 503 with Retry-After while /healthz says why; repeated
errors are logged once per interval with a count, not a traceback each."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
)
from tests.fake_telegram import payload as tg_payload
from tests.fake_twilio import payload as tw_payload
from tests.fake_twilio import sign, whatsapp_harness
from tests.reliability.common import snapshot
from tests.support import Harness, harness, write_config
from tests.test_telegram import SECRET, env, telegram, tg_config  # noqa: F401 - env: autouse
from tests.test_web_channel import Chat, chat_app, example_config

FLOWS = """
[flows.main]
start = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Pay here"
expiration = 60
response_variable = "payment"
on_success = "paid"
on_error = "paid"
on_expired = "paid"
[flows.main.blocks.paid]
type = "message"
text = "paid"
"""


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(write_config(tmp_path, FLOWS)) as h:
        yield h


async def _eid(h: Harness, user: str = "u1") -> str:
    link = (await h.say("hi", user))[0].link
    assert link is not None
    return parse_qs(urlsplit(link.url).query)["executionId"][0]


async def _json(resp: Any) -> tuple[int, dict[str, Any]]:
    assert resp.content_type == "application/json", (resp.status, await resp.text())
    doc = await resp.json()
    assert set(doc) >= {"error", "message"} and doc["message"], doc
    return resp.status, doc


# -- router and static files ---------------------------------------------------------------

@pytest.fixture
async def chat(tmp_path: Path) -> AsyncIterator[Chat]:
    async with chat_app(example_config(tmp_path)) as c:
        yield c


@pytest.mark.parametrize("path", [
    "/static/a%00.js", "/static/" + "a" * 300 + ".js", "/static/" + "b" * 300,
    "/static/%ED%A0%80.js", "/static/..%2Fweb.py", "/static/.hidden.js", "/static/chat.jsx",
    "/static/%2e%2e%2f%2e%2e%2fpyproject.toml", "/static/chat.js%00",
])
async def test_static_names_that_are_not_shipped_files_are_404_json(chat: Chat,
                                                                    path: str) -> None:
    resp = await chat.client.get(path)
    status, doc = await _json(resp)
    assert (status, doc["error"]) in ((404, "no_such_file"), (404, "not_found"))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.text(min_size=1, max_size=400))
async def test_any_static_name_is_a_file_or_404_json(chat: Chat, name: str) -> None:
    from urllib.parse import quote

    resp = await chat.client.get("/static/" + quote(name.encode("utf-8", "surrogatepass"),
                                                    safe=""))
    if resp.status == 200:
        assert name in ("chat.js", "chat.css", "webview.js", "webview.css")
        return
    status, _ = await _json(resp)
    assert status in (400, 404)


async def test_router_404_and_405_are_json(h: Harness) -> None:
    status, doc = await _json(await h.client.get("/no/such/path"))
    assert (status, doc["error"]) == (404, "not_found")
    resp = await h.client.put("/webhook", data=b"{}")
    status, doc = await _json(resp)
    assert (status, doc["error"]) == (405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


# -- bugs ----------------------------------------------------------------------------------

async def test_a_bug_is_500_json_and_logged_once_a_minute_with_a_count(
        h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: Any, **kw: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(h.runtime, "webview_callback", broken)
    with caplog.at_level(logging.ERROR):
        for _ in range(20):
            resp = await h.client.post("/webview/callback",
                                       json={"executionId": "x", "success": True})
            status, doc = await _json(resp)
            assert (status, doc["error"]) == (500, "internal_error")
    records = [r for r in caplog.records if "ZeroDivisionError" in (r.exc_text or "")
               or "/webview/callback failed" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is not None  # the first one has its traceback


# -- database trouble ----------------------------------------------------------------------

def _pragma(store: Any, statement: str) -> None:
    store.conn.execute(statement)


def _page_count(store: Any) -> int:
    return int(store.conn.execute("PRAGMA page_count").fetchone()[0])


@pytest.fixture
def other_connection(h: Harness) -> Iterator[sqlite3.Connection]:
    con = sqlite3.connect(h.runtime.config.storage.path, isolation_level=None)
    yield con
    con.close()


async def _expect_503(h: Harness, eid: str, reason: str) -> None:
    db = Path(h.runtime.config.storage.path)
    before = snapshot(db)
    for _ in range(3):
        resp = await h.client.post("/webview/callback", json={"executionId": eid,
                                                              "success": True})
        status, doc = await _json(resp)
        assert (status, doc["error"]) == (503, "storage_unavailable"), doc
        assert reason in doc["message"]
        assert int(resp.headers["Retry-After"]) > 0
    assert snapshot(db) == before
    resp = await h.client.get("/healthz")
    assert resp.status == 503
    assert reason in (await resp.json())["message"]
    assert resp.headers["Retry-After"]
    resp = await h.client.get("/metrics")  # DESIGN: 503 while storage is unavailable
    assert resp.status == 503
    assert (await resp.json())["error"] == "storage_unavailable"


async def _expect_recovered(h: Harness, eid: str) -> None:
    resp = await h.client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    assert (await h.client.get("/metrics")).status == 200
    status, body = await h.post("/webview/callback", json={"executionId": eid,
                                                            "success": True})
    assert (status, body["outcome"]) == (200, "success")
    assert [m.text for m in h.new_messages("u1")] == ["paid"]


async def test_read_only_database_is_503_then_recovers(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    eid = await _eid(h)
    await h.runtime.worker.run(_pragma, "PRAGMA query_only = 1")
    with caplog.at_level(logging.WARNING):
        await _expect_503(h, eid, "read-only")
    assert sum("read-only" in r.getMessage() for r in caplog.records) <= 2
    # no job runs while writes are refused: undo it on the worker's idle connection
    store = getattr(h.runtime.worker, "store", None)
    assert store is not None, "runs with the thread worker"
    store.conn.execute("PRAGMA query_only = 0")
    await _expect_recovered(h, eid)


async def test_database_locked_past_its_timeout_is_503_then_recovers(
        h: Harness, other_connection: sqlite3.Connection) -> None:
    eid = await _eid(h)
    await h.runtime.worker.run(_pragma, "PRAGMA busy_timeout = 20")  # not 5 s in a test
    other_connection.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    await _expect_503(h, eid, "locked")
    other_connection.execute("ROLLBACK")
    await _expect_recovered(h, eid)


async def test_full_database_is_503_then_recovers(h: Harness) -> None:
    eid = await _eid(h)
    pages = await h.runtime.worker.run(_page_count)
    await h.runtime.worker.run(_pragma, f"PRAGMA max_page_count = {pages}")  # "disk full"
    big = {"executionId": eid, "success": True, "data": {"blob": "x" * 60_000}}
    resp = await h.client.post("/webview/callback", json=big)
    status, doc = await _json(resp)
    assert (status, doc["error"]) == (503, "storage_unavailable"), doc
    assert "full" in doc["message"]
    assert (await h.client.get("/healthz")).status == 503
    await h.runtime.worker.run(_pragma, f"PRAGMA max_page_count = {pages * 1000}")
    await _expect_recovered(h, eid)


# -- the platforms: a storage outage is 503, so they send the update again -----------------

TG_FLOWS = """
[flows.main]
start = "hello"
[flows.main.blocks.hello]
type = "end"
text = "Hello {{last_message}}"
"""


async def test_telegram_update_during_an_outage_is_503_and_its_redelivery_is_handled_once(
        tmp_path: Path, fake: FakeTelegram) -> None:
    async with telegram(tg_config(tmp_path, fake, flows=TG_FLOWS), fake) as tg:
        store = getattr(tg.runtime.worker, "store", None)
        assert store is not None, "runs with the thread worker"
        update = tg_payload("text_message")
        update["update_id"] = 77
        update["message"]["text"] = "during the outage"
        store.conn.execute("PRAGMA query_only = 1")
        resp = await tg.client.post("/telegram", json=update,
                                    headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
        status, doc = await _json(resp)
        assert (status, doc["error"]) == (503, "storage_unavailable")
        assert resp.headers["Retry-After"]
        assert fake.sent() == []
        store.conn.execute("PRAGMA query_only = 0")
        for _ in range(2):  # Telegram retries; a duplicate delivery changes nothing
            assert (await tg.post_update(update))[0] == 200
        assert [c["text"] for c in fake.sent()] == ["Hello during the outage"]


@pytest.mark.usefixtures("twilio_auth_token")
async def test_twilio_message_during_an_outage_is_503_then_handled_once(tmp_path: Path) -> None:
    flows = 'start = "hello"\n'.join(["[flows.main]\n", """
[flows.main.blocks.hello]
type = "end"
text = "Hello {{last_message}}"
"""])
    async with whatsapp_harness(tmp_path, flows) as h:
        store = getattr(h.runtime.worker, "store", None)
        assert store is not None, "runs with the thread worker"
        store.conn.execute("PRAGMA query_only = 1")
        body = tw_payload("inbound_text")
        resp = await h.client.post("/twilio/whatsapp", data=body.encode(), headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": sign(h.channel.inbound_url, body)})
        status, doc = await _json(resp)
        assert (status, doc["error"]) == (503, "storage_unavailable")
        store.conn.execute("PRAGMA query_only = 0")
        for _ in range(2):  # a retry (rp=5xx or the fallback URL) is handled once
            assert (await h.post("/twilio/whatsapp", tw_payload("inbound_text")))[0] == 200
        assert h.new_bodies() == ["Hello Hi there"]
