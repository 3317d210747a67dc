"""What every channel speaks: inbound events, outgoing messages, the channel protocol."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bot.messages import (
    MEDIA_VARIABLES,
    Button,
    Delivery,
    Inbound,
    Link,
    Media,
    Message,
    media_variables,
)

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [  # the message types live in bot/ (the engine's side); channels speak them
    "MEDIA_VARIABLES", "Button", "Channel", "Delivery", "Handler", "Inbound", "InboundHandler",
    "Link", "Media", "Message", "RateLimit", "Route", "SendError", "SentParts", "media_variables",
    "split_text",
]


class SendError(Exception):
    """A delivery failed. Transient ones are retried by the outbox; permanent ones recorded."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True)
class RateLimit:
    """How fast the outbox may send through a channel."""

    per_chat_per_second: float | None = None
    global_per_second: float | None = None
    burst: int = 3  # messages a chat may get at once before the per-chat rate applies


def split_text(text: str, limit: int) -> list[str]:
    """Text a platform would refuse as too long, in parts of at most `limit` characters,
    cut at line breaks where possible."""
    parts: list[str] = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        cut = cut if cut > limit // 2 else limit
        parts.append(text[:cut])
        text = text[cut:].lstrip("\n")
    parts.append(text)
    return parts


class SentParts:
    """How many parts of a split message a channel has sent, by `Delivery.id`: when a part
    fails and the outbox retries the delivery, only the parts not yet sent go out again.
    Kept in memory: after a crash the whole message is sent again (at-least-once)."""

    def __init__(self, cap: int = 10_000) -> None:
        self.cap = cap
        self._sent: dict[int, int] = {}

    def first_unsent(self, delivery_id: int) -> int:
        return self._sent.get(delivery_id, 0)

    def sent(self, delivery_id: int, count: int) -> None:
        if len(self._sent) >= self.cap:  # rows that failed for good never come back
            self._sent.clear()
        self._sent[delivery_id] = count

    def done(self, delivery_id: int) -> None:
        self._sent.pop(delivery_id, None)


InboundHandler = Callable[[Inbound], Awaitable[bool]]
"""Commits the event (dedupe, transition, outbox rows); returns False for a duplicate."""

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # relative to the server's path prefix, e.g. "/telegram"
    handler: Handler


class Channel(Protocol):
    """A chat platform. Translates payloads both ways; makes no flow decisions."""

    name: str
    rate_limit: RateLimit

    def routes(self) -> Sequence[Route]:
        """HTTP routes the server mounts for this channel."""
        ...

    async def start(self) -> None:
        """Open sessions, register webhooks or start polling."""
        ...

    async def stop(self) -> None: ...

    async def send(self, delivery: Delivery) -> str | None:
        """Deliver one message; return the platform's message id if any; raise `SendError`."""
        ...
