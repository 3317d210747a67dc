"""What runs inside a database transaction: the store, plus the engine that decides each
transition. `Ledger` is a mixin over the storage contract (bot/store.py): each backend
makes it concrete (`storage.store.SQLiteLedger`), so `self.claim(…)` is one plain method
call into that backend. The database worker calls these methods as jobs (`Ledger.webview_callback(
ledger, …)`), in the server's process or in the database process; every argument and
answer is plain data, so a job can cross the process boundary, and `now` comes from the
caller, so the database side needs no clock of its own."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from bot.config import Config
from bot.engine import Engine, Links
from bot.errors import ApiError, Conflict, Gone, NotFound, TooMany, VariableTooLarge
from bot.flow import Block, WebhookBlock, WebViewBlock, live_blocks, wait_kind
from bot.messages import Inbound, Message
from bot.state import TIMEOUT_OUTCOME, Conversation, EarlyWebhook, Step, Wait
from bot.store import Store
from bot.stranded import CHECKED_BLOCKS, REMOVED, Stranded, fingerprint
from bot.template import render
from bot.webhook_config import SignatureScheme, block_scheme, webhook_blocks

log = logging.getLogger(__name__)

FIRE_BATCH = 500
TOO_LARGE = "too_large"  # Outcome.state of an event refused for a variable's size
STRANDED_BATCH = 200
STRANDED_SPAN = 10_000  # rows a job of the stranded scan reads: ~20 ms on SQLite
GONE_WEBHOOK = ("This conversation no longer waits for this call: the Webhook block it waited "
                "at was removed from the flow, and the user was moved on. Nothing was applied.")
NOT_WAITING = ("This conversation is not waiting at a Webhook block (its wait already got its "
               "call, timed out, or has not started), so this call was refused and nothing "
               "was kept: a later wait will not take it. Stop retrying this call.")


def refusal(exc: VariableTooLarge) -> str:
    """The sentence a caller (a WebView page, a third party) gets for a refused event."""
    if exc.scope == "variable":
        return (f"This data would make the flow variable '{exc.variable}' {exc.size} bytes; "
                f"this bot keeps at most {exc.limit} bytes per variable. Nothing was changed: "
                "send less data.")
    return (f"This data would make the conversation's variables {exc.size} bytes (the "
            f"largest is '{exc.variable}'); this bot keeps at most {exc.limit} bytes per "
            "conversation. Nothing was changed: send less data.")


def new_token() -> str:
    """~144 random bits, URL-safe (24 characters): executionIds, wait ids and conversation
    keys. Never starts with "-": a command line would take it for an option (`flowbot
    conversation -Ab3…` failed for one key in 64)."""
    token = secrets.token_urlsafe(18)
    return "_" + token[1:] if token.startswith("-") else token


class WebViewCheck(Protocol):
    """Raises an ApiError when a callback may not resolve this wait (e.g. Telegram initData).
    Must pickle: the database process runs it."""

    def __call__(self, block: WebViewBlock, conv: Conversation, proof: Mapping[str, Any],
                 now: float) -> None: ...


class Signature(Protocol):
    """Checks a webhook's signature once the block (and so its scheme) is known: returns
    the message id (None: none, or the block takes unsigned calls) or raises 401. Must
    pickle: the database process runs it (bot.signatures.SignedBody)."""

    def verify(self, scheme: SignatureScheme | None, now: float) -> str | None: ...

    def verify_any(self, schemes: Sequence[SignatureScheme | None], now: float
                   ) -> tuple[list[str], str | None]:
        """For an early call: the names of the schemes it passes ("" for an unsigned
        block) and its message id; raises 401 when it passes none."""
        ...


@dataclass
class Outcome:
    """What a job found and did; the runtime turns it into an answer after the commit. Only
    what the event loop needs: the messages themselves stay in the outbox table."""

    state: str  # the wait's final state ("" for an inbound message)
    won: bool  # this caller made the transition
    messages: int = 0  # outbox rows the transition wrote
    waits: list[Wait] = field(default_factory=list)  # new waits: the timer, http requests
    wake_at: float | None = None  # an early webhook kept until then: the timer drops it
    early_applied: int = 0  # early webhooks a Webhook block took as it started
    # for the operator's log and the metrics (bot/logs.py, bot/metrics.py):
    conversation: int = 0  # the conversation's row id (0: none)
    channel: str = ""
    user: str = ""  # the user's id on that channel
    came_from: str | None = None  # the block it stood at before, None at the start
    went_to: str | None = None  # the block it stands at now, None when the flow ended
    resolved: Wait | None = None  # the wait this transition ended (kind, block, deadline)
    cancelled: str = ""  # the kind of a wait a restart word cancelled
    cancelled_id: str = ""  # and its id
    removed: str = ""  # the kind of a wait this job ended because its block is gone
    removed_id: str = ""  # and its id
    refused: str = ""  # why the event was refused (state TOO_LARGE): a sentence for the caller

    @classmethod
    def of(cls, state: str, step: Step, conv: Conversation | None = None,
           came_from: str | None = None, resolved: Wait | None = None,
           cancelled: str = "") -> Outcome:
        if conv is None:
            return cls(state, True, len(step.messages), list(step.waits), resolved=resolved)
        return cls(state, True, len(step.messages), list(step.waits), conversation=conv.id,
                   channel=conv.channel, user=conv.user_id, came_from=came_from,
                   went_to=conv.block, resolved=resolved, cancelled=cancelled,
                   cancelled_id=step.cancelled_wait or "")


@dataclass(frozen=True)
class FirePass:
    """One timer pass: the transitions it made, whether more are due, the next deadline."""

    results: list[Outcome]
    more: bool
    errors: list[Exception]
    next_deadline: float | None
    dropped: list[EarlyWebhook] = field(default_factory=list)  # early webhooks past window


@dataclass(frozen=True)
class StrandedPass:
    """One job of the stranded scan: what it found and moved (or ended), and the cursor of
    the next job (None: the scan is done). `checked`: the database had been checked against
    this config's blocks already (nothing was read), or this job finished a clean check."""

    found: list[Stranded]
    results: list[Outcome]
    cursor: tuple[int, str] | None
    errors: list[Exception]
    checked: bool = False


class Ledger(Store):
    """The jobs that run the engine inside a transaction. Abstract: a backend's subclass
    also inherits that backend's store and calls both `__init__`s."""

    def __init__(self, config: Config,
                 checks: Mapping[str, WebViewCheck] | None = None) -> None:
        self.config = config
        self.checks = checks if checks is not None else {}
        server = config.server
        self.engine = Engine(
            config.flows, config.bot,
            Links(public_url=server.public_url + server.path_prefix,
                  webhook_url=server.url("/webhook")),
            new_token,
        )
        # what an early call may have to satisfy: the scheme of every Webhook block
        # (None: some block takes unsigned calls)
        schemes = {(s.name if s else None): s for s in
                   (block_scheme(config.webhooks, b) for _, b in webhook_blocks(config.flows))}
        self.early_schemes: list[SignatureScheme | None] = list(schemes.values())

    # -- jobs ---------------------------------------------------------------------------

    def inbound(self, event: Inbound, now: float) -> Outcome | None:
        """What a user did; None when the platform redelivered an event we had."""
        now = self.transaction_time(now)
        if event.event_id is not None and not self.record_event(event.event_id, now):
            return None
        conv = self.conversation(event.channel, event.user_id, new_token(), now)
        try:
            stranded = self._is_stranded(conv)
            # its block is gone: what it wrote was meant for it, so it is moved and told,
            # unless it was a restart word: that restarts, as it does anywhere
            if stranded and not self.engine.restarts(event.text):
                with self.savepoint():  # (ending its wait too, if the move is refused)
                    return self._relocate(conv, now)
            # a stranded wait's kind is in its row, not in the config (its block is gone)
            held = self.wait(conv.wait_id) if stranded and conv.wait_id is not None else None
            came_from, came_from_flow = conv.block, conv.flow
            step = self.engine.on_message(conv, event, now)
        except VariableTooLarge as exc:
            return self._refuse(conv.id, exc, now)
        cancelled = ""
        if step.cancelled_wait and stranded:
            cancelled = held.kind if held is not None and held.state == "pending" else ""
        elif step.cancelled_wait:
            flow = self.config.flows.get(came_from_flow)
            block = flow.blocks.get(came_from or "") if flow else None
            cancelled = wait_kind(block) if block is not None else ""
        return self._save(conv, step, "", now, came_from, cancelled=cancelled)

    def webview_callback(self, execution_id: str, success: bool, data: Any,
                         proof: Mapping[str, Any] | None, now: float) -> Outcome | None:
        """None: no WebView wait has this id."""
        now = self.transaction_time(now)
        wait = self.wait(execution_id)
        if wait is None or wait.kind != "webview":
            return None
        if wait.state != "pending":
            return Outcome(wait.state, False, conversation=wait.conversation_id)
        conv = self.conversation_by_id(wait.conversation_id)  # locks it: before the wait
        block = self._live_block(wait)
        if block is None:
            return self._strand_wait(wait, conv, now)
        if isinstance(block, WebViewBlock) and block.verify:
            check = self.checks.get(block.verify)
            if check is None or conv is None:
                raise Conflict("verify_unavailable",
                               f"This WebView needs {block.verify} verification, "
                               "but that channel is not enabled on this server.")
            check(block, conv, proof or {}, now)
        moved = self._move_first(conv, wait, now)
        try:
            return _after(moved, self._resolve(wait, conv, "success" if success else "error",
                                               data, now, refusable=True))
        except VariableTooLarge as exc:  # the claim was undone: the wait stays pending
            return _after(moved, self._refuse(wait.conversation_id, exc, now))

    def webhook(self, key: str, payload: Any, signature: Signature,
                now: float) -> Outcome | None:
        """The Webhook wait of the conversation with this key, resolved; or, when the
        conversation is not at a Webhook block yet, the call kept for the next one
        (state "accepted"). None for a replayed message id. Raises 401/404/409/429 (the
        job's savepoint undoes anything it did)."""
        now = self.transaction_time(now)
        conv = self.conversation_by_key(key)
        if conv is None:
            raise NotFound("unknown_conversation",
                           "No conversation has this conversation_key. Use the value of the "
                           "flow variable {{conversation_key}} (or the URL {{webhook_url}}) "
                           "unchanged.")
        wait = self.wait(conv.wait_id) if conv.wait_id else None
        block = self._block(wait) if wait else None
        if (wait is not None and wait.state == "pending" and wait.kind == "webhook"
                and self._live_block(wait) is None):
            return self._strand_wait(wait, conv, now)  # committed; the caller hears 410
        if wait is None or wait.state != "pending" or not isinstance(block, WebhookBlock):
            return self._early(conv, payload, signature, now)
        message_id = signature.verify(block_scheme(self.config.webhooks, block), now)
        try:
            with self.savepoint():  # a refused payload is not "seen": a retry is judged again
                if message_id is not None and not self.record_event(f"webhook:{message_id}",
                                                                    now):
                    return None
                # past the deadline (the timer has not run yet) this fires the timeout instead
                return self._resolve(wait, conv, "success", payload, now, refusable=True)
        except VariableTooLarge as exc:  # the claim was undone: the wait stays pending
            return self._refuse(conv.id, exc, now)

    def _early(self, conv: Conversation, payload: Any, signature: Signature,
               now: float) -> Outcome | None:
        """A call for a conversation that is not at a Webhook block. Kept for the next one
        to start within `webhooks.early_window` only while the conversation waits for an
        `http` block's answer (the provider called back before answering the request that
        registered the URL): only then can it belong to the coming wait. Otherwise refused,
        never kept: 410 when the conversation's latest Webhook wait ended as removed, else
        409. A replayed message id is a duplicate (None) either way."""
        hooks = self.config.webhooks
        wait = self.wait(conv.wait_id) if conv.wait_id else None
        # (an http wait whose block is gone is stranded: nothing is kept for what follows it)
        at_http = (wait is not None and wait.kind == "http" and wait.state == "pending"
                   and self._live_block(wait) is not None)
        if not (at_http and hooks.early_window > 0 and self.early_schemes):
            if self._replayed(signature, now):
                return None
            # its latest Webhook wait ended as removed (bot/stranded.py): meant for it
            if self.has_removed_webhook(conv.id, self.webhook_ended(conv.id)):
                raise Gone("gone", GONE_WEBHOOK)
            raise Conflict("not_waiting", NOT_WAITING)
        schemes, message_id = signature.verify_any(self.early_schemes, now)
        if message_id is not None and not self.record_event(f"webhook:{message_id}", now):
            return None
        if self.early_webhook_count(conv.id, now) >= hooks.early_max:
            raise TooMany("too_many_early",
                          f"This conversation already has {hooks.early_max} calls waiting "
                          "for its next Webhook block; nothing more is kept. Try again "
                          "after it has reached that block.")
        expires = now + hooks.early_window
        self.keep_early_webhook(conv.id, payload, schemes, now, expires)
        return Outcome("accepted", True, wake_at=expires, conversation=conv.id,
                       channel=conv.channel)

    def _replayed(self, signature: Signature, now: float) -> bool:
        """Whether a refused call repeats a message id already applied (a provider's retry
        of a call that got 200): it is answered as a duplicate, not refused. An unsigned
        or forged call is not a replay; the job's savepoint undoes the id it records."""
        try:
            _, message_id = signature.verify_any(self.early_schemes, now)
        except ApiError:
            return False
        return message_id is not None and not self.record_event(f"webhook:{message_id}", now)

    def http_answer(self, wait_id: str, outcome: str, data: Any, now: float) -> Outcome | None:
        """An `http` block's request came back (or failed)."""
        now = self.transaction_time(now)
        wait = self.wait(wait_id)
        if wait is None:
            return None
        return self._resolve(wait, self.conversation_by_id(wait.conversation_id), outcome, data,
                             now)

    def fire_due(self, now: float) -> FirePass:
        """Up to FIRE_BATCH waits whose deadline has passed, each moved to its timeout
        outcome in its own savepoint (a failing transition is undone alone)."""
        now = self.transaction_time(now)
        dropped = self.drop_expired_early_webhooks(now, FIRE_BATCH)
        due = self.due_waits(now, FIRE_BATCH)
        results: list[Outcome] = []
        errors: list[Exception] = []
        for wait_id, kind in due:
            try:
                with self.savepoint():
                    result = self._fire(wait_id, kind, now)
            except Exception as exc:
                errors.append(exc)
                continue
            if result is not None:
                results.append(result)
        return FirePass(results, FIRE_BATCH in (len(due), len(dropped)), errors,
                        self.next_deadline(), dropped)

    def timer_pass(self, now: float) -> tuple[FirePass, float | None]:
        """The database process's own timer (storage.worker's TimerPass): fire what is
        due, and say when to come back."""
        done = self.fire_due(now)
        if done.more:
            return done, now
        nxt = done.next_deadline
        if done.errors and nxt is not None and nxt <= now:
            # a wait whose transition failed is still due: try it again in a second (as the
            # in-process timer does), not at once, over and over, in a busy loop
            nxt = now + 1.0
        return done, nxt

    def move_stranded(self, now: float, cursor: tuple[int, str] = (0, ""),
                      clean: bool = True, span: int = STRANDED_SPAN) -> StrandedPass:
        """One job of the scan that follows a config edit: the conversations of one stretch
        of ids (`Store.stranded_part`, from `cursor`) whose block is gone from the config,
        each moved to the start of `bot.stranded_flow` and told so, then pending waits whose
        block is gone ended (a late callback or webhook gets 410), each in its own savepoint.

        Only a config edit strands anything: the job that ends a scan in which nothing
        failed (`clean`: no earlier job did either) keeps the fingerprint of this config's
        blocks (`bot.stranded.CHECKED_BLOCKS`), and while it matches nothing is read (a
        start-up with 1 M conversations does not read them). Events do not wait for the
        scan: each path moves its own conversation first. So a row the scan found is moved
        only if it is still stranded once locked (an event may have moved it since)."""
        now = self.transaction_time(now)
        live = live_blocks(self.config.flows)
        checked = fingerprint(live)
        if self.setting(CHECKED_BLOCKS) == checked:
            return StrandedPass([], [], None, [], checked=True)
        found, nxt = self.stranded_part(live, cursor, span, STRANDED_BATCH)
        results: list[Outcome] = []
        errors: list[Exception] = []
        for s in found:
            try:
                with self.savepoint():
                    conv = self.conversation_by_id(s.conversation_id)
                    if conv is not None:
                        if self._is_stranded(conv):
                            results.append(self._relocate(conv, now))
                    elif (s.wait_id is not None and (wait := self.wait(s.wait_id)) is not None
                          and wait.state == "pending" and self._live_block(wait) is None):
                        results.append(self._strand_wait(
                            wait, self.conversation_by_id(wait.conversation_id), now))
            except Exception as exc:
                errors.append(exc)
        done = nxt is None and clean and not errors
        if done:  # every row is checked: the next start need not read them
            self.set_setting(CHECKED_BLOCKS, checked)
        return StrandedPass(found, results, nxt, errors, checked=done)

    # -- inside a job -------------------------------------------------------------------

    def _fire(self, wait_id: str, kind: str, now: float) -> Outcome | None:
        outcome = TIMEOUT_OUTCOME[kind]
        wait = self.wait(wait_id)
        if wait is None:
            return None
        conv = self.conversation_by_id(wait.conversation_id)  # the lock order: conversation first
        if wait.state == "pending" and self._live_block(wait) is None:
            return self._strand_wait(wait, conv, now)
        moved = self._move_first(conv, wait, now)
        if not self.claim(wait_id, outcome, now, due=True):
            return moved
        return _after(moved, self._transition(wait, conv, outcome, None, now))

    def _transition(self, wait: Wait, conv: Conversation | None, outcome: str, data: Any,
                    now: float, *, refusable: bool = False) -> Outcome:
        """Run the engine on a wait this job has just claimed; `conv` was locked before.
        An outcome that would take a variable past its limit: `refusable` (a callback, a
        webhook) raises VariableTooLarge for the caller to undo the claim; otherwise (the
        timer, an http answer, which can't be sent again) the wait ends but the
        conversation keeps its variables and stays at its block, and the user is told."""
        if conv is None:
            return Outcome(outcome, True, resolved=wait)
        if wait.kind == "webhook":
            self.mark_webhook_ended(conv.id, now)
        came_from = conv.block
        try:
            step = self.engine.on_wait(conv, wait, outcome, data, now)
        except VariableTooLarge as exc:
            if refusable:
                raise
            told = self._refuse(conv.id, exc, now, ended=wait.id)
            return Outcome(outcome, True, told.messages, refused=told.refused)
        return self._save(conv, step, outcome, now, came_from, resolved=wait)

    def _save(self, conv: Conversation, step: Step, state: str, now: float,
              came_from: str | None = None, resolved: Wait | None = None,
              cancelled: str = "") -> Outcome:
        """Persist a step; if it started a Webhook wait and a call for it came early, the
        wait takes that call at once (and the flow goes on through on_success)."""
        self.save(conv, step, now)
        result = Outcome.of(state, step, conv, came_from, resolved=resolved,
                            cancelled=cancelled)
        waiting = next((w for w in step.waits
                        if w.kind == "webhook" and w.id == conv.wait_id), None)
        if waiting is None or self.config.webhooks.early_window <= 0:
            return result
        block = self._block(waiting)
        if not isinstance(block, WebhookBlock):
            return result
        scheme = block_scheme(self.config.webhooks, block)
        early = self.take_early_webhook(conv.id, scheme.name if scheme else None, now)
        if early is None:
            return result
        try:
            applied = self._resolve(replace(waiting, conversation_id=conv.id), conv,
                                    "success", early.payload, now, refusable=True)
        except VariableTooLarge as exc:  # the early call is dropped; the wait stays open
            told = self._refuse(conv.id, exc, now)
            result.messages += told.messages
            return result
        result.messages += applied.messages
        result.waits = [w for w in result.waits if w.id != waiting.id] + applied.waits
        result.early_applied += 1 + applied.early_applied
        result.went_to = applied.went_to
        return result

    def _refuse(self, conv_id: int, exc: VariableTooLarge, now: float,
                ended: str | None = None) -> Outcome:
        """An event that would take a variable past its limit: nothing it did is kept (the
        conversation is read again as it was; `ended`, the id of a wait that has to end
        anyway, is let go), the user gets the error text of the flow they are in, and the
        log says which variable."""
        conv = self.conversation_by_id(conv_id)
        if conv is None:
            return Outcome(TOO_LARGE, False, refused=refusal(exc))
        log.warning("conversation %s: refused an event, nothing of it kept: %s", conv.id, exc)
        if ended is not None and conv.wait_id == ended:
            conv.wait_id = None  # it stays at the block: the next message runs it again
        flow = self.config.flows.get(conv.flow)
        text = (flow.error_message if flow else "") or self.config.bot.error_message
        step = Step(messages=[Message(render(text, conv.variables))])
        self.save(conv, step, now)
        return Outcome(TOO_LARGE, False, len(step.messages), refused=refusal(exc))

    def _resolve(self, wait: Wait, conv: Conversation | None, outcome: str, data: Any,
                 now: float, *, refusable: bool = False) -> Outcome:
        """Try to move `wait` to `outcome` before its deadline. If the deadline passed and
        the timer has not fired yet, fire it here, so the late caller's answer and the
        state agree. `conv` (the wait's conversation) is already locked by this job.
        `refusable`: an outcome that would take a variable past its limit raises
        VariableTooLarge, with the claim undone (the wait stays pending)."""
        if wait.state == "pending" and self._live_block(wait) is None:
            return self._strand_wait(wait, conv, now)
        with self.savepoint():
            if self.claim(wait.id, outcome, now, due=False):
                return self._transition(wait, conv, outcome, data, now, refusable=refusable)
        timeout = TIMEOUT_OUTCOME[wait.kind]
        if wait.state == "pending" and self.claim(wait.id, timeout, now, due=True):
            fired = self._transition(wait, conv, timeout, None, now)
            fired.won = False
            return fired
        current = self.wait(wait.id)
        return Outcome(current.state if current else "unknown", False)

    def _block(self, wait: Wait) -> Block | None:
        flow = self.config.flows.get(wait.flow)
        return flow.blocks.get(wait.block) if flow else None

    def _live_block(self, wait: Wait) -> Block | None:
        """The wait's block if this config still has it, as a block of the wait's kind."""
        block = self._block(wait)
        return block if block is not None and wait_kind(block) == wait.kind else None

    # -- stranded conversations (their block is gone from the config) ---------------------

    def _is_stranded(self, conv: Conversation) -> bool:
        if conv.wait_id is not None:
            wait = self.wait(conv.wait_id)
            return wait is None or wait.state != "pending" or self._live_block(wait) is None
        if conv.block is None:
            return False
        flow = self.config.flows.get(conv.flow)
        return flow is None or conv.block not in flow.blocks

    def _move_first(self, conv: Conversation | None, wait: Wait, now: float
                    ) -> Outcome | None:
        """An event for a wait that is not its conversation's own (a non-blocking WebView)
        reaching a stranded conversation: the conversation is moved first, in this job, as
        the start-up scan would have (it may not have got to it yet), so no event is
        handled for a conversation that stands at a block the config no longer has."""
        if conv is None or conv.wait_id == wait.id or not self._is_stranded(conv):
            return None
        try:
            with self.savepoint():
                return self._relocate(conv, now)
        except VariableTooLarge as exc:  # as the scan's own failures: logged, left there
            log.error("conversation %s: could not move it off a removed block: %s", conv.id,
                      exc)
            return None

    def _relocate(self, conv: Conversation, now: float) -> Outcome:
        """End the conversation's open wait as removed, move it to `bot.stranded_flow`."""
        held = self.wait(conv.wait_id) if conv.wait_id is not None else None
        if held is not None:
            self.end_removed(held.id, now)
        came_from = conv.block
        step = self.engine.relocate(conv, now)
        self.save(conv, step, now)
        result = Outcome.of(REMOVED, step, conv, came_from)
        if held is not None and held.state == "pending":  # the metrics and the chat page
            result.removed, result.removed_id = held.kind, held.id
        return result

    def _strand_wait(self, wait: Wait, conv: Conversation | None, now: float) -> Outcome:
        """A pending wait whose block is gone: end it, and move the conversation it holds
        (`conv`, its conversation, locked by this job). `won` is False: a caller hears 410
        `gone`."""
        if conv is not None and conv.wait_id == wait.id:
            result = self._relocate(conv, now)
            result.won = False
            return result
        self.end_removed(wait.id, now)  # a non-blocking WebView's: its conversation went on
        return Outcome(REMOVED, False, conversation=conv.id if conv else 0,
                       channel=conv.channel if conv else "", user=conv.user_id if conv else "",
                       removed=wait.kind, removed_id=wait.id)




def _after(moved: Outcome | None, result: Outcome) -> Outcome:
    """`result`, with what moving its conversation first (`Ledger._move_first`) wrote and
    ended, so the outbox, the timer and the metrics hear of both."""
    if moved is None:
        return result
    result.messages += moved.messages
    result.waits = moved.waits + result.waits
    if not result.removed:
        result.removed, result.removed_id = moved.removed, moved.removed_id
    return result
