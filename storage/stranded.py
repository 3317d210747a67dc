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


def find_stranded_part(conn: sqlite3.Connection, live: Sequence[tuple[str, str, str]],
                       cursor: tuple[int, str], span: int, limit: int
                       ) -> tuple[list[Stranded], tuple[int, str] | None]:
    """`find_stranded` over one stretch of the tables, for a scan in small jobs: the
    conversations with ids in (cursor[0], cursor[0] + span], then (once cursor[0] is -1) the
    orphaned waits among the `span` wait ids after cursor[1]; at most `limit` rows. Returns
    them and the cursor to pass next (None: both tables done). Each call reads about `span`
    rows, however large the tables."""
    _load_live(conn, live)
    after, after_wait = cursor
    if after >= 0:
        upto = after + span
        rows = conn.execute(
            "SELECT c.id, c.flow, coalesce(c.block, ''), c.wait_id, w.flow, w.block, w.kind "
            "FROM conversations c LEFT JOIN waits w ON w.id = c.wait_id "
            "WHERE c.id > ? AND c.id <= ? AND ("
            "   (c.block IS NOT NULL AND NOT EXISTS (SELECT 1 FROM temp.live_blocks b "
            "       WHERE b.flow = c.flow AND b.block = c.block)) "
            "   OR (c.wait_id IS NOT NULL AND (w.id IS NULL OR w.state != 'pending' "
            "       OR NOT EXISTS (SELECT 1 FROM temp.live_blocks b WHERE b.flow = w.flow "
            "       AND b.block = w.block AND b.kind = w.kind)))) "
            "ORDER BY c.id LIMIT ?", (after, upto, limit)).fetchall()
        found = [Stranded(cid, wflow or flow, wblock or block, kind or "", wait_id)
                 for cid, flow, block, wait_id, wflow, wblock, kind in rows]
        if len(found) == limit:
            return found, (found[-1].conversation_id, "")
        last = conn.execute("SELECT max(id) FROM conversations").fetchone()[0] or 0
        return found, ((upto, "") if upto < last else (-1, ""))
    edge = conn.execute("SELECT id FROM waits WHERE id > ? ORDER BY id LIMIT 1 OFFSET ?",
                        (after_wait, span - 1)).fetchone()
    upto_wait = edge[0] if edge else None
    waits = conn.execute(
        "SELECT w.id, w.flow, w.block, w.kind FROM waits w WHERE w.id > ? "
        "AND (? IS NULL OR w.id <= ?) AND w.state = 'pending' "
        "AND NOT EXISTS (SELECT 1 FROM temp.live_blocks b WHERE b.flow = w.flow "
        "AND b.block = w.block AND b.kind = w.kind) "
        "AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = w.conversation_id "
        "                AND c.wait_id = w.id) "
        "ORDER BY w.id LIMIT ?", (after_wait, upto_wait, upto_wait, limit)).fetchall()
    found = [Stranded(0, flow, block, kind, wid) for wid, flow, block, kind in waits]
    if len(found) == limit:
        return found, (-1, found[-1].wait_id or "")
    return found, ((-1, upto_wait) if upto_wait is not None else None)


def read_stranded(path: str, live: Sequence[tuple[str, str, str]]) -> list[Stranded]:
    """`find_stranded` on a read-only connection of its own (`flowbot check`): creates no
    file and waits for no writer. Raises sqlite3.Error when the file is not a flowbot
    database (or not readable)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return find_stranded(conn, live)
    finally:
        conn.close()
