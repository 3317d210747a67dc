"""What every channel speaks: inbound events, outgoing messages, the channel protocol."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aiohttp import web


@dataclass(frozen=True)
class Button:
    """A choice shown to the user; `payload` comes back in `Inbound.payload` when pressed.

    Payloads are short ASCII (at most 40 bytes), so they fit Telegram's 64-byte
    callback_data and Twilio's quick-reply ids whatever the labels are.
    """

    label: str
    payload: str


@dataclass(frozen=True)
class Link:
    """A button that opens a web page (the WebView block)."""

    url: str
    label: str
    web_app: bool = False  # Telegram: open as a Mini App instead of a browser link


@dataclass(frozen=True)
class Message:
    """One outgoing message. `text` is plain text: channels escape it for their markup."""

    text: str
    buttons: tuple[Button, ...] = ()
    link: Link | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {"text": self.text}
        if self.buttons:
            doc["buttons"] = [[b.label, b.payload] for b in self.buttons]
        if self.link is not None:
            doc["link"] = [self.link.url, self.link.label, self.link.web_app]
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Message:
        doc = json.loads(raw)
        link = doc.get("link")
        return cls(
            text=doc["text"],
            buttons=tuple(Button(label, payload) for label, payload in doc.get("buttons", ())),
            link=Link(link[0], link[1], bool(link[2])) if link else None,
        )


@dataclass(frozen=True)
class Delivery:
    """A committed outbox row handed to a channel: deliver `message` to `user_id`."""

    id: int
    conversation_id: int
    user_id: str
    message: Message


@dataclass(frozen=True)
class Inbound:
    """Something a user did, translated from a platform payload. No decisions made yet."""

    channel: str
    user_id: str  # the address replies go to: Telegram chat id, "whatsapp:+…", web session id
    text: str = ""
    payload: str | None = None  # the `Button.payload` of a pressed button
    user_name: str = ""
    event_id: str | None = None  # platform id for dedupe, e.g. "telegram:123456"
    variables: Mapping[str, str] = field(default_factory=dict)  # extra flow variables (media)


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
