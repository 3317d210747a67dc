"""The storage contract: what the ledger, the timer, the outbox and the channels ask of a
store. storage/ implements it (SQLite, PostgreSQL); nothing outside storage/ imports a
database driver.

Every method runs *inside* a transaction the backend's worker opened, and none commits:
a job (`fn(store, *args)`, see bot/runtime.py's `Worker`) is a unit the worker commits,
or undoes alone. Arguments and answers are plain data (the domain types of bot/state.py
and bot/messages.py), so a job can cross to a database process and back pickled.

Rules every backend keeps:
- a transition locks its conversation first, then its wait (new conversations are
  created insert-if-absent): one lock order, no deadlocks;
- a wait is resolved by one conditional update of a pending row (`claim`), so callback,
  webhook and timer get exactly one winner;
- deadlines are compared with the backend's clock for the transaction (`now`, see
  `transaction_time`), never a node's;
- a job holds no connection across a network send: the outbox claims rows in one job,
  sends outside any transaction, and marks them in another.

Times are seconds since the epoch (float).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from bot.messages import Delivery, Message
from bot.state import Conversation, EarlyWebhook, OutboxRow, Step, Wait
from bot.stranded import Stranded

__all__ = ["Conversation", "Delivery", "EarlyWebhook", "OutboxRow", "Step", "Store", "Wait"]

FINAL_STATES = ("success", "error", "expired", "failure", "done", "cancelled", "removed")
"""The states a wait ends in; `pending` is the only other one."""
DELIVERY_ORDER = ("accepted", "scheduled", "queued", "sending", "sent", "delivered", "read")
"""A platform's delivery statuses in the order a message goes through them (Twilio's)."""
FINAL_DELIVERY = ("failed", "undelivered", "canceled")
"""Delivery statuses nothing moves a message out of."""


def text_resends(rows: Sequence[tuple[str | None, int, str]], status: str
                 ) -> list[tuple[int, Message]]:
    """For `Store.resend_without_media` (each backend's): of outbox rows (platform status,
    conversation id, message JSON) whose file the platform could not send, the
    conversations to send each one's text to again, as text only: rows with a file that
    `status` moves to a final status for the first time (a repeated callback finds the row
    final already)."""
    out = []
    for current, cid, raw in rows:
        message = Message.from_json(raw)
        if (message.media is not None and status in FINAL_DELIVERY
                and status_advances(current, status)):
            out.append((cid, message.without_media()))
    return out


def status_advances(current: str | None, new: str) -> bool:
    """Whether a delivery status callback may replace `current` with `new`. Callbacks
    arrive out of order (`read` before `sent`): a status never moves backwards, and a
    final one (failed, undelivered, canceled) stays. An unknown status only fills a gap."""
    if current is None:
        return True
    if current in FINAL_DELIVERY:
        return False
    if new in FINAL_DELIVERY:
        return True
    rank = {s: i for i, s in enumerate(DELIVERY_ORDER)}
    return rank.get(new, -1) > rank.get(current, -1)


PER_CONVERSATION = 50
"""Rows of one conversation an outbox pass reads: the rest wait for a later pass."""


PRUNE_CATEGORIES = ("events", "delivered", "web_history", "failed", "ended_waits",
                    "early_statuses", "idle_conversations", "chat_aliases")
"""What retention deletes, in the order a pruning round visits them."""


class Store(Protocol):
    """One backend's view of the database, inside the current transaction. Explicitly
    subclassed by the backends and by `bot.ledger.Ledger` (a mixin over it)."""

    def close(self) -> None:
        """Release the connection(s). Not a job."""
        ...

    def transaction_time(self, now: float) -> float:
        """The time this transaction runs at, in seconds: `now` (the caller's clock) on a
        backend whose clock is the node's (SQLite), the database's clock otherwise, so a
        node with a wrong clock can neither fire a timer early nor let a late call win."""
        ...

    def savepoint(self) -> AbstractContextManager[None]:
        """Inside a job: a block undone alone if it raises (the job goes on)."""
        ...

    def transaction(self) -> AbstractContextManager[Store]:
        """One transaction outside any worker (CLI, tests, benchmarks' setup)."""
        ...

    # -- inbound events ---------------------------------------------------------------

    def record_event(self, event_id: str, now: float) -> bool:
        """Remember an inbound event id; False when it was seen before (a redelivery)."""
        ...

    # -- conversations ----------------------------------------------------------------

    def conversation(self, channel: str, user_id: str, new_key: str, now: float) -> Conversation:
        """The conversation of this user on this channel, locked for this transaction;
        created (not started, with `new_key`) if there is none. A `user_id` that is the old
        address of a moved chat (`move_conversation`'s alias, kept in the database) means
        the conversation at its new address: a late update from an upgraded Telegram group
        reaches the moved conversation, after a restart too."""
        ...

    def conversation_by_id(self, conversation_id: int) -> Conversation | None:
        """The conversation with this id, locked for this transaction; None if unknown."""
        ...

    def conversation_by_key(self, key: str) -> Conversation | None:
        """The conversation whose `conversation_key` is `key`, locked; None if unknown."""
        ...

    def move_conversation(self, channel: str, old_user_id: str, new_user_id: str,
                          now: float) -> bool:
        """The platform gave a chat a new address (a Telegram group upgraded to a
        supergroup): the conversation at `old_user_id` — key, variables, open wait, pending
        messages — moves to `new_user_id`. A conversation already there (started by an
        update from the new address that came first) is set aside under
        "<new>~replaced~<its id>", unless it is the older of the two: then it is the real
        one, moved before, and the one at `old_user_id` (started by a late update from the
        old address) is set aside under "<old>~replaced~<its id>" and False returned. False
        when nothing is at `old_user_id` (moved already). In every case but `old_user_id ==
        new_user_id` the alias old → new is written in this transaction (see
        `conversation`), whatever was moved."""
        ...

    def save(self, conv: Conversation, step: Step, now: float) -> None:
        """Persist one step: the conversation (optimistic on `conv.version`, which it
        bumps; raises `bot.errors.StaleState` if the row moved), the wait it cancels, its
        new waits and its messages (outbox rows), all in this transaction."""
        ...

    # -- waits ------------------------------------------------------------------------

    def wait(self, wait_id: str) -> Wait | None:
        """The wait with this id, whatever its state; None if unknown."""
        ...

    def claim(self, wait_id: str, outcome: str, now: float, *, due: bool) -> bool:
        """Move a pending wait to `outcome`: the one conditional update that decides.
        `due=False` (a callback, a webhook) wins only before the deadline, `due=True`
        (the timer) only at or after it. True: this caller won."""
        ...

    def due_waits(self, now: float, limit: int) -> list[tuple[str, str]]:
        """(id, kind) of up to `limit` pending waits whose deadline is at or before `now`,
        earliest first."""
        ...

    def next_deadline(self) -> float | None:
        """The earliest deadline of a pending wait or end of an early webhook's window
        (`keep_early_webhook`); None when there is neither."""
        ...

    def pending_http_waits(self) -> list[Wait]:
        """Pending `http` waits (their requests are sent again after a restart)."""
        ...

    # -- webhooks that came before their block ----------------------------------------

    def keep_early_webhook(self, conversation_id: int, payload: Any, schemes: list[str],
                           now: float, expires: float) -> None:
        """Keep a webhook call for a conversation not (yet) at a Webhook block, until
        `expires`. `schemes`: names of the signature schemes it passed ("" when an unsigned
        block would take it)."""
        ...

    def early_webhook_count(self, conversation_id: int, now: float) -> int:
        """Calls kept for this conversation whose window has not passed."""
        ...

    def take_early_webhook(self, conversation_id: int, scheme: str | None,
                           now: float) -> EarlyWebhook | None:
        """The oldest unexpired call kept for this conversation that a block requiring
        `scheme` (None: unsigned) accepts, removed; None when there is none."""
        ...

    def drop_expired_early_webhooks(self, now: float, limit: int) -> list[EarlyWebhook]:
        """Remove up to `limit` kept calls whose window has passed (`payload` None)."""
        ...

    def mark_webhook_ended(self, conversation_id: int, now: float) -> None:
        """The conversation left a Webhook wait (answered or timed out) at `now`."""
        ...

    def webhook_ended(self, conversation_id: int) -> float | None:
        """When the conversation last left a Webhook wait; None if never."""
        ...

    # -- outbox -----------------------------------------------------------------------

    # -- config changes (bot/stranded.py) ---------------------------------------------

    def stranded(self, live: list[tuple[str, str, str]], limit: int) -> list[Stranded]:
        """Up to `limit` (-1: all) conversations that stand at a block not in `live` (flow,
        block, wait kind), or hold a wait that is no longer pending or whose block is gone
        or writes another kind of wait now; then pending waits of gone blocks that hold no
        conversation (non-blocking WebViews). Conversations with no block never are."""
        ...

    def stranded_part(self, live: list[tuple[str, str, str]], cursor: tuple[int, str],
                      span: int, limit: int
                      ) -> tuple[list[Stranded], tuple[int, str] | None]:
        """`stranded` over one stretch: the conversations with ids in (cursor[0], cursor[0]
        + span], then, once cursor[0] is -1, the orphaned waits among the `span` wait ids
        after cursor[1]; at most `limit` rows. Returns them and the cursor to pass next,
        None when both tables are done; start at (0, ""). Reads about `span` rows."""
        ...

    def end_removed(self, wait_id: str, now: float) -> None:
        """End a pending wait as `removed` (its block is gone)."""
        ...

    def setting(self, name: str) -> str | None:
        """A value flowbot keeps in the database about itself (`bot.stranded.CHECKED_BLOCKS`);
        None when it was never set (a database written by an older release, or a copy)."""
        ...

    def set_setting(self, name: str, value: str) -> None:
        """Keep `value` under `name`, in this transaction."""
        ...

    def has_removed_webhook(self, conversation_id: int, since: float | None = None) -> bool:
        """Whether a Webhook wait of this conversation ended as `removed` (at or after
        `since`, when given)."""
        ...

    # -- retention --------------------------------------------------------------------

    def prune(self, category: str, cutoff: float, limit: int, cursor: int = 0
              ) -> tuple[int, int]:
        """Delete at most `limit` rows of one category (`PRUNE_CATEGORIES`) older than
        `cutoff`: (how many it deleted, the cursor to pass next; 0 when a pass over the
        table is complete). Only finished data: never a pending wait, a pending outbox row,
        or a conversation that waits or has messages to send. A leader-only singleton on a
        backend with several nodes."""
        ...

    # -- outbox -----------------------------------------------------------------------

    def pending_deliveries(self, now: float, limit: int, channel: str | None = None,
                           skip: Sequence[int] = (), per_conversation: int = PER_CONVERSATION
                           ) -> list[OutboxRow]:
        """Due rows in id order, at most `per_conversation` of each conversation, leaving
        out the conversations in `skip` (being delivered) and every conversation whose
        earlier row still waits for a retry (per-conversation order is kept): a backlog
        held back by its own chat's rate limit never hides another chat's rows."""
        ...

    def pending_by_channel(self, channels: list[str], now: float, limit: int,
                           skip: Sequence[int] = ()) -> list[OutboxRow]:
        """A window of due rows per channel, so one platform's backlog hides no other's."""
        ...

    def next_delivery_time(self, now: float) -> float | None:
        """The earliest retry after `now`; None when none is scheduled. Rows already due
        need no timer: the outbox reads them when a commit or a delivery wakes it."""
        ...

    def mark_sent(self, outbox_id: int, now: float, platform_id: str | None = None) -> None:
        """A row was delivered (`platform_id`: the platform's message id, if any)."""
        ...

    def mark_all_sent(self, rows: list[tuple[int, float, str | None]]) -> None:
        """`mark_sent` for each (outbox id, when, platform id)."""
        ...

    def mark_retry(self, outbox_id: int, next_attempt: float, error: str) -> None:
        """A delivery failed transiently: try again at `next_attempt`."""
        ...

    def mark_failed(self, outbox_id: int, error: str) -> None:
        """A delivery failed for good."""
        ...

    def set_platform_status(self, platform_id: str, status: str, error: str | None,
                            now: float) -> bool:
        """A platform's delivery status for its message `platform_id`, applied only when
        `status_advances` (callbacks arrive out of order). False: no row has that id yet
        (the status is kept, by the same rule, for the commit that may still bring it)."""
        ...

    def resend_without_media(self, platform_id: str, status: str, error: str | None,
                             now: float) -> int | None:
        """`set_platform_status` for a status saying the platform could not send the file
        of its message `platform_id`; and where that moves a row whose message has a file
        to a final status for the first time, a new pending row for the row's conversation
        with the message as text only (`Message.without_media`), in this transaction, so
        the text and its choices still reach the user. A repeated callback finds the row
        final already: nothing more is added. The new row's id; 0 when none was added;
        None when no row has that id yet: the status is kept as `set_platform_status`
        keeps it, and the `mark_sent` that brings the id adds the row then."""
        ...

    def web_history(self, user_id: str, after_id: int, limit: int = 200,
                    newest: bool = False) -> list[Delivery]:
        """Web chat messages already sent to one session, in id order: the first `limit`
        after `after_id`, or with `newest` the last `limit`."""
        ...

    # -- operators --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Waits and outbox rows by state (`waits_pending`, `outbox_sent`, …) and
        `conversations`."""
        ...
