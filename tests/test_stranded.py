"""Config edits under waiting users: a conversation whose block (or flow) is gone from the
new config is moved to `bot.stranded_flow`, told so, and its open wait ends, so a late
callback or webhook gets 410 `gone` — for every kind of block that waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from bot.config import BotConfig
from bot.errors import ConfigError
from bot.ledger import Ledger
from bot.signatures import SignedBody
from storage.store import Store
from tests.support import Harness, harness, query, write_config

pytestmark = pytest.mark.usefixtures("both_workers", "both_backends")

TOLD = BotConfig.stranded_message

# {s}: the suffix the admin adds to every waiting block's name ("" before, "_v2" after)
FLOWS = """
[flows.main]
start = "menu"
[flows.main.blocks.menu]
type = "buttons"
text = "Pick"
choices = [{{ label = "pay", next = "pay{s}" }}, {{ label = "nb", next = "nb{s}" }},
           {{ label = "hook", next = "hook{s}" }}, {{ label = "ask", next = "ask{s}" }},
           {{ label = "pick", next = "pick{s}" }}, {{ label = "nap", next = "nap{s}" }},
           {{ label = "call", next = "call{s}" }}{other_choice}]
{other_block}
[flows.main.blocks.pay{s}]
type = "webview"
url = "https://pay.example/p"
text = "Pay"
expiration = 600
on_success = "done"
on_error = "done"
on_expired = "done"
[flows.main.blocks.nb{s}]
type = "webview"
url = "https://pay.example/nb"
text = "Open when you like"
blocking = false
expiration = 600
response_variable = "nbdata"
next = "later"
[flows.main.blocks.later]
type = "input"
text = "Anything else?"
variable = "later"
next = "done"
[flows.main.blocks.hook{s}]
type = "webhook"
text = "Waiting for the shop"
timeout = 300
on_success = "done"
on_failure = "done"
[flows.main.blocks.ask{s}]
type = "input"
text = "Your name?"
variable = "name"
next = "done"
[flows.main.blocks.pick{s}]
type = "buttons"
text = "Red or blue?"
choices = [{{ label = "red", next = "done" }}, {{ label = "blue", next = "done" }}]
[flows.main.blocks.nap{s}]
type = "delay"
seconds = 600
next = "done"
[flows.main.blocks.call{s}]
type = "http"
url = "{slow}"
timeout = 100
on_success = "done"
on_failure = "done"
[flows.main.blocks.done]
type = "message"
text = "done"
"""

OTHER = """
[flows.other]
start = "wait"
[flows.other.blocks.wait]
type = "webhook"
text = "Other waits"
timeout = 300
on_success = "fin"
on_failure = "fin"
[flows.other.blocks.fin]
type = "end"
"""


@asynccontextmanager
async def slow_site() -> AsyncIterator[str]:
    """A third-party site that never answers while the test runs (the http block waits)."""
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/slow", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/slow"
    finally:
        release.set()
        await runner.cleanup()


def flows(suffix: str, slow: str, other: bool = True) -> str:
    text = FLOWS.format(
        s=suffix, slow=slow,
        other_choice=', { label = "other", next = "go_other" }' if other else "",
        other_block='[flows.main.blocks.go_other]\ntype = "jump"\nflow = "other"\n'
        if other else "")
    return text + (OTHER if other else "")


def where(store: Store, user: str) -> tuple[Any, ...]:
    """A database job: (flow, block, wait id) of the user's conversation."""
    row = query(store, "SELECT flow, block, wait_id, key FROM conversations WHERE user_id = ?",
                (user,))
    return tuple(row[0])


def wait_states(store: Store) -> dict[str, str]:
    """A database job: wait block → state."""
    return dict(query(store, "SELECT block, state FROM waits"))


KINDS = ("pay", "nb", "hook", "ask", "pick", "nap", "call", "other")


async def seed(h: Harness) -> dict[str, str]:
    """One user per waiting kind, waiting there; returns user → executionId (WebViews)."""
    eids = {}
    for kind in KINDS:
        await h.say("hi", user=kind)
        got = await h.say(kind, user=kind)
        link = next((m.link for m in got if m.link is not None), None)
        if link is not None:
            eids[kind] = parse_qs(urlsplit(link.url).query)["executionId"][0]
    return eids


async def test_every_waiting_kind_is_moved_told_and_its_late_calls_get_410(
        tmp_path: Path) -> None:
    async with slow_site() as slow:
        config = write_config(tmp_path, flows("", slow))
        async with harness(config) as h:
            eids = await seed(h)
            keys = {k: (await h.runtime.worker.run(where, k))[3] for k in KINDS}
            assert (await h.runtime.worker.run(where, "nap"))[:2] == ("main", "nap")

        # the admin renames every waiting block, fixes the references, drops flow "other"
        config = write_config(tmp_path, flows("_v2", slow, other=False))
        async with harness(config) as h:
            await h.flush()
            for kind in KINDS:
                texts = [m.text for m in h.new_messages(kind)]
                if kind == "nb":  # it stands at `later`, which still exists: left alone
                    assert texts == []
                    assert (await h.runtime.worker.run(where, kind))[:2] == ("main", "later")
                    continue
                assert texts == [TOLD, "Pick"], kind  # told, then the start of main
                assert (await h.runtime.worker.run(where, kind))[:3] == ("main", "menu", None)
            states = await h.runtime.worker.run(wait_states)
            assert {b: states[b] for b in ("pay", "nb", "hook", "nap", "call", "wait")} == \
                dict.fromkeys(("pay", "nb", "hook", "nap", "call", "wait"), "removed")

            # late WebView callbacks: 410 gone with a sentence, the data applied nowhere
            for kind in ("pay", "nb"):
                status, body = await h.post("/webview/callback", json={
                    "executionId": eids[kind], "success": True, "data": {"x": 1}})
                assert status == 410 and body["error"] == "gone", body
                assert "removed" in body["message"]
            # late webhooks, by path and by body
            for kind in ("hook", "other"):
                status, body = await h.post(f"/webhook?conversation_key={keys[kind]}",
                                            json={"ok": True})
                assert status == 410 and body["error"] == "gone", body
            # the timer passing the old deadlines and the answer of the old request do nothing
            await h.advance(10_000)
            late = await h.runtime.worker.run(Ledger.http_answer, "x", "success", {}, 0.0)
            assert late is None
            for kind in KINDS:
                assert h.new_messages(kind) == [], kind
            # and everyone can go on: the question and the buttons are the new flow's
            assert await h.texts("ask", user="ask") == ["Your name?"]
            assert await h.texts("Ann", user="ask") == ["done"]
            assert await h.texts("pick", user="pick") == ["Red or blue?"]


async def test_a_wait_whose_block_changed_kind_is_stranded_too(tmp_path: Path) -> None:
    config = write_config(tmp_path, flows("", "http://127.0.0.1:9/x", other=False))
    async with harness(config) as h:
        await h.say("hi", user="u")
        got = await h.say("pay", user="u")
        eid = parse_qs(urlsplit(got[0].link.url).query)["executionId"][0]  # type: ignore[union-attr]
    # `pay` is now a webhook block: the WebView's wait cannot end there any more
    changed = flows("", "http://127.0.0.1:9/x", other=False).replace(
        '[flows.main.blocks.pay]\ntype = "webview"\nurl = "https://pay.example/p"\n'
        'text = "Pay"\nexpiration = 600\non_success = "done"\non_error = "done"\n'
        'on_expired = "done"',
        '[flows.main.blocks.pay]\ntype = "webhook"\ntimeout = 300\non_success = "done"\n'
        'on_failure = "done"')
    assert changed != flows("", "http://127.0.0.1:9/x", other=False)
    async with harness(write_config(tmp_path, changed)) as h:
        await h.flush()
        assert [m.text for m in h.new_messages("u")] == [TOLD, "Pick"]
        status, body = await h.post("/webview/callback", json={"executionId": eid,
                                                               "success": True})
        assert status == 410 and body["error"] == "gone"


async def test_stranded_flow_and_message_are_settings(tmp_path: Path) -> None:
    base = flows("", "http://127.0.0.1:9/x", other=False)
    async with harness(write_config(tmp_path, base)) as h:
        await h.say("hi", user="u")
        await h.say("hook", user="u")
    extra = """
    [bot]
    stranded_flow = "sorry"
    stranded_message = "We changed things, {{user_name}}."
    """
    sorry = """
    [flows.sorry]
    start = "s"
    [flows.sorry.blocks.s]
    type = "input"
    text = "Tell us what you were doing"
    variable = "what"
    next = "flow:main"
    """
    config = write_config(tmp_path, base.replace('"hook"', '"hook_v2"').replace(
        "blocks.hook]", "blocks.hook_v2]") + sorry, extra)
    async with harness(config) as h:
        await h.flush()
        assert [m.text for m in h.new_messages("u")] == [
            "We changed things, .", "Tell us what you were doing"]
        assert (await h.runtime.worker.run(where, "u"))[:2] == ("sorry", "s")


async def test_a_message_to_a_stranded_conversation_moves_it(tmp_path: Path) -> None:
    """Even if start-up did not move it (it got stranded while running: a timer that
    fired at a removed block under an older release left it pointing at a done wait)."""
    base = flows("", "http://127.0.0.1:9/x", other=False)
    async with harness(write_config(tmp_path, base)) as h:
        await h.say("hi", user="u")
        await h.say("nap", user="u")
        await h.runtime.worker.run(query, "UPDATE waits SET state = 'done'")
        assert await h.texts("hello", user="u") == [TOLD, "Pick"]
        assert (await h.runtime.worker.run(where, "u"))[:3] == ("main", "menu", None)


async def test_a_restart_word_from_a_stranded_conversation_restarts_it(tmp_path: Path) -> None:
    """A restart word is a plain restart, stranded or not: the start flow (not
    `bot.stranded_flow`), its payload kept, no "conversation was changed" message; a wait
    it held whose block is gone ends cancelled (a late callback hears "restarted")."""
    base = flows("", "http://127.0.0.1:9/x", other=False)
    sorry = """
    [flows.sorry]
    start = "s"
    [flows.sorry.blocks.s]
    type = "message"
    text = "sorry"
    """
    config = write_config(tmp_path, base + sorry, '[bot]\nstranded_flow = "sorry"\n')
    async with harness(config) as h:
        # stranded at a wait that already ended (as in the test above)
        await h.say("hi", user="done")
        await h.say("nap", user="done")
        await h.runtime.worker.run(query, "UPDATE waits SET state = 'done'")
        assert await h.texts("/start", user="done") == ["Pick"]
        assert (await h.runtime.worker.run(where, "done"))[:3] == ("main", "menu", None)
        # stranded at a pending WebView wait whose block is gone (a node with an older
        # config wrote it), restarted with a deep-link payload
        await h.say("hi", user="pay")
        got = await h.say("pay", user="pay")
        eid = parse_qs(urlsplit(got[0].link.url).query)["executionId"][0]  # type: ignore[union-attr]
        await h.runtime.worker.run(query, "UPDATE waits SET block = 'pay_old' WHERE id = ?",
                                   (eid,))
        await h.runtime.worker.run(query, "UPDATE conversations SET block = 'pay_old' "
                                   "WHERE user_id = 'pay'")
        assert await h.texts("/START ref-7", user="pay") == ["Pick"]
        assert (await h.runtime.worker.run(where, "pay"))[:3] == ("main", "menu", None)
        assert await h.runtime.worker.run(
            query, "SELECT state FROM waits WHERE id = ?", (eid,)) == [("cancelled",)]
        status, body = await h.post("/webview/callback", json={"executionId": eid,
                                                               "success": True})
        assert status == 410 and body["error"] == "cancelled", body
        resolved = h.runtime.stats.waits_resolved.labels("webview", "cancelled")
        assert resolved._value.get() == 1
        # a webhook meeting a stranded wait moves its conversation on, and says what it
        # wrote and ended (the outbox and the timer are woken for it, the metrics count it)
        assert await h.texts("hook", user="pay") == ["Waiting for the shop"]
        key = (await h.runtime.worker.run(where, "pay"))[3]
        await h.runtime.worker.run(query, "UPDATE waits SET block = 'hook_old' WHERE id = "
                                   "(SELECT wait_id FROM conversations WHERE user_id = 'pay')")
        moved = await h.runtime.worker.run(Ledger.webhook, key, {}, SignedBody(b"{}", {}),
                                           h.clock.now())
        assert (moved.state, moved.won, moved.messages, moved.removed) == (
            "removed", False, 2, "webhook")
        await h.flush()
        assert [m.text for m in h.new_messages("pay")] == [TOLD, "sorry"]
        # any other text still moves a stranded conversation, and tells it
        await h.runtime.worker.run(query, "UPDATE conversations SET block = 'gone' "
                                   "WHERE user_id = 'pay'")
        assert await h.texts("hello", user="pay") == [TOLD, "sorry"]


def test_stranded_flow_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        write_config(tmp_path, flows("", "http://127.0.0.1:9/x", other=False),
                     '[bot]\nstranded_flow = "mian"\n')
    assert any("bot.stranded_flow" in e and "main" in e for e in err.value.errors)
