"""Conversations and waits a new config strands: they point at a block (or flow) the config
no longer has. Found by the store (`Store.stranded_part`, in stretches), moved by the ledger
after start-up in the background, or by the first event that reaches one."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

CHECKED_BLOCKS = "checked_blocks"
"""The setting (`Store.setting`) that holds the `fingerprint` of the blocks of the last
config every stored conversation and wait was checked against."""
REMOVED = "removed"
"""The state a wait ends in when its block is gone; a late callback or webhook gets 410."""


@dataclass(frozen=True)
class Stranded:
    """One conversation that cannot go on where it stands, or one orphaned wait.

    `conversation_id` is 0 for a pending wait that holds no conversation (a non-blocking
    WebView) whose block is gone. `flow`/`block`/`kind` say where it stood: the open wait's
    block and kind when it had one, else its current block (kind "")."""

    conversation_id: int
    flow: str
    block: str
    kind: str
    wait_id: str | None

    def place(self) -> str:
        """"flow/block", with the kind of wait it held, for people."""
        where = f"{self.flow}/{self.block}"
        return f"{where} ({self.kind} wait)" if self.kind else where


def per_block(found: Sequence[Stranded]) -> list[tuple[str, int]]:
    """("flow/block (kind wait)", how many) for a report, most first."""
    return Counter(s.place() for s in found).most_common()


def fingerprint(live: Sequence[tuple[str, str, str]]) -> str:
    """A digest of a config's (flow, block, wait kind) triples (`bot.flow.live_blocks`), in
    any order: what decides which conversations are stranded. Equal digests mean the same
    block set, so a database already checked against one needs no scan for the other."""
    text = json.dumps(sorted(live), separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
