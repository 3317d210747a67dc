"""The CLI's look at the stored data: what `check` says about the database."""

from __future__ import annotations

import sqlite3

from bot.config import Config
from bot.flow import live_blocks
from bot.stranded import per_block
from storage.stranded import read_stranded


def stranded_report(config: Config) -> list[str]:
    """Lines for `flowbot check`: conversations of the configured database that stand at
    blocks this config no longer has, counted per block, and what start-up will do with
    them. Read-only: nothing when the database file does not exist yet."""
    path = config.storage.path
    if not path.exists():
        return [f"{path}: no database yet (it is created at the first start)"]
    try:
        found = read_stranded(str(path), live_blocks(config.flows))
    except sqlite3.Error as exc:
        return [f"{path}: could not read it to look for stranded conversations ({exc})"]
    if not found:
        return [f"{path}: every stored conversation stands at a block this config has"]
    target = config.bot.stranded_target
    convs = sum(1 for s in found if s.conversation_id)
    waits = sum(1 for s in found if not s.conversation_id)
    head = (f"{path}: {convs} conversation(s) stand at blocks this config no longer has"
            + (f" (and {waits} open wait(s) of removed blocks)" if waits else "")
            + f"; at start they move to the start of flow {target!r} and are told "
            "bot.stranded_message:")
    return [head] + [f"  {place}: {n}" for place, n in per_block(found)]
