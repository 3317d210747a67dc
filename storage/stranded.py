"""Finding conversations and waits that point at blocks a new config no longer has
(bot/stranded.py), in SQL.

Read on any connection, the server's or a read-only one (`flowbot check`): the config's
blocks go into a TEMP table, which even a read-only connection may write.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from bot.stranded import Stranded


def _load_live(conn: sqlite3.Connection, live: Sequence[tuple[str, str, str]]) -> None:
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS live_blocks (flow TEXT NOT NULL, "
                 "block TEXT NOT NULL, kind TEXT NOT NULL, PRIMARY KEY (flow, block)) "
                 "WITHOUT ROWID")
    conn.execute("DELETE FROM temp.live_blocks")
    conn.executemany("INSERT OR REPLACE INTO temp.live_blocks VALUES (?, ?, ?)", live)


def find_stranded(conn: sqlite3.Connection, live: Sequence[tuple[str, str, str]],
                  limit: int = -1) -> list[Stranded]:
    """Up to `limit` (-1: all) stranded conversations, then orphaned waits, in id order.

    A conversation is stranded when its block is not in `live` (flow, block, wait kind), or
    it holds a wait that is no longer pending (a timer fired at a removed block), or whose
    block is gone or now writes another kind of wait. Conversations with no block (not
    started, or ended) never are: their next message starts `start_flow` anyway."""
    _load_live(conn, live)
    rows = conn.execute(
        "SELECT c.id, c.flow, coalesce(c.block, ''), c.wait_id, w.flow, w.block, w.kind "
        "FROM conversations c LEFT JOIN waits w ON w.id = c.wait_id "
        "WHERE (c.block IS NOT NULL AND NOT EXISTS (SELECT 1 FROM temp.live_blocks b "
        "       WHERE b.flow = c.flow AND b.block = c.block)) "
        "   OR (c.wait_id IS NOT NULL AND (w.id IS NULL OR w.state != 'pending' "
        "       OR NOT EXISTS (SELECT 1 FROM temp.live_blocks b WHERE b.flow = w.flow "
        "       AND b.block = w.block AND b.kind = w.kind))) "
        "ORDER BY c.id LIMIT ?", (limit,)).fetchall()
    out = [Stranded(cid, wflow or flow, wblock or block, kind or "", wait_id)
           for cid, flow, block, wait_id, wflow, wblock, kind in rows]
    if limit < 0 or len(out) < limit:
        waits = conn.execute(
            "SELECT w.id, w.flow, w.block, w.kind FROM waits w WHERE w.state = 'pending' "
            "AND NOT EXISTS (SELECT 1 FROM temp.live_blocks b WHERE b.flow = w.flow "
            "AND b.block = w.block AND b.kind = w.kind) "
            "AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = w.conversation_id "
            "                AND c.wait_id = w.id) "
            "ORDER BY w.id LIMIT ?", (limit - len(out) if limit >= 0 else -1,)).fetchall()
        out += [Stranded(0, flow, block, kind, wid) for wid, flow, block, kind in waits]
    return out


def read_stranded(path: str, live: Sequence[tuple[str, str, str]]) -> list[Stranded]:
    """`find_stranded` on a read-only connection of its own (`flowbot check`): creates no
    file and waits for no writer. Raises sqlite3.Error when the file is not a flowbot
    database (or not readable)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return find_stranded(conn, live)
    finally:
        conn.close()
