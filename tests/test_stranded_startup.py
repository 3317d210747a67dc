"""Start-up does not read every conversation to find stranded ones (bot/stranded.py): only
a config whose block set differs from the one the database was last checked against makes
it scan; and a row the scan found but an event moved meanwhile is not moved twice."""

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
    ledger.stranded = lambda live, limit: stale  # type: ignore[method-assign]
    try:
        return Ledger.move_stranded(ledger, now)
    finally:
        del ledger.stranded


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

