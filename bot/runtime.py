"""Runs events through the ledger (the engine inside one committed transaction each), then
answers, wakes the outbox and the timer. Callback, webhook and timer all resolve waits
through here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import aiohttp
from yarl import URL

from bot import jobs
from bot.body import parse_answer
from bot.clock import Clock
from bot.config import Config
from bot.errors import ApiError, Conflict, Gone, NotFound, TooLarge
from bot.ledger import (
    GONE_WEBHOOK,
    TOO_LARGE,
    FirePass,
    Ledger,
    Outcome,
    Signature,
    WebViewCheck,
)
from bot.logs import event, short
from bot.messages import Inbound
from bot.metrics import Metrics
from bot.state import Wait
from bot.stranded import REMOVED, Stranded, per_block

log = logging.getLogger(__name__)
refused = logging.getLogger("flowbot.refused")  # rate-limited at every level (bot/logs.py)
T = TypeVar("T")


class Worker(Protocol):
    """Runs `fn(ledger, *args)` in a committed transaction: `storage.worker.DbWorker` (a
    thread of this process) or `storage.process.ProcessWorker` (a process of its own)."""

    commits: int
    jobs: int

    async def open(self) -> None: ...

    async def stop(self) -> None: ...

    async def run(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T: ...


class Runtime:
    def __init__(self, config: Config, worker: Worker, clock: Clock,
                 webview_checks: dict[str, WebViewCheck] | None = None,
                 stats: Metrics | None = None) -> None:
        self.config = config
        self.worker = worker
        self.clock = clock
        self.metrics: Counter[str] = Counter()
        self.stats = stats or Metrics()  # what /metrics exposes
        # filled by the channels; the ledger (in whichever process) reads them
        self.webview_checks = webview_checks if webview_checks is not None else {}
        self.on_messages: Callable[[], None] = lambda: None  # wakes the outbox
        self.on_deadline: Callable[[float], None] = lambda _t: None  # wakes the timer
        # channel name → told (user id, executionId, outcome) when a WebView wait of one of
        # its users ended, so a page can turn the link inactive (the web chat does)
        self.on_webview_ended: dict[str, Callable[[str, str, str], None]] = {}
        self.http: aiohttp.ClientSession | None = None
        self.next_deadline: float | None = None  # the earliest pending one, after fire_due()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stranded_scan: asyncio.Task[list[Stranded]] | None = None  # check_stranded()

    # -- inbound messages ---------------------------------------------------------------

    async def handle_inbound(self, inbound: Inbound) -> bool:
        """Commit what a user did; False when the platform redelivered an event we had."""
        started = time.perf_counter()
        result = await self.worker.run(Ledger.inbound, inbound, self.clock.now())
        if result is None:
            self.metrics["inbound_duplicates"] += 1
            self.stats.inbound.labels(inbound.channel, "deduplicated").inc()
            event("duplicate", 0, inbound.channel, "a redelivered event, ignored")
            return False
        self.metrics[f"inbound_{inbound.channel}"] += 1
        self.stats.inbound.labels(inbound.channel, "accepted").inc()
        self.stats.transition["message"].observe(time.perf_counter() - started)
        self._after_commit(result)
        return True

    async def move_chat(self, channel: str, old_user_id: str, new_user_id: str) -> bool:
        """A chat got a new address on its platform (a Telegram group upgraded to a
        supergroup): its conversation goes with it. False when it had moved already."""
        moved: bool = await self.worker.run(jobs.move_conversation, channel, old_user_id,
                                            new_user_id, self.clock.now())
        if moved:
            self.metrics[f"chats_moved_{channel}"] += 1
            log.info("%s: conversation moved from chat %s to %s", channel, old_user_id,
                     new_user_id)
        return moved

    # -- resolving waits ------------------------------------------------------------------

    async def webview_callback(self, execution_id: str, success: bool,
                               data: Mapping[str, Any] | None,
                               proof: Mapping[str, Any] | None = None) -> str:
        """Resolve a WebView wait; returns "success" or "error". Raises 404/409/410, and 413
        when `data` would take a flow variable past its limit (the wait stays pending)."""
        started = time.perf_counter()
        try:
            result = await self.worker.run(Ledger.webview_callback, execution_id, success,
                                           data, proof, self.clock.now())
        except ApiError as exc:  # 401 verify, 409 verify_unavailable
            self._refused("callback", exc.code, execution_id)
            raise
        if result is None:
            self.metrics["callbacks_404"] += 1
            self._refused("callback", "not_found", execution_id)
            raise NotFound("unknown_execution",
                           "No WebView is waiting for this executionId. Check that the page "
                           "sends the executionId from its URL unchanged.")
        self._after_commit(result)
        if result.won:
            self.metrics["callbacks_ok"] += 1
            self.stats.callbacks.labels(result.state).inc()
            self.stats.transition["callback"].observe(time.perf_counter() - started)
            return result.state
        if result.state == TOO_LARGE:
            self.metrics["callbacks_413"] += 1
            raise TooLarge("variable_too_large", result.refused)
        if result.state == REMOVED:
            self.metrics["callbacks_410"] += 1
            self._refused("callback", "gone", execution_id, result.conversation)
            raise Gone("gone", "This WebView is no longer waiting: its block was removed from "
                       "the flow, and the user was moved on. The data was not applied.")
        if result.state in ("expired", "cancelled"):
            self.metrics["callbacks_410"] += 1
            self._refused("callback", result.state, execution_id, result.conversation)
            raise Gone(result.state,
                       "This WebView is no longer waiting: it expired before the callback "
                       "arrived." if result.state == "expired" else
                       "This WebView is no longer waiting: the conversation was restarted.")
        self.metrics["callbacks_409"] += 1
        self._refused("callback", "already_resolved", execution_id, result.conversation)
        raise Conflict("already_resolved",
                       f"This WebView was already completed with outcome '{result.state}'; "
                       "a callback is accepted once.", outcome=result.state)

    async def webhook(self, key: str, payload: Any, signature: Signature) -> str:
        """Resolve the Webhook wait of the conversation with this key, in one job (one
        round trip to the database). `signature` is checked once the block is known; it
        raises 401. Returns "ok" (applied), "duplicate" (a replayed message id) or
        "accepted" (kept for the conversation's next Webhook block). Raises 404/409/410/429,
        and 413 when the payload would take a flow variable past its limit (nothing applied).
        """
        started = time.perf_counter()
        try:
            result = await self.worker.run(Ledger.webhook, key, payload, signature,
                                           self.clock.now())
        except ApiError as exc:  # 401 signature, 404 unknown key, 409 not waiting, 429
            self._refused("webhook", exc.code)
            raise
        if result is None:
            self.metrics["webhooks_replayed"] += 1
            self.stats.webhooks.labels("deduplicated").inc()
            event("webhook", 0, "-", "a replayed webhook-id, ignored")
            return "duplicate"
        self._after_commit(result)
        if result.state == TOO_LARGE:
            self.metrics["webhooks_413"] += 1
            raise TooLarge("variable_too_large", result.refused)
        if not result.won and result.state == REMOVED:
            self.metrics["webhooks_410"] += 1
            self._refused("webhook", "gone", conv=result.conversation)
            raise Gone("gone", GONE_WEBHOOK)
        if result.state == "accepted":
            self.metrics["webhooks_early_kept"] += 1
            self.stats.webhooks.labels("early").inc()
            event("webhook", result.conversation, result.channel or "-",
                  "came before its Webhook block; kept for it")
            return "accepted"
        if not result.won:
            self.metrics["webhooks_409"] += 1
            self._refused("webhook", "not_waiting", conv=result.conversation)
            raise Conflict("not_waiting", "This conversation is no longer waiting at the "
                           f"Webhook block (it ended with '{result.state}'); nothing was "
                           "kept.")
        self.metrics["webhooks_ok"] += 1
        self.stats.webhooks.labels("accepted").inc()
        self.stats.transition["webhook"].observe(time.perf_counter() - started)
        return "ok"

    def _refused(self, what: str, code: str, token: str | None = None, conv: int = 0) -> None:
        """A callback or webhook we answered with an error: counted, and one log line
        (rate-limited like warnings: a scanner must not flood the log)."""
        if what == "callback":
            self.stats.callbacks.labels("not_found" if code == "unknown_execution"
                                        else code).inc()
            refused.info("conv=%s callback refused: %s (executionId %s)", conv or "-", code,
                         short(token))
            return
        self.stats.webhooks.labels(
            code if code in ("not_waiting", "gone") else
            "not_found" if code == "unknown_conversation" else "refused").inc()
        refused.info("conv=%s webhook refused: %s", conv or "-", code)

    async def fire_due(self) -> int:
        """Fire every wait whose deadline has passed; returns how many transitions ran.

        A pass of up to FIRE_BATCH waits is one *urgent* database job: it runs before the
        callbacks queued in front of it, so expiries stay on time under load. It also
        leaves the next pending deadline in `self.next_deadline` for the timer."""
        fired = 0
        while True:
            done = await self.worker.run(Ledger.fire_due, self.clock.now(), urgent=True)
            fired += self._fired(done)
            if done.errors:
                raise done.errors[0]
            if not done.more:
                return fired

    async def move_stranded(self) -> list[Stranded]:
        """Move every conversation whose block the config no longer has to the start of
        `bot.stranded_flow` (telling its user), and end the waits of removed blocks, in
        small jobs queued like any other (`Ledger.move_stranded`); log how many stood where.
        Nothing is read when the database was checked against this config's blocks already.
        Returns what was found."""
        found: list[Stranded] = []
        cursor: tuple[int, str] | None = (0, "")
        clean = True
        while cursor is not None:
            done = await self.worker.run(Ledger.move_stranded, self.clock.now(), cursor, clean)
            found += done.found
            for result in done.results:
                self._after_commit(result)
            for exc in done.errors:
                log.error("could not move a stranded conversation: %r", exc)
            clean = clean and not done.errors
            cursor = done.cursor
        if found:
            moved = sum(1 for s in found if s.conversation_id)
            places = ", ".join(f"{place}: {n}" for place, n in per_block(found))
            log.warning("%d conversation(s) stood at blocks this config no longer has; moved "
                        "to the start of flow %r and told so. %d wait(s) ended. Where they "
                        "stood: %s", moved, self.config.bot.stranded_target,
                        sum(1 for s in found if s.wait_id), places)
            self.metrics["stranded_moved"] += len(found)
        return found

    def check_stranded(self) -> asyncio.Task[list[Stranded]]:
        """`move_stranded` in the background, started once the server is up: /healthz and
        every event are served meanwhile (each event path moves its own conversation first,
        bot/ledger.py), so start-up does not grow with the number of conversations. A scan
        that fails is logged; the next start scans again. Awaited by `close`."""

        async def scan() -> list[Stranded]:
            try:
                return await self.move_stranded()
            except Exception:
                log.exception("the check for stranded conversations stopped; each is still "
                              "moved when an event reaches it, and the next start checks "
                              "again")
                return []

        self.stranded_scan = asyncio.create_task(scan(), name="stranded")
        return self.stranded_scan

    async def prune(self) -> dict[str, int]:
        """One pruning round (retention): every category older than its `[retention]` age,
        deleted in jobs of at most `retention.batch` rows, each its own short transaction
        queued behind the others, so callbacks and timers wait for one batch at most.
        Returns rows deleted per category. On several nodes only the leader runs it."""
        retention = self.config.retention
        deleted: dict[str, int] = {}
        for category, cutoff in retention.cutoffs(self.clock.now()).items():
            cursor, total = 0, 0
            while True:
                n, cursor = await self.worker.run(jobs.prune, category, cutoff,
                                                  retention.batch, cursor)
                total += n
                if cursor == 0 and n < retention.batch:
                    break
            if total:
                deleted[category] = total
                self.metrics[f"pruned_{category}"] += total
        return deleted

    async def run_pruning(self) -> None:
        """Forever: a pruning round every `retention.every_seconds` (the first one after
        that long too, so start-up is not slowed)."""
        while True:
            await asyncio.sleep(self.config.retention.every_seconds)
            try:
                deleted = await self.prune()
            except Exception:
                log.exception("pruning round failed; trying again next round")
                continue
            if deleted:
                log.info("retention: deleted %s", ", ".join(
                    f"{n} {category}" for category, n in deleted.items()))

    def timer_pass_done(self, ok: bool, value: Any) -> None:
        """A pass of the database process's own timer committed (value: a FirePass), or
        failed (value: the exception; it tries again in a second)."""
        if not ok:
            log.error("timer pass failed in the database process: %r", value)
            return
        self._fired(value)
        for exc in value.errors:
            log.error("timer: a wait's transition failed: %r", exc)

    def _fired(self, done: FirePass) -> int:
        self.next_deadline = done.next_deadline
        now = self.clock.now()
        if done.dropped:
            window = self.config.webhooks.early_window
            for early in done.dropped:
                log.warning("dropped a webhook call kept for conversation %d: no Webhook "
                            "block started within webhooks.early_window (%g s) of its "
                            "arrival %.0f s ago", early.conversation_id, window,
                            now - early.received)
            self.metrics["webhooks_early_dropped"] += len(done.dropped)
            self.stats.webhooks.labels("dropped").inc(len(done.dropped))
        for result in done.results:
            self.metrics[f"timer_{result.state}"] += 1
            if result.resolved is not None:
                self.stats.timer_lateness.observe(max(0.0, now - result.resolved.deadline))
            self._after_commit(result, timer=True)
        return len(done.results)

    # -- after a commit -----------------------------------------------------------------

    def _after_commit(self, result: Outcome, timer: bool = False) -> None:
        if result.messages:
            self.on_messages()
        if result.wake_at is not None:
            self.on_deadline(result.wake_at)
        if result.early_applied:
            self.metrics["webhooks_early_applied"] += result.early_applied
            self.stats.webhooks.labels("early_applied").inc(result.early_applied)
        self._account(result, timer)
        for wait in result.waits:
            self.on_deadline(wait.deadline)
            if wait.kind == "http" and wait.request is not None:
                self._spawn(self._http_request(wait))

    def _account(self, result: Outcome, timer: bool) -> None:
        """The log lines and gauges of a committed transition."""
        stats, conv, channel = self.stats, result.conversation, result.channel
        ended = result.resolved
        if ended is not None:
            stats.resolved(ended.kind, result.state)
            tell = self.on_webview_ended.get(channel) if ended.kind == "webview" else None
            if tell is not None:
                tell(result.user, ended.id, result.state)
            # the timer fired it, or a late caller found it due and fired it (won=False)
            what = "wait expired" if timer or not result.won else "wait resolved"
            event(what, conv, channel, "%s at %s → %s; %s → %s", ended.kind, ended.block,
                  result.state, result.came_from or "(start)", result.went_to or "(end)")
        elif conv and result.won and result.state == "":  # a user's message
            event("message", conv, channel, "%s → %s (%d message(s) to send)",
                  result.came_from or "(start)", result.went_to or "(end)", result.messages)
        if result.cancelled:
            stats.resolved(result.cancelled, "cancelled")
            tell = self.on_webview_ended.get(channel) if result.cancelled == "webview" else None
            if tell is not None and result.cancelled_id:
                tell(result.user, result.cancelled_id, "cancelled")
            event("wait cancelled", conv, channel, "%s at %s, by a restart",
                  result.cancelled, result.came_from)
        if result.removed:  # its block is gone from the config (bot/stranded.py)
            stats.resolved(result.removed, REMOVED)
            tell = self.on_webview_ended.get(channel) if result.removed == "webview" else None
            if tell is not None and result.removed_id:
                tell(result.user, result.removed_id, REMOVED)
            event("wait removed", conv, channel, "%s (id %s): its block is gone; %s → %s",
                  result.removed, short(result.removed_id), result.came_from or "-",
                  result.went_to or "(end)")
        for wait in result.waits:
            stats.opened(wait.kind)
            event("wait opened", conv, channel, "%s at %s, due in %.0f s (id %s)", wait.kind,
                  wait.block, wait.deadline - self.clock.now(), short(wait.id))

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
            url = req["url"]
            # encoded=True keeps the escapes render_request_url made (yarl would otherwise
            # decode %2E%2E and remove the dot-segment); a URL from before it may be raw
            target = URL(url, encoded=True) if url.isascii() and " " not in url else URL(url)
            async with self.http.request(
                req["method"], target, headers=req.get("headers") or None,
                json=req.get("body") if req["method"] != "GET" else None,
                timeout=aiohttp.ClientTimeout(total=req.get("timeout", 10)),
            ) as resp:
                data["status"] = resp.status
                text = await resp.text()
                try:
                    data["body"] = parse_answer(text) if text.strip() else None
                except ValueError:
                    data["body"] = text
                outcome = "success" if 200 <= resp.status < 300 else "failure"
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            log.warning("http block %s/%s: %s %s failed: %s", wait.flow, wait.block,
                        req.get("method"), req.get("url", "")[:80], type(exc).__name__)
        except Exception as exc:  # whatever it was, the flow takes on_failure now
            log.warning("http block %s/%s: %s %s could not be sent (%s: %s); took on_failure",
                        wait.flow, wait.block, req.get("method"), req.get("url", "")[:80],
                        type(exc).__name__, str(exc)[:200])
        # by id: the engine's copy of the wait has no conversation id yet
        result: Outcome | None = await self.worker.run(
            Ledger.http_answer, wait.id, outcome, data, self.clock.now())
        if result is not None:
            self._after_commit(result)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self.stranded_scan] if self.stranded_scan else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
