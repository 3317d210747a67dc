"""What every channel speaks: inbound events, outgoing messages, the channel protocol."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import regex

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
    "Link", "Media", "Message", "RateLimit", "Route", "SendError", "SentParts", "cut_text",
    "media_variables", "split_text", "utf16_len",
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


def utf16_len(text: str) -> int:
    """`text`'s length in UTF-16 code units, the way Telegram counts a message's 4,096 and a
    caption's 1,024 characters (core.telegram.org/api/entities: "lengths are in UTF-16 code
    units"): a character beyond U+FFFF (most emoji) counts 2."""
    return len(text.encode("utf-16-le")) // 2


_GRAPHEME = regex.compile(r"\X")  # an extended grapheme cluster (UAX #29): 👩‍💻, é, 🇩🇪


def _fitting(text: str, limit: int, size: Callable[[str], int]) -> int:
    """The length (in code points) of the longest start of `text` within `limit` by `size`
    that ends between two grapheme clusters, so no emoji, flag, ZWJ sequence or combining
    mark is torn; at least one cluster (or code point) so that splitting goes on."""
    end = used = 0
    for match in _GRAPHEME.finditer(text):
        units = size(match.group())
        if used + units > limit:
            break
        end, used = match.end(), used + units
    if end:
        return end
    # one cluster is longer than the limit (a pathological ZWJ chain): by code point
    for i, ch in enumerate(text):
        used += size(ch)
        if used > limit:
            return max(i, 1)
    return len(text)


def cut_text(text: str, limit: int, size: Callable[[str], int] = len) -> tuple[str, str]:
    """(head, rest): `head` at most `limit` by `size` (len: code points; utf16_len: what
    Telegram counts), cut at the last line break in its second half, else the last space
    there, else between two grapheme clusters. The break or space at the cut is dropped;
    `rest` is "" when the whole text fits."""
    if size(text) <= limit:
        return text, ""
    end = _fitting(text, limit, size)
    head = text[:end]
    for sep in ("\n", " "):
        cut = head.rfind(sep)
        if cut > end // 2 and head[:cut].rstrip(sep):
            return head[:cut].rstrip(sep), text[cut:].lstrip(sep)
    return head, text[end:]


def split_text(text: str, limit: int, size: Callable[[str], int] = len) -> list[str]:
    """Text a platform would refuse as too long, in parts of at most `limit` by `size`,
    cut as `cut_text` cuts (line breaks, else spaces, else whole grapheme clusters)."""
    parts: list[str] = []
    while True:
        head, text = cut_text(text, limit, size)
        parts.append(head)
        if not text:
            return parts


class SentParts:
    """How many parts of a split message a channel has sent, by `Delivery.id`: when a part
    fails and the outbox retries the delivery, only the parts not yet sent go out again.
    The platform's id of the first part is kept with the count, for a channel whose row
    must carry it. Kept in memory: after a crash the whole message is sent again
    (at-least-once)."""

    def __init__(self, cap: int = 10_000) -> None:
        self.cap = cap
        self._sent: dict[int, tuple[int, str]] = {}

    def first_unsent(self, delivery_id: int) -> int:
        return self._sent.get(delivery_id, (0, ""))[0]

    def first_id(self, delivery_id: int) -> str:
        """The platform id `sent` was given with the first part ("" if none)."""
        return self._sent.get(delivery_id, (0, ""))[1]

    def sent(self, delivery_id: int, count: int, platform_id: str = "") -> None:
        if len(self._sent) >= self.cap:  # rows that failed for good never come back
            self._sent.clear()
        first = self._sent.get(delivery_id, (0, platform_id))[1] if count > 1 else platform_id
        self._sent[delivery_id] = (count, first)

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
