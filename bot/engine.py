"""The flow engine: conversation state + event → new state, messages and waits. No I/O."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bot import patterns
from bot.config import BotConfig
from bot.errors import VariableTooLarge
from bot.flow import (
    FLOW_TARGET_PREFIX,
    Block,
    ButtonsBlock,
    Choice,
    ConditionBlock,
    DelayBlock,
    EndBlock,
    Flow,
    HttpBlock,
    InputBlock,
    JumpBlock,
    MessageBlock,
    Rule,
    SetBlock,
    WebhookBlock,
    WebViewBlock,
)
from bot.messages import FILE_MEDIA_TYPES, Button, Inbound, Link, Media, Message
from bot.state import Conversation, Step, Wait
from bot.template import (
    UNSENDABLE_HEADER,
    as_text,
    json_size,
    lookup,
    render,
    render_file_url,
    render_json,
    render_request_url,
    render_url,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Links:
    """Public URLs the engine puts into messages and variables."""

    public_url: str  # base for relative WebView URLs, e.g. "http://127.0.0.1:8080"
    webhook_url: str  # `POST /webhook`; a conversation's own URL is this + "/" + its key


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE = re.compile(r"^\+?\d{6,15}$")
_LINK = re.compile(r"https?://[^\s/$.?#][^\s]*", re.IGNORECASE)


def button_tag(flow: str, block: str) -> str:
    """Short tag that ties a button press to the block that showed it (stale presses re-ask)."""
    return hashlib.blake2s(f"{flow}/{block}".encode(), digest_size=4).hexdigest()


def webview_link(base_url: str, template: str, variables: Mapping[str, Any],
                 execution_id: str, inputs: tuple[str, ...]) -> str:
    """The WebView URL: executionId and input variables added as query parameters."""
    url = render_url(template, variables)
    if url.startswith("/"):
        url = base_url.rstrip("/") + url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.append(("executionId", execution_id))
    query.extend((name, as_text(lookup(variables, name))) for name in inputs)
    return urlunsplit(parts._replace(query=urlencode(query)))


class Engine:
    def __init__(
        self,
        flows: Mapping[str, Flow],
        bot: BotConfig,
        links: Links,
        new_id: Callable[[], str],
    ) -> None:
        self.flows = flows
        self.bot = bot
        self.links = links
        self.new_id = new_id
        self._restart_words = {w.casefold() for w in bot.restart_words}

    # -- entry points ---------------------------------------------------------------------

    def on_message(self, conv: Conversation, event: Inbound, now: float) -> Step:
        """What a user wrote or pressed. Raises VariableTooLarge when it would take a
        variable or the conversation past its limit (then `conv` is half-changed: the
        caller throws it away and keeps what it had)."""
        before = dict(conv.variables)
        step = self._on_message(conv, event, now)
        self._check_total(conv, before)
        return step

    def _on_message(self, conv: Conversation, event: Inbound, now: float) -> Step:
        step = Step()
        v = conv.variables
        for name, value in event.variables.items():
            self._set(conv, name, value)
        v.update(channel=conv.channel, user_id=conv.user_id, conversation_key=conv.key,
                 webhook_url=f"{self.links.webhook_url}/{conv.key}")
        if event.user_name:
            self._set(conv, "user_name", event.user_name)
        v.setdefault("user_name", "")
        self._set(conv, "last_message", event.text)

        restart = self._restart(event.text)
        if restart is not None or conv.block is None:
            # a deep link starts a conversation with "/start <payload>" whatever the
            # restart words are: a new user's referral must not be lost
            payload = restart if restart is not None else _start_argument(event.text)
            self._set(conv, "start_payload", payload)
            if conv.wait_id is not None:
                step.cancelled_wait = conv.wait_id
                conv.wait_id = None
            conv.flow = self.bot.start_flow
            self._run(conv, self.flows[conv.flow].start, step, now)
            return step

        block = self._block(conv)
        if block is None:  # the flow it stood in is gone from the config
            conv.flow = self.bot.start_flow
            self._run(conv, self.flows[conv.flow].start, step, now)
        elif conv.wait_id is not None:
            pending = getattr(block, "pending_message", "") or self.bot.default_pending_message
            step.messages.append(Message(render(pending, v)))
        elif isinstance(block, InputBlock):
            self._answer_input(conv, block, event, step, now)
        elif isinstance(block, ButtonsBlock):
            self._answer_buttons(conv, block, event, step, now)
        else:
            self._run(conv, block.id, step, now)
        return step

    def relocate(self, conv: Conversation, now: float) -> Step:
        """Move a conversation whose block is gone from the config (see storage/stranded.py)
        to the start of `bot.stranded_flow`, telling the user `bot.stranded_message` first.
        Its variables stay; the caller ends its open wait."""
        step = Step()
        before = dict(conv.variables)
        conv.wait_id = None
        step.messages.append(Message(render(self.bot.stranded_message, conv.variables)))
        conv.flow = self.bot.stranded_target
        self._run(conv, self.flows[conv.flow].start, step, now)
        self._check_total(conv, before)
        return step

    def restarts(self, text: str) -> bool:
        """Whether `text` is one of `bot.restart_words` (alone, or a command with
        arguments such as Telegram's "/start <payload>")."""
        return self._restart(text) is not None

    def _restart(self, text: str) -> str | None:
        """None unless `text` is a restart word; else what followed it when it was a
        command with arguments, like Telegram's deep link "/start <payload>"
        (t.me/<bot>?start=<payload>), or "" when it stood alone."""
        words = text.strip()
        if words.casefold() in self._restart_words:
            return ""
        command, *rest = words.split(maxsplit=1) if words else ("",)
        if command.startswith("/") and command.casefold() in self._restart_words and rest:
            return rest[0]
        return None

    def on_wait(self, conv: Conversation, wait: Wait, outcome: str, data: Any, now: float) -> Step:
        """A wait was resolved (callback, webhook, timer). The store made sure only once.
        Raises VariableTooLarge as `on_message` does."""
        before = dict(conv.variables)
        step = self._on_wait(conv, wait, outcome, data, now)
        self._check_total(conv, before)
        return step

    def _on_wait(self, conv: Conversation, wait: Wait, outcome: str, data: Any,
                 now: float) -> Step:
        step = Step()
        flow = self.flows.get(wait.flow)
        block = flow.blocks.get(wait.block) if flow else None
        if block is None:
            log.error("wait %s… points at %s/%s, which the config no longer has",
                      wait.id[:6], wait.flow, wait.block)
            return step
        if isinstance(block, WebViewBlock) and block.response_variable and outcome != "expired":
            self._set(conv, block.response_variable, data if data is not None else {})
        if not wait.blocking or conv.wait_id != wait.id:
            return step  # non-blocking WebView: only the data is kept
        conv.wait_id = None
        target = self._after_wait(conv, block, outcome, data)
        conv.flow = wait.flow
        self._run(conv, target, step, now)
        return step

    # -- variables and their limits --------------------------------------------------------

    def _set(self, conv: Conversation, name: str, value: Any) -> None:
        """Assign a variable, unless it would pass `bot.max_variable_bytes` (checked at every
        assignment, so a `set` that doubles a value in a loop stops at the limit, not at
        MemoryError)."""
        size = json_size(value)
        if size > self.bot.max_variable_bytes:
            raise VariableTooLarge(name, size, self.bot.max_variable_bytes, "variable",
                                   conv.flow, conv.block or "")
        conv.variables[name] = value

    def _check_total(self, conv: Conversation, before: Mapping[str, Any]) -> None:
        """All of a conversation's variables together within `bot.max_conversation_bytes`,
        or at least not larger than `before` the event (a limit lowered since must not
        lock in a conversation that is already past it)."""
        limit = self.bot.max_conversation_bytes
        total = json_size(conv.variables)
        if total > limit and total > json_size(before):
            largest = max(conv.variables, key=lambda k: json_size(conv.variables[k]))
            raise VariableTooLarge(largest, total, limit, "conversation", conv.flow,
                                   conv.block or "")

    # -- answers to a question ------------------------------------------------------------

    def _answer_input(self, conv: Conversation, block: InputBlock, event: Inbound,
                      step: Step, now: float) -> None:
        if block.validation == "media":
            value = _media_answer(event)
        else:
            value = self._validate(conv.flow, block, event.text.strip())
        if value is None:
            retry = block.retry_message or (
                "Please send a photo, a file or a link." if block.validation == "media"
                else f"Sorry, that is not a valid {block.validation}.")
            step.messages.append(Message(render(retry, conv.variables)))
            step.messages.append(Message(render(block.text, conv.variables)))
            return
        self._set(conv, block.variable, value)
        self._run(conv, block.next, step, now)

    def _validate(self, flow: str, block: InputBlock, text: str) -> Any:
        if not text:
            return None
        if block.validation == "number":
            try:
                number = float(text.replace(",", "."))
            except ValueError:
                return None
            return int(number) if number.is_integer() and "." not in text else number
        if block.validation == "email":
            return text if _EMAIL.match(text) else None
        if block.validation == "phone":
            compact = re.sub(r"[\s().-]", "", text)
            return compact if _PHONE.match(compact) else None
        if block.validation == "regex":
            place = f"flows.{flow}.blocks.{block.id}.pattern"
            found = patterns.matches(block.pattern, text, whole=True,
                                     timeout=self.bot.regex_timeout, place=place)
            return text if found else None
        return text

    def _answer_buttons(self, conv: Conversation, block: ButtonsBlock, event: Inbound,
                        step: Step, now: float) -> None:
        choice = self._pick(conv, block, event)
        if choice is None:
            retry = block.retry_message or "Please choose one of the options."
            step.messages.append(Message(render(retry, conv.variables)))
            step.messages.append(self._buttons_message(conv, block))
            return
        if block.variable:
            self._set(conv, block.variable, choice.value)
        self._set(conv, "last_message", choice.label)
        self._run(conv, choice.next, step, now)

    @staticmethod
    def _pick(conv: Conversation, block: ButtonsBlock, event: Inbound) -> Choice | None:
        if event.payload is not None:
            tag, _, index = event.payload.partition(":")
            if tag == button_tag(conv.flow, block.id) and index.isdigit():
                i = int(index)
                return block.choices[i] if i < len(block.choices) else None
            return None  # a button from an older question
        text = event.text.strip().casefold()
        for i, choice in enumerate(block.choices):
            if text in (choice.label.casefold(), str(i + 1)):
                return choice
        return None

    def _buttons_message(self, conv: Conversation, block: ButtonsBlock) -> Message:
        tag = button_tag(conv.flow, block.id)
        return Message(
            render(block.text, conv.variables),
            buttons=tuple(Button(c.label, f"{tag}:{i}") for i, c in enumerate(block.choices)),
            media=_media(block, conv.variables),
        )

    # -- resolved waits -------------------------------------------------------------------

    def _after_wait(self, conv: Conversation, block: Block, outcome: str, data: Any) -> str | None:
        if isinstance(block, WebViewBlock):
            return {"success": block.on_success, "error": block.on_error}.get(
                outcome, block.on_expired)
        if isinstance(block, WebhookBlock):
            if outcome != "success":
                return block.on_failure
            for var, path in block.map:
                found = lookup(data, path)
                self._set(conv, var, "" if found is None else found)
            if block.save_payload_to:
                self._set(conv, block.save_payload_to, data)
            return block.on_success
        if isinstance(block, HttpBlock):
            data = data if isinstance(data, dict) else {}
            status = data.get("status")
            if block.status_variable:
                self._set(conv, block.status_variable, status if status is not None else 0)
            if outcome != "success":
                return block.on_failure
            for var, path in block.map:
                found = lookup(data.get("body"), path)
                self._set(conv, var, "" if found is None else found)
            return block.on_success
        if isinstance(block, DelayBlock):
            return block.next
        return None

    # -- running blocks until someone has to answer ---------------------------------------

    def _block(self, conv: Conversation) -> Block | None:
        flow = self.flows.get(conv.flow)
        return flow.blocks.get(conv.block) if flow and conv.block else None

    def _run(self, conv: Conversation, block_id: str | None, step: Step, now: float) -> None:
        for _ in range(self.bot.max_steps):
            if block_id is None:
                conv.block = None
                return
            if block_id.startswith(FLOW_TARGET_PREFIX):
                conv.flow = block_id.removeprefix(FLOW_TARGET_PREFIX)
                block_id = self.flows[conv.flow].start
            block = self.flows[conv.flow].blocks[block_id]
            conv.block = block_id
            block_id = self._execute(conv, block, step, now)
            if block_id == _STAY:
                return
        log.error("conversation %s ran %d blocks without waiting for anyone in flow %r "
                  "(a loop?); stopped it at %r", conv.id, self.bot.max_steps, conv.flow,
                  block_id)
        conv.block = None

    def _execute(self, conv: Conversation, block: Block, step: Step, now: float) -> str | None:
        """Run one block; return the next block id, or _STAY when it waits here."""
        v = conv.variables
        say = step.messages.append
        if isinstance(block, MessageBlock):
            say(Message(render(block.text, v), media=_media(block, v)))
            return block.next
        if isinstance(block, InputBlock):
            say(Message(render(block.text, v), media=_media(block, v)))
            return _STAY
        if isinstance(block, ButtonsBlock):
            say(self._buttons_message(conv, block))
            return _STAY
        if isinstance(block, ConditionBlock):
            place = f"flows.{conv.flow}.blocks.{block.id}.rules"
            return next((r.next for i, r in enumerate(block.rules)
                         if _holds(r, v, self.bot.regex_timeout, f"{place}.{i}.value")),
                        block.else_)
        if isinstance(block, SetBlock):
            self._set(conv, block.variable, render_json(block.value, v))
            return block.next
        if isinstance(block, JumpBlock):
            return block.target
        if isinstance(block, EndBlock):
            if block.text:
                say(Message(render(block.text, v)))
            return None
        if isinstance(block, DelayBlock):
            if block.seconds <= 0:
                return block.next
            self._wait(conv, block, "delay", now + block.seconds, step)
            return _STAY
        if isinstance(block, HttpBlock):
            headers = {k: render(h, v) for k, h in block.headers}
            unsendable = [k for k, h in headers.items() if UNSENDABLE_HEADER.search(h)]
            if unsendable:  # no request at all: on_failure now, not after the backstop
                log.warning("http block %s/%s: header %r can't be sent: a variable put a line "
                            "break or control character in it; took on_failure without "
                            "sending the request", conv.flow, block.id, unsendable[0])
                if block.status_variable:
                    self._set(conv, block.status_variable, 0)
                return block.on_failure
            request = {
                "method": block.method,
                "url": render_request_url(block.url, v),
                "headers": headers,
                "body": render_json(block.body, v),
                "timeout": block.timeout,
            }
            # the deadline is a backstop: a request lost in a crash ends in on_failure
            self._wait(conv, block, "http", now + block.timeout + 5, step, request)
            return _STAY
        if isinstance(block, WebViewBlock):
            wid = self.new_id()
            url = webview_link(self.links.public_url, block.url, v, wid, block.input_variables)
            step.waits.append(Wait(wid, "webview", conv.flow, block.id,
                                   now + block.expiration, block.blocking))
            say(Message(render(block.text, v), link=Link(url, render(block.button, v),
                                                         web_app=block.verify == "telegram")))
            if not block.blocking:
                return block.next
            conv.wait_id = wid
            return _STAY
        if isinstance(block, WebhookBlock):
            if block.text:
                say(Message(render(block.text, v)))
            self._wait(conv, block, "webhook", now + block.timeout, step)
            return _STAY
        raise AssertionError(f"unhandled block type {type(block).__name__}")

    def _wait(self, conv: Conversation, block: Block, kind: str, deadline: float, step: Step,
              request: Mapping[str, Any] | None = None) -> None:
        wait = Wait(self.new_id(), kind, conv.flow, block.id, deadline, True, request)
        step.waits.append(wait)
        conv.wait_id = wait.id


def _start_argument(text: str) -> str:
    """What follows "/start" in Telegram's deep link message "/start <payload>"
    (t.me/<bot>?start=<payload>); "" for any other text."""
    command, *rest = text.split(maxsplit=1) if text.strip() else ("",)
    return rest[0] if command.casefold() == "/start" and rest else ""


def _media(block: MessageBlock | InputBlock | ButtonsBlock,
           variables: Mapping[str, Any]) -> Media | None:
    """The file a block sends with its text, its URL rendered; None without one, or when
    the URL came out empty or is no http(s) URL (a variable not set): the text goes alone."""
    kind, template = ("image", block.image) if block.image else ("document", block.document)
    if not template:
        return None
    url = render_file_url(template, variables)
    if not url:
        log.warning("%s.%s: its %s URL %r came out as no http(s) URL; the text goes without "
                    "it", block.id, kind, kind, template[:60])
        return None
    return Media(kind, url)


def _media_answer(event: Inbound) -> str | None:
    """What an input block with `validation = "media"` keeps: a file's id (Telegram
    file_id, WhatsApp media URL) when the message carries a photo, document, voice note,
    audio or video, or a link the user typed (the web chat carries links). A location or a
    contact is no file: None, so the question is asked again."""
    media_id = event.variables.get("media_id", "")
    if media_id and event.variables.get("media_type") in FILE_MEDIA_TYPES:
        return media_id
    text = event.text.strip()
    return text if _LINK.fullmatch(text) else None


_STAY = "\0stay"  # sentinel next-block id: the conversation waits at this block


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _holds(rule: Rule, variables: Mapping[str, Any], regex_timeout: float, place: str) -> bool:
    value = as_text(lookup(variables, rule.variable)).strip()
    other = render(rule.value, variables).strip()
    op = rule.op
    if op == "equals":
        return value.casefold() == other.casefold()
    if op == "not_equals":
        return value.casefold() != other.casefold()
    if op == "contains":
        return other.casefold() in value.casefold()
    if op == "not_contains":
        return other.casefold() not in value.casefold()
    if op == "is_empty":
        return value == ""
    if op == "is_not_empty":
        return value != ""
    if op == "matches":
        return patterns.matches(rule.value, value, whole=False, timeout=regex_timeout,
                                place=place)
    a, b = _number(value), _number(other)
    if a is None or b is None:
        return False
    return a > b if op == "greater_than" else a < b
