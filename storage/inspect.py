"""Read-only looks into a database for operators (`flowbot conversations`, `flowbot
conversation`), in SQL both backends read alike, through a `Rows` function that
storage/admin.py opens read-only on either (so it neither creates a file nor waits for, or
holds up, the server that writes). Secrets are cut here, once: an executionId, a wait id
or a conversation_key appears only as its first characters."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

Rows = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
"""`rows(sql, args)`: every row of one query written with `?` placeholders."""

SHOWN = 6  # characters of a token shown to people
_EXECUTION_ID = re.compile(r"(executionId=)([A-Za-z0-9_-]{6})[A-Za-z0-9_%-]*")
HIDDEN_VARIABLES = ("conversation_key", "webhook_url")  # both carry the key


def short(token: str | None) -> str | None:
    """The first characters of a token and an ellipsis: enough to tell two apart."""
    if token is None:
        return None
    return token[:SHOWN] + "…" if len(token) > SHOWN else token


def mask(text: str, tokens: list[str]) -> str:
    """`text` with every executionId in a URL and every token in `tokens` shortened."""
    text = _EXECUTION_ID.sub(lambda m: f"{m.group(1)}{m.group(2)}…", text)
    for token in tokens:
        if token:
            text = text.replace(token, short(token) or "")
    return text


def list_conversations(rows: Rows, *, waiting: bool = False, channel: str | None = None,
                       block: str | None = None, idle_before: float | None = None,
                       limit: int = 100) -> list[dict[str, Any]]:
    """Conversations, most recently active first. `block` is "flow/block" or a block id;
    `idle_before`: only those not updated since this time (s since the epoch)."""
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if waiting:
        where.append("c.wait_id IS NOT NULL")
    if channel:
        where.append("c.channel = ?")
        args.append(channel)
    if block:
        if "/" in block:
            flow, _, bid = block.partition("/")
            where.append("c.flow = ? AND c.block = ?")
            args += [flow, bid]
        else:
            where.append("c.block = ?")
            args.append(block)
    if idle_before is not None:
        where.append("c.updated < ?")
        args.append(idle_before)
    sql = ("SELECT c.id, c.channel, c.user_id, c.key, c.flow, c.block, c.updated, "  # noqa: S608 - fixed fragments
           "w.id, w.kind, w.state, w.deadline FROM conversations c "
           "LEFT JOIN waits w ON w.id = c.wait_id "
           f"WHERE {' AND '.join(where)} ORDER BY c.updated DESC LIMIT ?")
    return [{"id": cid, "channel": ch, "user_id": user, "key": short(key), "flow": flow,
             "block": blk, "updated": updated,
             "wait": None if wid is None else {"id": short(wid), "kind": kind,
                                              "state": state, "deadline": deadline}}
            for cid, ch, user, key, flow, blk, updated, wid, kind, state, deadline
            in rows(sql, (*args, limit))]


def find_conversations(rows: Rows, key_or_user: str) -> list[tuple[int, str, str]]:
    """(id, channel, user id) of the conversation with this conversation_key, or else of
    every conversation of this user id (one per channel)."""
    found = rows("SELECT id, channel, user_id FROM conversations WHERE key = ?",
                 (key_or_user,))
    if not found:
        found = rows("SELECT id, channel, user_id FROM conversations "
                     "WHERE user_id = ? ORDER BY channel", (key_or_user,))
    return [(int(a), str(b), str(c)) for a, b, c in found]


def conversation_detail(rows: Rows, conversation_id: int, messages: int = 10
                        ) -> dict[str, Any]:
    """One conversation: where it stands, its variables, its open wait (and any other
    pending one), and its last `messages` outgoing messages with their delivery states."""
    ((cid, channel, user, key, flow, block, wait_id, variables, version, created,
      updated),) = rows(
        "SELECT id, channel, user_id, key, flow, block, wait_id, variables, version, "
        "created, updated FROM conversations WHERE id = ?", (conversation_id,))
    tokens = [key]
    waits = []
    ids = [wait_id] if wait_id else []
    for wid, kind, wflow, wblock, deadline, blocking, state, wcreated in rows(
            # pending waits of this conversation: few, through the timer's index
            "SELECT id, kind, flow, block, deadline, blocking, state, created FROM waits "
            "WHERE (state = 'pending' AND conversation_id = ?) OR id = ? "
            "ORDER BY created", (cid, wait_id or "")):
        tokens.append(wid)
        waits.append({"id": short(wid), "kind": kind, "flow": wflow, "block": wblock,
                      "deadline": deadline, "blocking": bool(blocking), "state": state,
                      "created": wcreated, "holds": wid in ids})
    sent = rows(
        "SELECT id, message, state, attempts, error, platform_status, created, sent_at "
        "FROM outbox WHERE conversation_id = ? ORDER BY id DESC LIMIT ?", (cid, messages))
    values = json.loads(variables)
    for name in HIDDEN_VARIABLES:
        if isinstance(values.get(name), str):
            values[name] = mask(values[name], tokens)
    out_messages = []
    for oid, raw, state, attempts, error, pstatus, mcreated, sent_at in reversed(sent):
        doc = json.loads(raw)
        text = mask(doc.get("text", ""), tokens)
        link = doc.get("link")
        out_messages.append({
            "id": oid, "text": text, "state": state, "attempts": attempts,
            "error": mask(error, tokens) if error else None, "platform_status": pstatus,
            "created": mcreated, "sent_at": sent_at,
            "link": mask(link[0], tokens) if link else None,
            "buttons": [b[0] for b in doc.get("buttons", [])]})
    return {"id": cid, "channel": channel, "user_id": user, "key": short(key), "flow": flow,
            "block": block, "version": version, "created": created, "updated": updated,
            "variables": values, "waits": waits, "messages": out_messages}
