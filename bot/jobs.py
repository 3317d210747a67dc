"""Store operations as database jobs, for callers outside the ledger (the outbox, the
channels, tests): `await worker.run(jobs.web_history, session, 0)`.

Each calls the method of the same name on whichever backend the worker holds. A job names
a module-level function, so it pickles by name into the database process; naming a
method of the contract class (`Store.counts`) would run the Protocol's empty body.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.messages import Delivery
from bot.state import Conversation, OutboxRow, Wait
from bot.store import Store


def record_event(store: Store, event_id: str, now: float) -> bool:
    return store.record_event(event_id, now)


def conversation(store: Store, channel: str, user_id: str, new_key: str,
                 now: float) -> Conversation:
    return store.conversation(channel, user_id, new_key, now)


def move_conversation(store: Store, channel: str, old_user_id: str, new_user_id: str,
                      now: float) -> bool:
    return store.move_conversation(channel, old_user_id, new_user_id, now)


def conversation_by_key(store: Store, key: str) -> Conversation | None:
    return store.conversation_by_key(key)


def wait(store: Store, wait_id: str) -> Wait | None:
    return store.wait(wait_id)


def next_deadline(store: Store) -> float | None:
    return store.next_deadline()


def pending_by_channel(store: Store, channels: list[str], now: float,
                       limit: int, skip: Sequence[int] = ()) -> list[OutboxRow]:
    return store.pending_by_channel(channels, now, limit, skip)


def next_delivery_time(store: Store, now: float) -> float | None:
    return store.next_delivery_time(now)


def mark_all_sent(store: Store, rows: list[tuple[int, float, str | None]]) -> None:
    store.mark_all_sent(rows)


def mark_retry(store: Store, outbox_id: int, next_attempt: float, error: str) -> None:
    store.mark_retry(outbox_id, next_attempt, error)


def mark_failed(store: Store, outbox_id: int, error: str) -> None:
    store.mark_failed(outbox_id, error)


def set_platform_status(store: Store, platform_id: str, status: str, error: str | None,
                        now: float) -> bool:
    return store.set_platform_status(platform_id, status, error, now)


def resend_without_media(store: Store, platform_id: str, status: str, error: str | None,
                         now: float) -> int | None:
    return store.resend_without_media(platform_id, status, error, now)


def web_history(store: Store, user_id: str, after_id: int, limit: int = 200,
                newest: bool = False) -> list[Delivery]:
    return store.web_history(user_id, after_id, limit, newest)


def webview_states(store: Store, channel: str, user_id: str,
                   execution_ids: Sequence[str]) -> dict[str, str]:
    """The state of each of these WebView waits that belongs to the user's conversation
    (a reconnecting chat page asks about the links it still shows open); an id that is
    unknown (pruned), not a WebView's, or another user's is left out."""
    out: dict[str, str] = {}
    for execution_id in execution_ids:
        wait = store.wait(execution_id)
        if wait is None or wait.kind != "webview":
            continue
        conv = store.conversation_by_id(wait.conversation_id)
        if conv is not None and (conv.channel, conv.user_id) == (channel, user_id):
            out[execution_id] = wait.state
    return out


def counts(store: Store) -> dict[str, int]:
    return store.counts()


def prune(store: Store, category: str, cutoff: float, limit: int,
          cursor: int = 0) -> tuple[int, int]:
    return store.prune(category, cutoff, limit, cursor)
