"""Start-up does not read every conversation to find stranded ones (bot/stranded.py): only
a config whose block set differs from the one the database was last checked against makes
it scan, in small jobs after the server is up; an event reaching a stranded conversation
first moves it itself, and a row the scan found but an event moved meanwhile is not moved
twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.config import BotConfig
from bot.flow import live_blocks
from bot.ledger import Ledger, StrandedPass
from bot.stranded import CHECKED_BLOCKS, Stranded, fingerprint
from storage.store import Store
from tests.support import harness, query, write_config

pytestmark = pytest.mark.usefixtures("both_workers", "both_backends")

TOLD = BotConfig.stranded_message

FLOWS = """
[flows.main]
start = "menu"
[flows.main.blocks.menu]
type = "buttons"
text = "{menu_text}"
choices = [{{ label = "ask", next = "ask" }}]
[flows.main.blocks.ask]
type = "input"
text = "Your name?"
variable = "name"
next = "done"
[flows.main.blocks.done]
type = "message"
text = "done"
{extra}
"""
EXTRA_BLOCK = """
[flows.main.blocks.extra]
type = "message"
text = "new"
"""


def flows(menu_text: str = "Pick", extra: str = "") -> str:
    return FLOWS.format(menu_text=menu_text, extra=extra)


def strand(store: Store, user: str) -> list[tuple[Any, ...]]:
    """A database job: put the user's conversation at a block no config has (as a node
    with another config would have left it)."""
    return query(store, "UPDATE conversations SET block = 'gone' WHERE user_id = ?", (user,))


def block_of(store: Store, user: str) -> str | None:
    """A database job: the block the user's conversation stands at."""
    rows = query(store, "SELECT block FROM conversations WHERE user_id = ?", (user,))
    return str(rows[0][0]) if rows and rows[0][0] is not None else None


def checked(store: Store) -> str | None:
    """A database job: the fingerprint of the blocks last checked against."""
    return store.setting(CHECKED_BLOCKS)


def stale_scan(ledger: Ledger, stale: list[Stranded], now: float) -> StrandedPass:
    """A database job: `Ledger.move_stranded` whose scan read `stale` (rows an event has
    moved since the scan read them, as on PostgreSQL between the read and the lock)."""
    ledger.stranded_part = (  # type: ignore[method-assign]
        lambda live, cursor, span, limit: (stale, None))
    try:
        return Ledger.move_stranded(ledger, now)
    finally:
        del ledger.stranded_part


def scan_job(ledger: Ledger, cursor: tuple[int, str], now: float) -> StrandedPass:
    """A database job: one job of the background scan, one conversation id wide."""
    return Ledger.move_stranded(ledger, now, cursor, True, span=1)


async def test_start_up_scans_only_when_the_block_set_changed(tmp_path: Path) -> None:
    config = write_config(tmp_path, flows())
    async with harness(config) as h:
        # the first start of a database never checked scans it, and keeps what it checked
        assert await h.runtime.worker.run(checked) == fingerprint(live_blocks(config.flows))
        await h.say("hi", user="u")
        assert await h.texts("ask", user="u") == ["Your name?"]
        await h.runtime.worker.run(strand, "u")

    # same blocks (a text changed): no scan, so start-up leaves "u" where it is ...
    async with harness(write_config(tmp_path, flows(menu_text="Choose"))) as h:
        await h.flush()
        assert h.new_messages("u") == []
        assert await h.runtime.worker.run(block_of, "u") == "gone"
        # ... and its next event moves it, before anything else happens to it
        assert await h.texts("Ann", user="u") == [TOLD, "Choose"]
        assert await h.runtime.worker.run(block_of, "u") == "menu"
        await h.runtime.worker.run(strand, "u")

    # a block added: the block set changed, so start-up scans and moves "u"
    async with harness(write_config(tmp_path, flows(extra=EXTRA_BLOCK))) as h:
        await h.flush()
        assert [m.text for m in h.new_messages("u")] == [TOLD, "Pick"]
        assert await h.runtime.worker.run(block_of, "u") == "menu"
        assert await h.runtime.worker.run(checked) != fingerprint(live_blocks(config.flows))


async def test_a_row_an_event_moved_after_the_scan_read_it_is_moved_once(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, flows())
    async with harness(config) as h:
        await h.say("hi", user="u")
        await h.say("ask", user="u")
        conv = (await h.runtime.worker.run(query, "SELECT id FROM conversations"))[0][0]
        await h.runtime.worker.run(strand, "u")
        await h.runtime.worker.run(query, "DELETE FROM settings")  # as after a config edit
        found = [Stranded(conv, "main", "gone", "", None)]
        # the user's message moves it (told once) ...
        assert await h.texts("Ann", user="u") == [TOLD, "Pick"]
        # ... and the scan that had read it before finds it moved, and leaves it
        done = await h.runtime.worker.run(stale_scan, found, h.clock.now())
        assert done.results == [] and done.errors == []
        await h.flush()
        assert h.new_messages("u") == []
        assert await h.runtime.worker.run(block_of, "u") == "menu"



async def test_a_conversation_an_event_reaches_during_the_scan_is_moved_once(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, flows())
    async with harness(config) as h:
        for user in ("a", "b", "c"):
            await h.say("hi", user=user)
            await h.say("ask", user=user)
            await h.runtime.worker.run(strand, user)
        await h.runtime.worker.run(query, "DELETE FROM settings")  # as after a config edit
        # the scan's first job (one conversation wide) moves "a" ...
        done = await h.runtime.worker.run(scan_job, (0, ""), h.clock.now())
        assert [r.user for r in done.results] == ["a"] and done.cursor is not None
        # ... "b" writes before the scan gets to it: its event moves it, told once
        assert await h.texts("Bob", user="b") == [TOLD, "Pick"]
        cursor: tuple[int, str] | None = done.cursor
        moved = []
        while cursor is not None:
            done = await h.runtime.worker.run(scan_job, cursor, h.clock.now())
            moved += [r.user for r in done.results]
            cursor = done.cursor
        assert moved == ["c"] and done.checked
        await h.flush()
        assert [m.text for m in h.new_messages("a")] == [TOLD, "Pick"]
        assert h.new_messages("b") == []
        assert [m.text for m in h.new_messages("c")] == [TOLD, "Pick"]
        assert await h.runtime.worker.run(checked) == fingerprint(live_blocks(config.flows))


NON_BLOCKING = """
[flows.main.blocks.nb]
type = "webview"
url = "https://pay.example/nb"
text = "Open when you like"
blocking = false
expiration = 600
response_variable = "nbdata"
next = "ask"
"""


async def test_a_callback_for_a_stranded_conversation_moves_it_first(tmp_path: Path) -> None:
    """A non-blocking WebView's callback (its block still there) reaching a conversation
    whose own block is gone, before the scan got to it: moved, then the data kept."""
    config = write_config(tmp_path, flows(extra=NON_BLOCKING).replace(
        'choices = [{ label = "ask", next = "ask" }]',
        'choices = [{ label = "ask", next = "ask" }, { label = "nb", next = "nb" }]'))
    async with harness(config) as h:
        await h.say("hi", user="u")
        got = await h.say("nb", user="u")
        link = next(m.link for m in got if m.link is not None)
        eid = link.url.split("executionId=")[1].split("&")[0]
        await h.runtime.worker.run(strand, "u")
        status, body = await h.post("/webview/callback", json={
            "executionId": eid, "success": True, "data": {"x": 1}})
        assert status == 200, body
        assert [m.text for m in h.new_messages("u")] == [TOLD, "Pick"]
        assert await h.runtime.worker.run(block_of, "u") == "menu"
        variables = (await h.runtime.worker.run(
            query, "SELECT variables FROM conversations WHERE user_id = 'u'"))[0][0]
        assert '"nbdata":{"x":1}' in variables


def parts_and_whole(store: Store, span: int, limit: int
                    ) -> tuple[list[Stranded], list[Stranded]]:
    """A database job: the stranded rows found stretch by stretch, and in one scan."""
    live = [("main", "menu", ""), ("main", "ask", ""), ("main", "done", "")]
    parts: list[Stranded] = []
    cursor: tuple[int, str] | None = (0, "")
    while cursor is not None:
        found, cursor = store.stranded_part(live, cursor, span, limit)
        parts += found
    return parts, store.stranded(live, -1)


@pytest.mark.parametrize(("span", "limit"), [(1, 1), (2, 1), (3, 200), (10_000, 200)])
async def test_the_scan_in_stretches_finds_what_one_scan_finds(
        tmp_path: Path, span: int, limit: int) -> None:
    config = write_config(tmp_path, flows(extra=NON_BLOCKING).replace(
        'choices = [{ label = "ask", next = "ask" }]',
        'choices = [{ label = "ask", next = "ask" }, { label = "nb", next = "nb" }]'))
    async with harness(config) as h:
        for user in ("a", "b", "c", "d", "e"):
            await h.say("hi", user=user)
            await h.say("nb" if user in "ce" else "ask", user=user)
        for user in ("b", "d"):
            await h.runtime.worker.run(strand, user)
        # c's and e's non-blocking WebView waits (their conversations went on) are orphaned
        parts, whole = await h.runtime.worker.run(parts_and_whole, span, limit)
        assert sorted(map(repr, parts)) == sorted(map(repr, whole))
        assert sorted(s.conversation_id for s in whole) == [0, 0, 2, 4]
