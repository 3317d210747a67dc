"""The flow model: frozen blocks with labelled edges, as parsed from the config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = Any

FLOW_TARGET_PREFIX = "flow:"  # a jump's `flow = "x"` becomes the edge target "flow:x"


@dataclass(frozen=True)
class Block:
    id: str

    def edges(self) -> list[tuple[str, str | None]]:
        """(label, target block id or None for "end of flow") for every way out."""
        return []


@dataclass(frozen=True)
class MessageBlock(Block):
    text: str = ""
    image: str = ""  # URL (a template) of a picture sent with the text as caption
    document: str = ""  # URL (a template) of a file sent the same way
    next: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        return [("next", self.next)]


@dataclass(frozen=True)
class InputBlock(Block):
    text: str = ""
    image: str = ""  # URL (a template) of a picture sent with the text as caption
    document: str = ""  # URL (a template) of a file sent the same way
    variable: str = ""
    validation: str = "text"  # text | number | email | phone | regex | media
    pattern: str = ""
    retry_message: str = ""
    next: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        return [(f"{{{{{self.variable}}}}}", self.next)]


@dataclass(frozen=True)
class Choice:
    label: str
    next: str | None
    value: str  # stored in the variable; defaults to the label


@dataclass(frozen=True)
class ButtonsBlock(Block):
    text: str = ""
    image: str = ""  # URL (a template) of a picture sent with the text as caption
    document: str = ""  # URL (a template) of a file sent the same way
    variable: str = ""
    choices: tuple[Choice, ...] = ()
    retry_message: str = ""

    def edges(self) -> list[tuple[str, str | None]]:
        return [(c.label, c.next) for c in self.choices]


@dataclass(frozen=True)
class Rule:
    variable: str
    op: str
    value: str
    next: str | None

    def describe(self) -> str:
        if self.op in ("is_empty", "is_not_empty"):
            return f"{self.variable} {self.op}"
        return f"{self.variable} {self.op} {self.value}"


@dataclass(frozen=True)
class ConditionBlock(Block):
    rules: tuple[Rule, ...] = ()
    else_: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        return [(r.describe(), r.next) for r in self.rules] + [("else", self.else_)]


@dataclass(frozen=True)
class SetBlock(Block):
    variable: str = ""
    value: str = ""
    next: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        return [("next", self.next)]


@dataclass(frozen=True)
class HttpBlock(Block):
    method: str = "GET"
    url: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: JSON = None
    timeout: float = 10.0
    map: tuple[tuple[str, str], ...] = ()  # (variable, dotted path in the response JSON)
    status_variable: str = ""
    on_success: str | None = None
    on_failure: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        return [("success", self.on_success), ("failure", self.on_failure)]


@dataclass(frozen=True)
class DelayBlock(Block):
    seconds: float = 1.0
    next: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        return [(f"after {self.seconds:g}s", self.next)]


@dataclass(frozen=True)
class JumpBlock(Block):
    target: str = ""  # a block id, or "flow:NAME" for another flow's start

    def edges(self) -> list[tuple[str, str | None]]:
        return [("jump", self.target)]


@dataclass(frozen=True)
class EndBlock(Block):
    text: str = ""


@dataclass(frozen=True)
class WebViewBlock(Block):
    url: str = ""
    text: str = ""
    button: str = "Open"
    input_variables: tuple[str, ...] = ()
    blocking: bool = True
    expiration: float = 0.0
    pending_message: str = ""
    response_variable: str = ""
    verify: str = ""  # "" or "telegram"
    on_success: str | None = None
    on_error: str | None = None
    on_expired: str | None = None
    next: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        if self.blocking:
            return [
                ("success", self.on_success),
                ("error", self.on_error),
                ("expired", self.on_expired),
            ]
        return [("next", self.next)]


@dataclass(frozen=True)
class WebhookBlock(Block):
    text: str = ""
    timeout: float = 60.0
    map: tuple[tuple[str, str], ...] = ()
    save_payload_to: str = ""
    pending_message: str = ""
    secret_env: str = ""  # a Standard Webhooks secret's variable
    provider: str = ""  # or a [webhooks.providers.NAME] profile: how the calls are signed
    on_success: str | None = None
    on_failure: str | None = None

    def edges(self) -> list[tuple[str, str | None]]:
        return [("success", self.on_success), ("failure", self.on_failure)]


@dataclass(frozen=True)
class Flow:
    name: str
    start: str
    blocks: dict[str, Block] = field(default_factory=dict)
    error_message: str = ""  # for an event refused in this flow; "" = bot.error_message


def wait_kind(block: Block) -> str:
    """The kind of wait row (bot.state.Wait.kind) this block writes; "" for a block that
    writes none (a question waits for the user, with no row)."""
    return _WAIT_KINDS.get(type(block), "")


_WAIT_KINDS: dict[type[Block], str] = {
    WebViewBlock: "webview", WebhookBlock: "webhook", DelayBlock: "delay", HttpBlock: "http"}
WAIT_KINDS: tuple[str, ...] = tuple(_WAIT_KINDS.values())
"""Every kind of wait row, in the order /metrics lists them."""


def live_blocks(flows: Mapping[str, Flow]) -> list[tuple[str, str, str]]:
    """(flow, block id, wait kind) of every block a config has: what a stored conversation
    or wait may point at (anything else is stranded, see storage/stranded.py)."""
    return [(f.name, b.id, wait_kind(b)) for f in flows.values() for b in f.blocks.values()]


BLOCK_TYPES: dict[str, type[Block]] = {
    "message": MessageBlock,
    "input": InputBlock,
    "buttons": ButtonsBlock,
    "condition": ConditionBlock,
    "set": SetBlock,
    "http": HttpBlock,
    "delay": DelayBlock,
    "jump": JumpBlock,
    "end": EndBlock,
    "webview": WebViewBlock,
    "webhook": WebhookBlock,
}
