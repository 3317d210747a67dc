"""Runs events through the engine inside one committed transaction each, then wakes the
outbox and the timer. Callback, webhook and timer all resolve waits through here."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bot.clock import Clock
from bot.config import Config
from bot.engine import Engine, Links
from bot.errors import Conflict, Gone, NotFound
from bot.flow import Block, WebhookBlock, WebViewBlock
from bot.state import TIMEOUT_OUTCOME, Conversation, Step, Wait
from channels.base import Inbound
from storage.store import Store
from storage.worker import DbWorker

log = logging.getLogger(__name__)

FIRE_BATCH = 500


def new_token() -> str:
    """144 random bits, URL-safe: executionIds, wait ids and conversation keys."""
    return secrets.token_urlsafe(18)


def short(token: str) -> str:
    """Enough of an id to find it in logs, never the whole secret."""
    return token[:6] + "…"


WebViewCheck = Callable[[WebViewBlock, Conversation, Mapping[str, Any]], None]
"""Raises an ApiError when a callback may not resolve this wait (e.g. Telegram initData)."""


@dataclass
class _Outcome:
    """What a resolving job found; turned into an answer after the commit."""

    state: str  # the wait's final state
    won: bool  # this caller made the transition
    step: Step = field(default_factory=Step)
    waits: list[Wait] = field(default_factory=list)


class Runtime:
    def __init__(self, config: Config, worker: DbWorker, clock: Clock) -> None:
        self.config = config
        self.worker = worker
        self.clock = clock
        server = config.server
        self.engine = Engine(
            config.flows, config.bot,
            Links(public_url=server.public_url + server.path_prefix,
                  webhook_url=server.url("/webhook")),
            new_token,
        )
        self.metrics: Counter[str] = Counter()
        self.webview_checks: dict[str, WebViewCheck] = {}
        self.on_messages: Callable[[], None] = lambda: None  # wakes the outbox
        self.on_deadline: Callable[[float], None] = lambda _t: None  # wakes the timer
        self.http: aiohttp.ClientSession | None = None
        self.next_deadline: float | None = None  # the earliest pending one, after fire_due()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- inbound messages ---------------------------------------------------------------

    async def handle_inbound(self, event: Inbound) -> bool:
        """Commit what a user did; False when the platform redelivered an event we had."""

        def job(store: Store) -> Step | None:
            now = self.clock.now()
            if event.event_id is not None and not store.record_event(event.event_id, now):
                return None
            conv = store.conversation(event.channel, event.user_id, new_token(), now)
            step = self.engine.on_message(conv, event, now)
            store.save(conv, step, now)
            return step

        step = await self.worker.run(job)
        if step is None:
            self.metrics["inbound_duplicates"] += 1
            return False
        self.metrics[f"inbound_{event.channel}"] += 1
        self._after_commit(step.waits, step)
        return True

    # -- resolving waits ------------------------------------------------------------------

    def _transition(self, store: Store, wait: Wait, outcome: str, data: Any,
                    now: float) -> _Outcome:
        conv = store.conversation_by_id(wait.conversation_id)
        if conv is None:
            return _Outcome(outcome, True)
        step = self.engine.on_wait(conv, wait, outcome, data, now)
        store.save(conv, step, now)
        return _Outcome(outcome, True, step, step.waits)

    def _resolve(self, store: Store, wait: Wait, outcome: str, data: Any) -> _Outcome:
        """Inside a job: try to move `wait` to `outcome` before its deadline. If the deadline
        passed and the timer has not fired yet, fire it here, so the late caller's answer and
        the state agree."""
        now = self.clock.now()
        if store.claim(wait.id, outcome, now, due=False):
            return self._transition(store, wait, outcome, data, now)
        timeout = TIMEOUT_OUTCOME[wait.kind]
        if wait.state == "pending" and store.claim(wait.id, timeout, now, due=True):
            fired = self._transition(store, wait, timeout, None, now)
            fired.won = False
            return fired
        current = store.wait(wait.id)
        return _Outcome(current.state if current else "unknown", False)

    async def webview_callback(self, execution_id: str, success: bool,
                               data: Mapping[str, Any] | None,
                               proof: Mapping[str, Any] | None = None) -> str:
        """Resolve a WebView wait; returns "success" or "error". Raises 404/409/410."""

        def job(store: Store) -> _Outcome | None:
            wait = store.wait(execution_id)
            if wait is None or wait.kind != "webview":
                return None
            if wait.state != "pending":
                return _Outcome(wait.state, False)
            block = self._block(wait)
            if isinstance(block, WebViewBlock) and block.verify:
                conv = store.conversation_by_id(wait.conversation_id)
                check = self.webview_checks.get(block.verify)
                if check is None or conv is None:
                    raise Conflict("verify_unavailable",
                                   f"This WebView needs {block.verify} verification, "
                                   "but that channel is not enabled on this server.")
                check(block, conv, proof or {})
            return self._resolve(store, wait, "success" if success else "error", data)

        result = await self.worker.run(job)
        if result is None:
            self.metrics["callbacks_404"] += 1
            raise NotFound("unknown_execution",
                           "No WebView is waiting for this executionId. Check that the page "
                           "sends the executionId from its URL unchanged.")
        self._after_commit(result.waits, result.step)
        if result.won:
            self.metrics["callbacks_ok"] += 1
            return result.state
        if result.state in ("expired", "cancelled"):
            self.metrics["callbacks_410"] += 1
            raise Gone(result.state,
                       "This WebView is no longer waiting: it expired before the callback "
                       "arrived." if result.state == "expired" else
                       "This WebView is no longer waiting: the conversation was restarted.")
        self.metrics["callbacks_409"] += 1
        raise Conflict("already_resolved",
                       f"This WebView was already completed with outcome '{result.state}'; "
                       "a callback is accepted once.", outcome=result.state)

    def _webhook_wait(self, store: Store, key: str) -> tuple[Wait, WebhookBlock]:
        """Inside a job: the pending Webhook wait of the conversation with this key, or
        404/409 (the job's savepoint makes sure such a refusal changed nothing)."""
        conv = store.conversation_by_key(key)
        if conv is None:
            raise NotFound("unknown_conversation",
                           "No conversation has this conversation_key. Use the value of the "
                           "flow variable {{conversation_key}} unchanged.")
        wait = store.wait(conv.wait_id) if conv.wait_id else None
        block = self._block(wait) if wait else None
        if (wait is None or wait.state != "pending" or not isinstance(block, WebhookBlock)
                or wait.deadline <= self.clock.now()):
            raise Conflict("not_waiting",
                           "This conversation is not waiting at a Webhook block (it has not "
                           "reached one yet, already got its call, or timed out).")
        return wait, block

    async def webhook(self, key: str, payload: Any,
                      verify: Callable[[WebhookBlock], str | None]) -> bool:
        """Resolve the Webhook wait of the conversation with this key, in one job (one
        round trip to the database). `verify(block)` checks the signature where the block
        asks for one and returns the message id (None: unsigned); it raises 401.
        Returns False for a replayed message id. Raises 404/409."""

        def job(store: Store) -> _Outcome | None:
            wait, block = self._webhook_wait(store, key)
            message_id = verify(block)
            if message_id is not None and not store.record_event(f"webhook:{message_id}",
                                                                 self.clock.now()):
                return None
            return self._resolve(store, wait, "success", payload)

        result = await self.worker.run(job)
        if result is None:
            self.metrics["webhooks_replayed"] += 1
            return False
        self._after_commit(result.waits, result.step)
        if not result.won:
            self.metrics["webhooks_409"] += 1
            raise Conflict("not_waiting", "This conversation is no longer waiting at the "
                           f"Webhook block (it ended with '{result.state}').")
        self.metrics["webhooks_ok"] += 1
        return True

    async def fire_due(self) -> int:
        """Fire every wait whose deadline has passed; returns how many transitions ran.

        A pass of up to FIRE_BATCH waits is one *urgent* database job: it runs before the
        callbacks queued in front of it, so expiries stay on time under load. It also
        leaves the next pending deadline in `self.next_deadline` for the timer."""
        fired = 0
        while True:
            results, more, errors, nxt = await self.worker.run(self._fire_batch, urgent=True)
            self.next_deadline = nxt
            for result in results:
                self.metrics[f"timer_{result.state}"] += 1
                self._after_commit(result.waits, result.step)
            fired += len(results)
            if errors:
                raise errors[0]
            if not more:
                return fired

    def _fire_batch(self, store: Store
                    ) -> tuple[list[_Outcome], bool, list[Exception], float | None]:
        due = store.due_waits(self.clock.now(), FIRE_BATCH)
        results: list[_Outcome] = []
        errors: list[Exception] = []
        for wait_id, kind in due:
            try:
                with store.savepoint():  # a failing transition is undone alone
                    result = self._fire(store, wait_id, kind)
            except Exception as exc:
                errors.append(exc)
                continue
            if result is not None:
                results.append(result)
        return results, len(due) == FIRE_BATCH, errors, store.next_deadline()

    def _fire(self, store: Store, wait_id: str, kind: str) -> _Outcome | None:
        now = self.clock.now()
        outcome = TIMEOUT_OUTCOME[kind]
        wait = store.wait(wait_id)
        if wait is None or not store.claim(wait_id, outcome, now, due=True):
            return None
        return self._transition(store, wait, outcome, None, now)

    # -- after a commit -----------------------------------------------------------------

    def _after_commit(self, waits: list[Wait], step: Step) -> None:
        if step.messages:
            self.on_messages()
        for wait in waits:
            self.on_deadline(wait.deadline)
            if wait.kind == "http" and wait.request is not None:
                self._spawn(self._http_request(wait))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _http_request(self, wait: Wait) -> None:
        """Run an `http` block's request, then resolve its wait with the answer."""
        req = wait.request or {}
        data: dict[str, Any] = {"status": None, "body": None}
        outcome = "failure"
        try:
            if self.http is None:
                raise RuntimeError("no HTTP client session")
            async with self.http.request(
                req["method"], req["url"], headers=req.get("headers") or None,
                json=req.get("body") if req["method"] != "GET" else None,
                timeout=aiohttp.ClientTimeout(total=req.get("timeout", 10)),
            ) as resp:
                data["status"] = resp.status
                text = await resp.text()
                try:
                    data["body"] = await resp.json(content_type=None) if text else None
                except ValueError:
                    data["body"] = text
                outcome = "success" if 200 <= resp.status < 300 else "failure"
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            log.warning("http block %s/%s: %s %s failed: %s", wait.flow, wait.block,
                        req.get("method"), req.get("url", "")[:80], type(exc).__name__)
        def job(store: Store) -> _Outcome | None:
            stored = store.wait(wait.id)  # the engine's copy has no conversation id yet
            return self._resolve(store, stored, outcome, data) if stored else None

        result = await self.worker.run(job)
        if result is not None:
            self._after_commit(result.waits, result.step)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _block(self, wait: Wait) -> Block | None:
        flow = self.config.flows.get(wait.flow)
        return flow.blocks.get(wait.block) if flow else None
