"""Conversation state, waits, the result of one step and outbox rows: what the store persists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.messages import Delivery, Message

# How each kind of wait ends when its deadline passes.
TIMEOUT_OUTCOME = {"webview": "expired", "webhook": "failure", "delay": "done", "http": "failure"}


@dataclass
class Conversation:
    """Everything the engine knows about one conversation; the store persists it whole."""

    id: int
    channel: str
    user_id: str
    key: str
    flow: str = ""
    block: str | None = None  # where it stands; None before the start and after the end
    wait_id: str | None = None  # the pending wait that holds it at `block`
    variables: dict[str, Any] = field(default_factory=dict)
    version: int = 0


@dataclass(frozen=True)
class Wait:
    """A wait row: the engine asks for new ones, the store hands resolved ones back."""

    id: str
    kind: str  # webview | webhook | delay | http
    flow: str
    block: str
    deadline: float
    blocking: bool
    request: Mapping[str, Any] | None = None  # http: what to send
    conversation_id: int = 0  # set when read back from the store
    state: str = "pending"


@dataclass
class Step:
    """What one event produced, to be committed in one transaction."""

    messages: list[Message] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    cancelled_wait: str | None = None


@dataclass(frozen=True)
class EarlyWebhook:
    """A webhook call kept because its conversation was not at a Webhook block yet
    (`payload` is None where only the fact is wanted: a call dropped past its window)."""

    conversation_id: int
    payload: Any
    received: float


@dataclass(frozen=True)
class OutboxRow:
    """A committed message not yet delivered, as the outbox reads it back."""

    id: int
    channel: str
    conversation_id: int
    user_id: str
    message: Message
    attempts: int
    created: float = 0.0  # when its transition committed (0: unknown)

    def delivery(self) -> Delivery:
        return Delivery(self.id, self.conversation_id, self.user_id, self.message)
