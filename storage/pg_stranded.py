"""storage/stranded.py in PostgreSQL: the conversations and waits a config edit left
without their block, all at once (`find_stranded`, `flowbot check`) or one stretch of the
tables per call (`find_stranded_part`, the scan in small jobs of bot/stranded.py). The
config's blocks travel as three arrays (no temp table, so nothing stays on a pooled
session)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from bot.stranded import Stranded

_LIVE = ("live AS (SELECT * FROM unnest(%(flows)s::text[], %(blocks)s::text[], "
         "%(kinds)s::text[]) AS b(flow, block, kind))")
# a conversation (c, its wait w LEFT JOINed) at a block that is gone, or holding a wait
# that is gone, ended or at a block that is gone
_CONVERSATIONS = (
    f"WITH {_LIVE} "  # noqa: S608 - constants
    "SELECT c.id, c.flow, coalesce(c.block, ''), c.wait_id, w.flow, w.block, w.kind "
    "FROM conversations c LEFT JOIN waits w ON w.id = c.wait_id WHERE {where} AND ("
    "   (c.block IS NOT NULL AND NOT EXISTS (SELECT 1 FROM live b "
    "       WHERE b.flow = c.flow AND b.block = c.block)) "
    "   OR (c.wait_id IS NOT NULL AND (w.id IS NULL OR w.state != 'pending' "
    "       OR NOT EXISTS (SELECT 1 FROM live b WHERE b.flow = w.flow "
    "       AND b.block = w.block AND b.kind = w.kind)))) "
    "ORDER BY c.id LIMIT %(limit)s")
# a pending wait at a block that is gone whose conversation no longer holds it
_ORPHANED_WAITS = (
    f"WITH {_LIVE} "  # noqa: S608 - constants
    "SELECT w.id, w.flow, w.block, w.kind FROM waits w WHERE {where} AND w.state = 'pending' "
    "AND NOT EXISTS (SELECT 1 FROM live b WHERE b.flow = w.flow "
    "AND b.block = w.block AND b.kind = w.kind) "
    "AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = w.conversation_id "
    "                AND c.wait_id = w.id) "
    "ORDER BY w.id LIMIT %(limit)s")


def _params(live: Sequence[tuple[str, str, str]], limit: int | None) -> dict[str, Any]:
    return {"flows": [f for f, _, _ in live], "blocks": [b for _, b, _ in live],
            "kinds": [k for _, _, k in live], "limit": limit}


def _conversations(conn: psycopg.Connection[tuple[Any, ...]], where: str,
                   params: dict[str, Any]) -> list[Stranded]:
    rows = conn.execute(_CONVERSATIONS.replace("{where}", where), params).fetchall()
    return [Stranded(cid, wflow or flow, wblock or block, kind or "", wait_id)
            for cid, flow, block, wait_id, wflow, wblock, kind in rows]


def _orphaned_waits(conn: psycopg.Connection[tuple[Any, ...]], where: str,
                    params: dict[str, Any]) -> list[Stranded]:
    rows = conn.execute(_ORPHANED_WAITS.replace("{where}", where), params).fetchall()
    return [Stranded(0, flow, block, kind, wid) for wid, flow, block, kind in rows]


def find_stranded(conn: psycopg.Connection[tuple[Any, ...]],
                  live: Sequence[tuple[str, str, str]], limit: int = -1) -> list[Stranded]:
    """As storage/stranded.py's `find_stranded`: every stranded conversation, then the
    orphaned waits; at most `limit` rows (-1: all)."""
    params = _params(live, limit if limit >= 0 else None)
    out = _conversations(conn, "TRUE", params)
    if limit < 0 or len(out) < limit:
        params["limit"] = limit - len(out) if limit >= 0 else None
        out += _orphaned_waits(conn, "TRUE", params)
    return out


def find_stranded_part(conn: psycopg.Connection[tuple[Any, ...]],
                       live: Sequence[tuple[str, str, str]], cursor: tuple[int, str],
                       span: int, limit: int
                       ) -> tuple[list[Stranded], tuple[int, str] | None]:
    """As storage/stranded.py's: the conversations with ids in (cursor[0], cursor[0] +
    span], then (cursor[0] = -1) the orphaned waits among the `span` ids after cursor[1];
    at most `limit` rows; and the cursor to pass next (None: done)."""
    after, after_wait = cursor
    params = {**_params(live, limit), "after": after, "upto": after + span,
              "after_wait": after_wait}
    if after >= 0:
        found = _conversations(conn, "c.id > %(after)s AND c.id <= %(upto)s", params)
        if len(found) == limit:
            return found, (found[-1].conversation_id, "")
        row = conn.execute("SELECT coalesce(max(id), 0) FROM conversations").fetchone()
        last = row[0] if row else 0
        return found, ((after + span, "") if after + span < last else (-1, ""))
    edge = conn.execute("SELECT id FROM waits WHERE id > %s ORDER BY id LIMIT 1 OFFSET %s",
                        (after_wait, span - 1)).fetchone()
    params["upto_wait"] = edge[0] if edge else None
    found = _orphaned_waits(
        conn, "w.id > %(after_wait)s AND (%(upto_wait)s::text IS NULL OR w.id <= %(upto_wait)s)",
        params)
    if len(found) == limit:
        return found, (-1, found[-1].wait_id or "")
    return found, ((-1, params["upto_wait"]) if edge else None)
