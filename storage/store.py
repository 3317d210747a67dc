"""The SQLite store (the contract of bot/store.py): conversations, waits, outbox and seen
events, on sqlite-utils. `SQLiteLedger` is the ledger's jobs over it.

Methods here run *inside* a transaction that `DbWorker` opens (BEGIN IMMEDIATE);
none of them commits. Use them from the worker's thread only: each one is a job as it
stands (`await worker.run(SQLiteStore.counts)`), so its arguments and answer stay plain data
the database process can receive and send back pickled.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from bot import store as contract
from bot.config import Config
from bot.errors import StaleState
from bot.flow import WAIT_KINDS
from bot.ledger import Ledger, WebViewCheck
from bot.messages import Delivery, Message
from bot.state import Conversation, EarlyWebhook, OutboxRow, Step, Wait
from bot.store import FINAL_STATES, PER_CONVERSATION, status_advances, text_resends
from bot.stranded import REMOVED, Stranded
from storage.schema import migrations
from storage.stranded import find_stranded, find_stranded_part

__all__ = ["FINAL_STATES", "OutboxRow", "SQLiteLedger", "SQLiteStore", "Store", "read_counts",
           "read_pending_waits"]

EARLY_STATUS_TTL = 86400.0  # s a status for an unknown message id is kept

_PRUNE = {  # (cutoff, limit) → rows deleted; each found through an index on its time
    "events": "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? LIMIT ?)",
    "delivered": "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created < ? "
                 "AND state = 'sent' AND channel != 'web' LIMIT ?)",
    "web_history": "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created < ? "
                   "AND state = 'sent' AND channel = 'web' LIMIT ?)",
    "failed": "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created < ? "
              "AND state = 'failed' LIMIT ?)",
    "ended_waits": "DELETE FROM waits WHERE id IN (SELECT id FROM waits INDEXED BY "
                   "waits_created WHERE created < ? AND state != 'pending' LIMIT ?)",
    "early_statuses": "DELETE FROM early_statuses WHERE platform_id IN (SELECT platform_id "
                      "FROM early_statuses WHERE at < ? LIMIT ?)",
    "chat_aliases": "DELETE FROM chat_aliases WHERE rowid IN (SELECT rowid FROM chat_aliases "
                    "WHERE created < ? LIMIT ?)",
}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SQLiteStore(contract.Store):
    """One SQLite connection; one process at a time writes (see storage/worker.py). Its
    clock is the node's: the caller's `now` is the transaction's time."""

    def __init__(self, path: str | Path) -> None:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.path = Path(path)
        self.new_deadline = math.inf  # the earliest deadline save() wrote; the worker resets it
        self.db = Database(conn)
        self.conn = conn
        self.db.enable_wal()
        # WAL + NORMAL survives kill -9 of the process (not a power cut) at a fraction
        # of FULL's fsync cost; every commit is in the WAL before we answer.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        migrations.apply(self.db)

    def close(self) -> None:
        self.conn.close()

    def transaction_time(self, now: float) -> float:
        return now

    # -- transactions (used by DbWorker) ----------------------------------------------

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    @contextmanager
    def transaction(self) -> Iterator[SQLiteStore]:
        """One transaction outside the worker (CLI, tests, benchmarks' setup)."""
        self.begin()
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a job: undo only this block if it raises."""
        self.conn.execute("SAVEPOINT part")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO part")
            self.conn.execute("RELEASE part")
            raise
        self.conn.execute("RELEASE part")

    # -- inbound events ---------------------------------------------------------------

    def record_event(self, event_id: str, now: float) -> bool:
        """Remember an inbound event id; False when it was seen before."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO events (id, at) VALUES (?, ?)", (event_id, now))
        return cur.rowcount == 1

    # -- conversations ----------------------------------------------------------------

    def conversation(self, channel: str, user_id: str, new_key: str, now: float) -> Conversation:
        """The conversation of this user on this channel, created (not started) if new; at
        a moved chat's new address when `user_id` is its old one (`chat_aliases`)."""
        row = self.conn.execute(
            "SELECT * FROM conversations WHERE channel = ? AND user_id = ?", (channel, user_id)
        ).fetchone()
        if row is None:  # the old address of a moved chat? (looked up only when new)
            alias = self.conn.execute(
                "SELECT new_user_id FROM chat_aliases WHERE channel = ? AND old_user_id = ?",
                (channel, user_id)).fetchone()
            if alias is not None:
                user_id = alias[0]
                row = self.conn.execute("SELECT * FROM conversations WHERE channel = ? AND "
                                        "user_id = ?", (channel, user_id)).fetchone()
        if row is None:
            cur = self.conn.execute(
                "INSERT INTO conversations (channel, user_id, key, created, updated) "
                "VALUES (?, ?, ?, ?, ?)", (channel, user_id, new_key, now, now))
            return Conversation(id=int(cur.lastrowid or 0), channel=channel, user_id=user_id,
                                key=new_key)
        return self._conversation(row)

    def conversation_by_id(self, conversation_id: int) -> Conversation | None:
        row = self.conn.execute(
            "SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return self._conversation(row) if row else None

    def conversation_by_key(self, key: str) -> Conversation | None:
        row = self.conn.execute("SELECT * FROM conversations WHERE key = ?", (key,)).fetchone()
        return self._conversation(row) if row else None

    def move_conversation(self, channel: str, old_user_id: str, new_user_id: str,
                          now: float) -> bool:
        if old_user_id == new_user_id:
            return False
        # late updates from the old address follow (this transaction: with the move)
        self.conn.execute(
            "INSERT INTO chat_aliases (channel, old_user_id, new_user_id, created) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (channel, old_user_id) DO UPDATE SET "
            "new_user_id = excluded.new_user_id, created = excluded.created",
            (channel, old_user_id, new_user_id, now))
        row = self.conn.execute("SELECT id FROM conversations WHERE channel = ? AND "
                                "user_id = ?", (channel, old_user_id)).fetchone()
        if row is None:
            return False
        there = self.conn.execute("SELECT id FROM conversations WHERE channel = ? AND "
                                  "user_id = ?", (channel, new_user_id)).fetchone()
        if there is not None and there[0] < row[0]:
            # the one at the new id is the older, the real one (moved by the other notice
            # or a failed send); this one was started by a late update from the old id
            self.conn.execute("UPDATE conversations SET user_id = ?, updated = ? WHERE id = ?",
                              (f"{old_user_id}~replaced~{row[0]}", now, row[0]))
            return False
        if there is not None:
            self.conn.execute("UPDATE conversations SET user_id = ?, updated = ? WHERE id = ?",
                              (f"{new_user_id}~replaced~{there[0]}", now, there[0]))
        self.conn.execute(
            "UPDATE conversations SET user_id = ?, updated = ?, version = version + 1, "
            "variables = CASE WHEN json_type(variables, '$.user_id') IS NULL THEN variables "
            "ELSE json_set(variables, '$.user_id', ?) END WHERE id = ?",
            (new_user_id, now, new_user_id, row[0]))
        self.conn.execute("UPDATE outbox SET user_id = ? WHERE conversation_id = ? AND "
                          "state = 'pending'", (new_user_id, row[0]))
        return True

    def _conversation(self, row: tuple[Any, ...]) -> Conversation:
        (cid, channel, user_id, key, flow, block, wait_id, variables, version, *_rest) = row
        return Conversation(id=cid, channel=channel, user_id=user_id, key=key, flow=flow,
                            block=block, wait_id=wait_id, variables=json.loads(variables),
                            version=version)

    def save(self, conv: Conversation, step: Step, now: float) -> None:
        """Persist one step: the conversation, its new and cancelled waits, its messages."""
        cur = self.conn.execute(
            "UPDATE conversations SET flow = ?, block = ?, wait_id = ?, variables = ?, "
            "version = version + 1, updated = ? WHERE id = ? AND version = ?",
            (conv.flow, conv.block, conv.wait_id, _dumps(conv.variables), now, conv.id,
             conv.version))
        if cur.rowcount != 1:
            raise StaleState(f"conversation {conv.id} changed under us")
        conv.version += 1
        if step.cancelled_wait:
            self.conn.execute(
                "UPDATE waits SET state = 'cancelled', resolved_at = ? "
                "WHERE id = ? AND state = 'pending'", (now, step.cancelled_wait))
        if step.waits:
            self.new_deadline = min(self.new_deadline, *(w.deadline for w in step.waits))
            self.conn.executemany(
                "INSERT INTO waits (id, conversation_id, kind, flow, block, deadline, blocking, "
                "request, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(w.id, conv.id, w.kind, w.flow, w.block, w.deadline, int(w.blocking),
                  _dumps(w.request) if w.request is not None else None, now)
                 for w in step.waits])
        if step.messages:
            self.conn.executemany(
                "INSERT INTO outbox (conversation_id, channel, user_id, message, next_attempt, "
                "created) VALUES (?, ?, ?, ?, ?, ?)",
                [(conv.id, conv.channel, conv.user_id, m.to_json(), now, now)
                 for m in step.messages])

    # -- waits ------------------------------------------------------------------------

    def wait(self, wait_id: str) -> Wait | None:
        row = self.conn.execute(
            "SELECT id, kind, flow, block, deadline, blocking, request, conversation_id, state "
            "FROM waits WHERE id = ?", (wait_id,)).fetchone()
        if row is None:
            return None
        wid, kind, flow, block, deadline, blocking, request, cid, state = row
        return Wait(wid, kind, flow, block, deadline, bool(blocking),
                    json.loads(request) if request else None, cid, state)

    def claim(self, wait_id: str, outcome: str, now: float, *, due: bool) -> bool:
        """Move a pending wait to its final state: the one conditional UPDATE that decides.

        `due=False` (a callback or webhook) only wins before the deadline;
        `due=True` (the timer) only wins at or after it.
        """
        deadline_test = "deadline <= ?" if due else "deadline > ?"
        cur = self.conn.execute(
            f"UPDATE waits SET state = ?, resolved_at = ? "  # noqa: S608 - fixed fragments
            f"WHERE id = ? AND state = 'pending' AND {deadline_test}",
            (outcome, now, wait_id, now))
        return cur.rowcount == 1

    def due_waits(self, now: float, limit: int) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT id, kind FROM waits WHERE state = 'pending' AND deadline <= ? "
            "ORDER BY deadline LIMIT ?", (now, limit))]

    def next_deadline(self) -> float | None:
        """The earliest pending wait's deadline, or an early webhook's end of window."""
        row = self.conn.execute(
            "SELECT min(d) FROM (SELECT min(deadline) AS d FROM waits WHERE state = 'pending' "
            "UNION ALL SELECT min(expires) FROM early_webhooks)").fetchone()
        return row[0] if row and row[0] is not None else None

    def pending_http_waits(self) -> list[Wait]:
        ids = [r[0] for r in self.conn.execute(
            "SELECT id FROM waits WHERE state = 'pending' AND kind = 'http'")]
        return [w for w in map(self.wait, ids) if w is not None]

    # -- config changes -----------------------------------------------------------------

    def stranded(self, live: list[tuple[str, str, str]], limit: int) -> list[Stranded]:
        return find_stranded(self.conn, live, limit)

    def stranded_part(self, live: list[tuple[str, str, str]], cursor: tuple[int, str],
                      span: int, limit: int
                      ) -> tuple[list[Stranded], tuple[int, str] | None]:
        return find_stranded_part(self.conn, live, cursor, span, limit)

    def end_removed(self, wait_id: str, now: float) -> None:
        self.conn.execute("UPDATE waits SET state = ?, resolved_at = ? "
                          "WHERE id = ? AND state = 'pending'", (REMOVED, now, wait_id))

    def setting(self, name: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else None

    def set_setting(self, name: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)",
                          (name, value))

    def has_removed_webhook(self, conversation_id: int, since: float | None = None) -> bool:
        return self.conn.execute(
            # the literal state: the partial index waits_removed covers only those rows
            "SELECT 1 FROM waits WHERE conversation_id = ? AND state = 'removed' "
            "AND kind = 'webhook' AND (? IS NULL OR resolved_at >= ?) LIMIT 1",
            (conversation_id, since, since)).fetchone() is not None

    # -- webhooks that came before their block ----------------------------------------

    def keep_early_webhook(self, conversation_id: int, payload: Any, schemes: list[str],
                           now: float, expires: float) -> None:
        """Keep a call for a conversation not (yet) at a Webhook block until `expires`.
        `schemes`: the signature schemes it passed ("" when an unsigned block takes it)."""
        self.conn.execute(
            "INSERT INTO early_webhooks (conversation_id, payload, schemes, received, expires) "
            "VALUES (?, ?, ?, ?, ?)",
            (conversation_id, _dumps(payload), _dumps(schemes), now, expires))
        self.new_deadline = min(self.new_deadline, expires)

    def early_webhook_count(self, conversation_id: int, now: float) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM early_webhooks WHERE conversation_id = ? AND expires > ?",
            (conversation_id, now)).fetchone()
        return int(row[0])

    def take_early_webhook(self, conversation_id: int, scheme: str | None,
                           now: float) -> EarlyWebhook | None:
        """The oldest call kept for this conversation that a block requiring `scheme`
        (None: unsigned) accepts, removed from the table; None when there is none."""
        rows = self.conn.execute(
            "SELECT id, payload, schemes, received FROM early_webhooks "
            "WHERE conversation_id = ? AND expires > ? ORDER BY id", (conversation_id, now))
        for row_id, payload, schemes, received in rows.fetchall():
            if scheme is None or scheme in json.loads(schemes):
                self.conn.execute("DELETE FROM early_webhooks WHERE id = ?", (row_id,))
                return EarlyWebhook(conversation_id, json.loads(payload), received)
        return None

    def drop_expired_early_webhooks(self, now: float, limit: int) -> list[EarlyWebhook]:
        """Up to `limit` kept calls whose window has passed, removed (the caller logs
        and counts them; their payloads are not returned)."""
        rows = self.conn.execute(
            "DELETE FROM early_webhooks WHERE id IN (SELECT id FROM early_webhooks "
            "WHERE expires <= ? ORDER BY expires LIMIT ?) RETURNING conversation_id, received",
            (now, limit)).fetchall()
        return [EarlyWebhook(cid, None, received) for cid, received in rows]

    def mark_webhook_ended(self, conversation_id: int, now: float) -> None:
        self.conn.execute("UPDATE conversations SET webhook_ended = ? WHERE id = ?",
                          (now, conversation_id))

    def webhook_ended(self, conversation_id: int) -> float | None:
        """When the conversation last left a Webhook wait (answered or timed out)."""
        row = self.conn.execute("SELECT webhook_ended FROM conversations WHERE id = ?",
                                (conversation_id,)).fetchone()
        return row[0] if row else None

    # -- retention --------------------------------------------------------------------

    def prune(self, category: str, cutoff: float, limit: int, cursor: int = 0
              ) -> tuple[int, int]:
        if category == "idle_conversations":
            return self._prune_idle(cutoff, limit, cursor)
        sql = _PRUNE[category]
        return self.conn.execute(sql, (cutoff, limit)).rowcount, 0

    def _prune_idle(self, cutoff: float, limit: int, cursor: int) -> tuple[int, int]:
        """Walks the conversations by id, ten times `limit` rows a job (`updated` changes with
        every step, so it has no index: one would cost every transition a write)."""
        window = self.conn.execute(
            "SELECT id, updated, wait_id FROM conversations WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, limit * 10)).fetchall()
        if not window:
            return 0, 0
        idle = [cid for cid, updated, wait_id in window
                if updated < cutoff and wait_id is None][:limit]
        deleted = 0
        for cid in idle:
            # messages still to send keep it (a channel switched off holds them pending),
            # and so does a webhook call kept for its next Webhook block
            deleted += self.conn.execute(
                "DELETE FROM conversations WHERE id = ? AND NOT EXISTS (SELECT 1 FROM outbox "
                "WHERE conversation_id = ? AND state = 'pending') AND NOT EXISTS (SELECT 1 "
                "FROM early_webhooks WHERE conversation_id = ?)", (cid, cid, cid)).rowcount
        if len(idle) == limit:  # more may be idle in this window, after the last one
            return deleted, idle[-1]
        return deleted, (window[-1][0] if len(window) == limit * 10 else 0)

    # -- outbox -----------------------------------------------------------------------

    def pending_deliveries(self, now: float, limit: int, channel: str | None = None,
                           skip: Sequence[int] = (), per_conversation: int = PER_CONVERSATION
                           ) -> list[OutboxRow]:
        """Due rows in id order, at most `per_conversation` of each conversation, leaving
        out the conversations in `skip` (the outbox is delivering them) and every
        conversation whose earlier row still waits for a retry (per-conversation order is
        kept). So a conversation held back by its own rate limit never hides the others'
        rows behind the LIMIT, however long its backlog."""
        # conversations whose earliest row waiting for a retry blocks the rows after it
        held = dict(self.conn.execute(
            "SELECT conversation_id, min(id) FROM outbox INDEXED BY outbox_pending "
            "WHERE state = 'pending' AND next_attempt > ? GROUP BY conversation_id",
            (now,)).fetchall())
        cur = self.conn.execute(
            "SELECT id, channel, conversation_id, user_id, message, attempts, created "
            "FROM outbox "
            "WHERE state = 'pending' AND next_attempt <= ? AND (? IS NULL OR channel = ?) "
            "AND conversation_id NOT IN (SELECT value FROM json_each(?)) ORDER BY id",
            (now, channel, channel, json.dumps(list(skip))))
        taken: dict[int, int] = {}
        out: list[OutboxRow] = []
        for oid, chan, cid, user_id, message, attempts, created in cur:
            n = taken.get(cid, 0)
            # past its share, a later pass takes the rest of this backlog
            if n >= per_conversation or oid > held.get(cid, oid):
                continue
            taken[cid] = n + 1
            out.append(OutboxRow(oid, chan, cid, user_id, Message.from_json(message), attempts,
                                 created))
            if len(out) >= limit:
                break
        cur.close()
        return out

    def pending_by_channel(self, channels: list[str], now: float, limit: int,
                           skip: Sequence[int] = ()) -> list[OutboxRow]:
        """A window of due rows per channel (see `pending_deliveries`): a backlog held back
        by one platform's rate limit must not hide another platform's rows. Rows of a
        channel not in the list stay pending until it is enabled again."""
        return [row for name in channels
                for row in self.pending_deliveries(now, limit, name, skip)]

    def next_delivery_time(self, now: float) -> float | None:
        """The earliest retry still in the future. Rows already due need no timer: the
        outbox reads them on its next pass, which a commit or a finished delivery wakes."""
        row = self.conn.execute(
            "SELECT min(next_attempt) FROM outbox WHERE state = 'pending' AND next_attempt > ?",
            (now,)).fetchone()
        return row[0] if row and row[0] is not None else None

    def mark_sent(self, outbox_id: int, now: float, platform_id: str | None = None) -> None:
        self.conn.execute(
            "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1, "
            "platform_id = ? WHERE id = ?", (now, platform_id, outbox_id))
        if platform_id is None:
            return
        early = self.conn.execute(
            "DELETE FROM early_statuses WHERE platform_id = ? RETURNING status, error, resend",
            (platform_id,)).fetchall()
        if early and early[0][2]:  # the file failed before we knew the id: text again
            self.resend_without_media(platform_id, early[0][0], early[0][1], now)
        elif early:
            self.set_platform_status(platform_id, early[0][0], early[0][1], now)

    def mark_all_sent(self, rows: list[tuple[int, float, str | None]]) -> None:
        """(outbox id, when, platform id) of each delivered row."""
        for outbox_id, now, platform_id in rows:
            self.mark_sent(outbox_id, now, platform_id)

    def mark_retry(self, outbox_id: int, next_attempt: float, error: str) -> None:
        self.conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, error = ? "
            "WHERE id = ?", (next_attempt, error, outbox_id))

    def mark_failed(self, outbox_id: int, error: str) -> None:
        self.conn.execute(
            "UPDATE outbox SET state = 'failed', attempts = attempts + 1, error = ? "
            "WHERE id = ?", (error, outbox_id))

    def set_platform_status(self, platform_id: str, status: str, error: str | None,
                            now: float) -> bool:
        """A platform's delivery status for the message it knows as `platform_id`, unless
        it would move the message backwards (`status_advances`). False:
        no outbox row has that id yet; the status is kept a day for the "sent" commit
        that may still bring it (the platform can call back before we stored its id)."""
        rows = self.conn.execute(
            "SELECT id, platform_status FROM outbox WHERE platform_id = ?",
            (platform_id,)).fetchall()
        if rows:
            for outbox_id, current in rows:
                if status_advances(current, status):
                    self.conn.execute(
                        "UPDATE outbox SET platform_status = ?, error = coalesce(?, error) "
                        "WHERE id = ?", (status, error, outbox_id))
            return True
        self.conn.execute("DELETE FROM early_statuses WHERE at < ?", (now - EARLY_STATUS_TTL,))
        kept = self.conn.execute("SELECT status FROM early_statuses WHERE platform_id = ?",
                                 (platform_id,)).fetchone()
        if kept is None or status_advances(kept[0], status):
            self.conn.execute(
                "INSERT OR REPLACE INTO early_statuses (platform_id, status, error, at) "
                "VALUES (?, ?, ?, ?)", (platform_id, status, error, now))
        return False

    def resend_without_media(self, platform_id: str, status: str, error: str | None,
                             now: float) -> int | None:
        """See the contract. The new row goes to the conversation's address now (a moved
        chat's new one); none if retention deleted the conversation."""
        rows = self.conn.execute(
            "SELECT platform_status, conversation_id, message FROM outbox WHERE platform_id = ?",
            (platform_id,)).fetchall()
        if not self.set_platform_status(platform_id, status, error, now):
            # kept as an early status: the "sent" commit resends (mark_sent)
            self.conn.execute(
                "UPDATE early_statuses SET resend = 1 WHERE platform_id = ? AND status = ? "
                "AND at = ?", (platform_id, status, now))
            return None
        added = 0
        for cid, message in text_resends(rows, status):
            row = self.conn.execute(
                "INSERT INTO outbox (conversation_id, channel, user_id, message, next_attempt, "
                "created) SELECT id, channel, user_id, ?, ?, ? FROM conversations WHERE id = ? "
                "RETURNING id", (message.to_json(), now, now, cid)).fetchone()
            added = row[0] if row else added
        return added

    def web_history(self, user_id: str, after_id: int, limit: int = 200,
                    newest: bool = False) -> list[Delivery]:
        """Messages already handed to the web chat for one session, in id order, for a
        page that reconnects: the first `limit` after `after_id`, or with `newest` the
        last `limit` (a reloaded page). The channel is a literal: the partial index covers
        the web chat only."""
        order = "DESC" if newest else "ASC"
        rows = self.conn.execute(
            "SELECT id, conversation_id, message FROM outbox WHERE channel = 'web' "  # noqa: S608
            f"AND user_id = ? AND id > ? AND state = 'sent' ORDER BY id {order} LIMIT ?",
            (user_id, after_id, limit)).fetchall()
        if newest:
            rows.reverse()
        return [Delivery(oid, cid, user_id, Message.from_json(m)) for oid, cid, m in rows]

    # -- operators --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return count_rows(self.conn)


Store = SQLiteStore  # its name before the contract (tests and benchmarks use it)


class SQLiteLedger(Ledger, SQLiteStore):
    """The ledger's jobs over a SQLite file: what `flowbot serve` runs by default."""

    def __init__(self, path: str | Path, config: Config,
                 checks: Mapping[str, WebViewCheck] | None = None) -> None:
        SQLiteStore.__init__(self, path)
        Ledger.__init__(self, config, checks)


def count_rows(conn: sqlite3.Connection) -> dict[str, int]:
    """Waits and outbox rows by state, and conversations: full scans (0.3 s at 1M waits)."""
    out: dict[str, int] = {}
    for table in ("waits", "outbox"):
        for state, n in conn.execute(
                f"SELECT state, count(*) FROM {table} GROUP BY state"):  # noqa: S608
            out[f"{table}_{state}"] = n
    out["conversations"] = conn.execute("SELECT count(*) FROM conversations").fetchone()[0]
    return out


def read_pending_waits(path: str | Path) -> dict[str, int]:
    """Pending waits by kind, on a read-only connection of its own (in WAL mode it neither
    waits for the database worker nor holds it up): a scan of the timer's index alone, which
    holds the kind (migration m010). Run it on a thread; /metrics does, on each scrape."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10)
    try:
        # one pass, no sort: a GROUP BY would sort every pending row by kind first
        counts = ", ".join(f"count(*) FILTER (WHERE kind = '{k}')" for k in WAIT_KINDS)
        row = conn.execute(f"SELECT {counts} FROM waits INDEXED BY waits_due "  # noqa: S608
                           "WHERE state = 'pending'").fetchone()
        return dict(zip(WAIT_KINDS, row, strict=True))
    finally:
        conn.close()


def read_counts(path: str | Path) -> dict[str, int]:
    """`count_rows` on a read-only connection of its own: in WAL mode it neither waits for
    the database worker nor holds it up (run it on a thread: `asyncio.to_thread`)."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10)
    try:
        return count_rows(conn)
    finally:
        conn.close()
