"""The CLI's look at the stored data: what `check` says about the database, `backup`,
and the read-only `conversations` / `conversation` commands."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.config import Config
from bot.errors import NoDatabase, StorageError
from bot.flow import BLOCK_TYPES, live_blocks
from bot.stranded import per_block


def stranded_report(config: Config) -> list[str]:
    """Lines for `flowbot check`: conversations of the configured database that stand at
    blocks this config no longer has, counted per block, and what start-up will do with
    them. Read-only: nothing when the database file does not exist yet."""
    from storage import admin, preflight

    path = preflight.where(config)
    try:
        found = admin.stranded(config, live_blocks(config.flows))
    except NoDatabase:
        return [f"{path}: no database yet (it is created at the first start)"]
    except StorageError as exc:
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


# -- backup, conversations, conversation ---------------------------------------------------

Loader = Callable[[str], Config]


def add_commands(sub: Any, load: Loader) -> None:
    """Register `backup`, `conversations` and `conversation` on the CLI's subparsers."""
    b = sub.add_parser("backup", help="copy the database consistently while the server runs")
    b.add_argument("--config", required=True, help="the TOML config file")
    b.add_argument("out", help="the backup file to write (must not exist)")
    b.set_defaults(func=lambda args: cmd_backup(args, load))

    cs = sub.add_parser("conversations", help="list conversations (read-only)")
    cs.add_argument("--config", required=True, help="the TOML config file")
    cs.add_argument("--waiting", action="store_true", help="only those with an open wait")
    cs.add_argument("--channel", help="only this channel (telegram, whatsapp, web, file)")
    cs.add_argument("--block", help="only those at this block: BLOCK or FLOW/BLOCK")
    cs.add_argument("--idle-since", metavar="AGE",
                    help="only those idle at least this long: 30m, 12h, 7d, or a date "
                    "(2026-01-31)")
    cs.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    cs.add_argument("--json", action="store_true", help="JSON lines, for scripts")
    cs.set_defaults(func=lambda args: cmd_conversations(args, load))

    c = sub.add_parser("conversation", help="show one conversation (read-only)")
    c.add_argument("--config", required=True, help="the TOML config file")
    c.add_argument("key_or_user", metavar="KEY_OR_USER",
                   help="its conversation_key, or the user's id on its channel (one that "
                   "starts with '-': put -- before it)")
    c.add_argument("--channel", help="which channel, when the user has several")
    c.add_argument("--messages", type=int, default=10, help="last messages shown (10)")
    c.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    c.set_defaults(func=lambda args: cmd_conversation(args, load))


def cmd_backup(args: argparse.Namespace, load: Loader) -> int:
    """Exit 0 with the copy written; 2 when `out` is wrong (exists, no such folder); 1
    when the database cannot be copied (unreadable; on PostgreSQL: no pg_dump, pg_dump
    failed, server unreachable)."""
    from storage.admin import backup

    config = load(args.config)
    out = Path(args.out)
    try:
        info, restore = backup(config, out)
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"flowbot: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"flowbot: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {info.size / 1e6:.1f} MB in {info.seconds:.2f} s — {info.conversations} "
          f"conversation(s), {info.pending_waits} pending wait(s). {restore}")
    return 0


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def idle_before(text: str, now: float) -> float:
    """The time before which a conversation counts as idle: `now` minus an age (30m, 12h,
    7d), or a date / date-time (ISO 8601, UTC unless it says otherwise). ValueError."""
    m = _AGE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    when = datetime.fromisoformat(text.strip())
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = t - now
    span = abs(delta)
    ago = (f"{span:.0f} s" if span < 120 else f"{span / 60:.0f} min" if span < 7200
           else f"{span / 3600:.1f} h" if span < 172800 else f"{span / 86400:.1f} d")
    return f"{stamp} ({'in ' + ago if delta > 0 else ago + ' ago'})"


def cmd_conversations(args: argparse.Namespace, load: Loader) -> int:
    from storage.admin import list_conversations

    config = load(args.config)
    now = time.time()
    try:
        since = idle_before(args.idle_since, now) if args.idle_since else None
    except ValueError:
        print(f"flowbot: --idle-since {args.idle_since!r}: give an age (30m, 12h, 7d) or a "
              "date (2026-01-31)", file=sys.stderr)
        return 2
    try:
        rows = list_conversations(config, waiting=args.waiting,
                                  channel=args.channel, block=args.block, idle_before=since,
                                  limit=args.limit)
    except StorageError as exc:
        print(f"flowbot: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    if not rows:
        print("no conversation matches")
        return 0
    table: list[tuple[str, ...]] = [("ID", "CHANNEL", "USER", "AT", "WAITING FOR",
                                      "LAST ACTIVE")]
    for r in rows:
        wait = r["wait"]
        waiting = "-" if wait is None else (
            f"{wait['kind']} {wait['id']} until {_when(wait['deadline'], now)}"
            if wait["state"] == "pending" else f"{wait['kind']} ({wait['state']})")
        at = f"{r['flow']}/{r['block']}" if r["block"] else f"{r['flow'] or '-'} (ended)"
        table.append((str(r["id"]), r["channel"], r["user_id"], at, waiting,
                      _when(r["updated"], now)))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False))
              + "  " + line[-1])
    if len(rows) == args.limit:
        print(f"(the first {args.limit}; --limit shows more)")
    return 0


def cmd_conversation(args: argparse.Namespace, load: Loader) -> int:
    from storage.admin import conversation_detail, find_conversations

    config = load(args.config)
    try:
        found = find_conversations(config, args.key_or_user)
        if args.channel:
            found = [f for f in found if f[1] == args.channel]
        if len(found) != 1:
            if not found:
                print(f"flowbot: no conversation has the key or user id "
                      f"{args.key_or_user!r}" + (f" on {args.channel}" if args.channel else ""),
                      file=sys.stderr)
            else:
                print(f"flowbot: user {args.key_or_user!r} has a conversation on "
                      f"{', '.join(f[1] for f in found)}; add --channel", file=sys.stderr)
            return 2
        doc = conversation_detail(config, found[0][0], args.messages)
    except StorageError as exc:
        print(f"flowbot: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=2))
        return 0
    now = time.time()
    flow = config.flows.get(doc["flow"])
    block = flow.blocks.get(doc["block"]) if flow and doc["block"] else None
    kind = next((k for k, v in BLOCK_TYPES.items() if type(block) is v), None)
    at = (f"{doc['flow']}/{doc['block']}" + (f" ({kind} block)" if kind else
                                             " (not in this config)")
          if doc["block"] else f"{doc['flow'] or '-'} (ended, or not started)")
    print(f"conversation {doc['id']}: {doc['channel']} user {doc['user_id']}, "
          f"key {doc['key']}")
    print(f"  at:          {at}")
    print(f"  started:     {_when(doc['created'], now)}")
    print(f"  last active: {_when(doc['updated'], now)}")
    holds = [w for w in doc["waits"] if w["holds"]]
    others = [w for w in doc["waits"] if not w["holds"]]
    for w in holds:
        print(f"  waiting for: {w['kind']} at {w['flow']}/{w['block']}, id {w['id']}, "
              f"{w['state']}, deadline {_when(w['deadline'], now)}")
    if not holds:
        print("  waiting for: nothing (the user's next message)")
    for w in others:
        print(f"  also open:   {w['kind']} at {w['flow']}/{w['block']}, id {w['id']}, "
              f"deadline {_when(w['deadline'], now)}")
    print("  variables:")
    for name, value in sorted(doc["variables"].items()):
        print(f"    {name} = {json.dumps(value, ensure_ascii=False)}")
    print(f"  last {len(doc['messages'])} message(s):")
    for m in doc["messages"]:
        state = m["state"] + (f"/{m['platform_status']}" if m["platform_status"] else "")
        extra = f" — {m['error']}" if m["error"] else ""
        text = m["text"].replace("\n", " ")
        text = text if len(text) <= 70 else text[:69] + "…"
        link = f" [{m['link']}]" if m["link"] else ""
        print(f"    #{m['id']} {_when(m['created'], now)} {state} "
              f"(attempts {m['attempts']}){extra}: {text}{link}")
    return 0
