"""The domain types the engine, the store and the channels exchange: what a user did
(`Inbound`), what the bot says (`Message` with its `Button`s and `Link`), and a committed
message handed to a channel (`Delivery`). Defined in bot/, so the engine and the stores
depend on no channel; channels/base.py re-exports them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


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
class Media:
    """A file sent with a message, by URL: `kind` "image" or "document"."""

    kind: str
    url: str


@dataclass(frozen=True)
class Message:
    """One outgoing message. `text` is plain text: channels escape it for their markup.
    With `media`, the text is the file's caption where the platform has captions."""

    text: str
    buttons: tuple[Button, ...] = ()
    link: Link | None = None
    media: Media | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {"text": self.text}
        if self.buttons:
            doc["buttons"] = [[b.label, b.payload] for b in self.buttons]
        if self.link is not None:
            doc["link"] = [self.link.url, self.link.label, self.link.web_app]
        if self.media is not None:
            doc["media"] = [self.media.kind, self.media.url]
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))

    def without_media(self) -> Message:
        """This message as text only, its file's URL appended to the text: what goes when
        the platform could not send the file, so the text and the choices still reach the
        user (a question whose buttons never arrive leaves a flow stuck)."""
        if self.media is None:
            return self
        text = "\n\n".join(t for t in (self.text, self.media.url) if t)
        return replace(self, text=text, media=None)

    @classmethod
    def from_json(cls, raw: str) -> Message:
        doc = json.loads(raw)
        link, media = doc.get("link"), doc.get("media")
        return cls(
            text=doc["text"],
            buttons=tuple(Button(label, payload) for label, payload in doc.get("buttons", ())),
            link=Link(link[0], link[1], bool(link[2])) if link else None,
            media=Media(media[0], media[1]) if media else None,
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


MEDIA_VARIABLES = ("media_type", "media_id", "media_content_type", "media_file_name",
                   "latitude", "longitude", "contact_phone", "contact_name")
"""What a channel tells a flow about an attachment, named the same on every channel:
`media_type` photo | document | voice | audio | video | location | contact (else ""),
`media_id` the file (Telegram's file_id, Twilio's MediaUrl), `media_content_type` and
`media_file_name` where the platform says, `latitude` / `longitude` of a location,
`contact_phone` / `contact_name` of a shared contact. The caption is the message text."""


FILE_MEDIA_TYPES = frozenset({"photo", "document", "voice", "audio", "video"})
"""The `media_type`s that are files, which an input block with `validation = "media"` takes
(a location or a contact is not a file: the question is asked again)."""


def media_variables(**found: str) -> dict[str, str]:
    """Every one of MEDIA_VARIABLES, "" where the message has none: one message's
    attachment never lingers into the next message's variables."""
    unknown = set(found) - set(MEDIA_VARIABLES)
    if unknown:
        raise ValueError(f"not media variables: {sorted(unknown)}")
    return {name: found.get(name, "") for name in MEDIA_VARIABLES}
