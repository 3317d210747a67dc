"""storage/stranded.py's `find_stranded_part` in PostgreSQL: one stretch of the tables per
call, so the scan after a config edit runs in small jobs (bot/stranded.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from bot.stranded import Stranded

_LIVE = ("live AS (SELECT * FROM unnest(%(flows)s::text[], %(blocks)s::text[], "
         "%(kinds)s::text[]) AS b(flow, block, kind))")


def find_stranded_part(conn: psycopg.Connection[tuple[Any, ...]],
                       live: Sequence[tuple[str, str, str]], cursor: tuple[int, str],
                       span: int, limit: int
                       ) -> tuple[list[Stranded], tuple[int, str] | None]:
    """As storage/stranded.py's: the conversations with ids in (cursor[0], cursor[0] +
    span], then (cursor[0] = -1) the orphaned waits among the `span` ids after cursor[1];
    at most `limit` rows; and the cursor to pass next (None: done)."""
    after, after_wait = cursor
    params: dict[str, Any] = {
        "flows": [f for f, _, _ in live], "blocks": [b for _, b, _ in live],
        "kinds": [k for _, _, k in live], "limit": limit, "after": after,
        "upto": after + span, "after_wait": after_wait}
    if after >= 0:
        rows = conn.execute(
            f"WITH {_LIVE} "  # noqa: S608 - a constant
            "SELECT c.id, c.flow, coalesce(c.block, ''), c.wait_id, w.flow, w.block, w.kind "
            "FROM conversations c LEFT JOIN waits w ON w.id = c.wait_id "
            "WHERE c.id > %(after)s AND c.id <= %(upto)s AND ("
            "   (c.block IS NOT NULL AND NOT EXISTS (SELECT 1 FROM live b "
            "       WHERE b.flow = c.flow AND b.block = c.block)) "
            "   OR (c.wait_id IS NOT NULL AND (w.id IS NULL OR w.state != 'pending' "
            "       OR NOT EXISTS (SELECT 1 FROM live b WHERE b.flow = w.flow "
            "       AND b.block = w.block AND b.kind = w.kind)))) "
            "ORDER BY c.id LIMIT %(limit)s", params).fetchall()
        found = [Stranded(cid, wflow or flow, wblock or block, kind or "", wait_id)
                 for cid, flow, block, wait_id, wflow, wblock, kind in rows]
        if len(found) == limit:
            return found, (found[-1].conversation_id, "")
        row = conn.execute("SELECT coalesce(max(id), 0) FROM conversations").fetchone()
        last = row[0] if row else 0
        return found, ((after + span, "") if after + span < last else (-1, ""))
    edge = conn.execute("SELECT id FROM waits WHERE id > %s ORDER BY id LIMIT 1 OFFSET %s",
                        (after_wait, span - 1)).fetchone()
    params["upto_wait"] = edge[0] if edge else None
    waits = conn.execute(
        f"WITH {_LIVE} "  # noqa: S608 - a constant
        "SELECT w.id, w.flow, w.block, w.kind FROM waits w WHERE w.id > %(after_wait)s "
        "AND (%(upto_wait)s::text IS NULL OR w.id <= %(upto_wait)s) AND w.state = 'pending' "
        "AND NOT EXISTS (SELECT 1 FROM live b WHERE b.flow = w.flow "
        "AND b.block = w.block AND b.kind = w.kind) "
        "AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = w.conversation_id "
        "                AND c.wait_id = w.id) "
        "ORDER BY w.id LIMIT %(limit)s", params).fetchall()
    found = [Stranded(0, flow, block, kind, wid) for wid, flow, block, kind in waits]
    if len(found) == limit:
        return found, (-1, found[-1].wait_id or "")
    return found, ((-1, params["upto_wait"]) if edge else None)
