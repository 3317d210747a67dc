"""Delivers committed outbox rows through their channels: in order per conversation,
within the channel's rate limits, retrying transient failures with backoff."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from bot import jobs
from bot.clock import Clock, LoopTime, Monotonic
from bot.logs import event
from bot.metrics import Metrics
from bot.state import OutboxRow
from channels.base import Channel, RateLimit, SendError

if TYPE_CHECKING:
    from bot.runtime import Worker

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
BATCH = 500


def backoff(attempts: int) -> float:
    """1 s, 2 s, 4 s … capped at 5 minutes, with jitter so retries do not stampede."""
    return min(300.0, 2.0 ** attempts) * (0.8 + 0.4 * random.random())


class _Bucket:
    """Token bucket over a monotonic clock (the event loop's unless one is injected)."""

    def __init__(self, rate: float, capacity: float, pace: Monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.pace = pace
        self.stamp = pace.time()

    async def take(self) -> None:
        while True:
            now = self.pace.time()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1 - 1e-9:  # a token less a rounding error is a token
                self.tokens = max(0.0, self.tokens - 1)
                return
            await self.pace.sleep((1 - self.tokens) / self.rate)


class RateLimiter:
    """A channel's `RateLimit`: a bucket per chat (`burst` at once, then
    `per_chat_per_second`) and one for the bot (`global_per_second`, a second's worth at
    once). `acquire` returns when one message may go."""

    def __init__(self, limit: RateLimit, pace: Monotonic | None = None) -> None:
        self.limit = limit
        self.pace = pace or LoopTime()
        self._global: _Bucket | None = None
        self._chats: dict[str, _Bucket] = {}

    async def acquire(self, chat: str) -> None:
        if self.limit.per_chat_per_second:
            bucket = self._chats.get(chat)
            if bucket is None:
                if len(self._chats) > 10_000:
                    self._chats.clear()
                bucket = self._chats[chat] = _Bucket(self.limit.per_chat_per_second,
                                                     self.limit.burst, self.pace)
            await bucket.take()
        if self.limit.global_per_second:
            if self._global is None:
                self._global = _Bucket(self.limit.global_per_second,
                                       self.limit.global_per_second, self.pace)
            await self._global.take()


class Outbox:
    def __init__(self, worker: Worker, channels: Mapping[str, Channel], clock: Clock,
                 pace: Monotonic | None = None, stats: Metrics | None = None) -> None:
        self.worker = worker
        self.channels = channels
        self.clock = clock
        self.stats = stats or Metrics()
        self._sent_count = {name: self.stats.outbox.labels(name, "sent") for name in channels}
        self._delay = {name: self.stats.delivery_delay.labels(name) for name in channels}
        self._limiters = {name: RateLimiter(ch.rate_limit, pace) for name, ch in channels.items()}
        self._wake = asyncio.Event()
        self._busy: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # deliveries finished in the same loop iteration, marked sent by one shared job
        self._sent: tuple[list[tuple[int, float, str | None]], asyncio.Future[None]] | None = None
        self._pass_lock = asyncio.Lock()  # see pass_once

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled. A pass runs when a commit wrote messages, a delivery
        finished, a retry fell due, or the last pass left rows unread (its window was
        full); else every 30 s, for rows another node committed."""
        while True:
            self._wake.clear()
            try:
                more = await self.pass_once()
                nxt = None if more else await self.worker.run(
                    jobs.next_delivery_time, self.clock.now())
            except Exception:
                log.exception("outbox pass failed; trying again in 1 s")
                more, nxt = False, self.clock.now() + 1
            if more:
                delay = 0.0
            elif nxt is None:
                delay = 30.0
            else:
                delay = min(30.0, max(0.05, nxt - self.clock.now()))
            try:  # not wait_for: on Python 3.11 it swallows a cancel that meets a wake-up
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def pass_once(self) -> bool:
        """Start delivering every due row of conversations not already being delivered;
        True when a channel's window was full (more rows may be due). Passes run one at
        a time: a second pass reading rows while the first delivers them could find a
        row the first one has not marked sent yet, and deliver it once the first one's
        delivery had ended (`drain()` called by concurrent tasks sent duplicates)."""
        async with self._pass_lock:
            return await self._pass()

    async def _pass(self) -> bool:
        rows: list[OutboxRow] = await self.worker.run(
            jobs.pending_by_channel, list(self.channels), self.clock.now(), BATCH,
            sorted(self._busy))
        by_conv: dict[int, list[OutboxRow]] = {}
        per_channel: Counter[str] = Counter()
        for row in rows:
            per_channel[row.channel] += 1
            if row.conversation_id not in self._busy:
                by_conv.setdefault(row.conversation_id, []).append(row)
        for cid, conv_rows in by_conv.items():
            self._busy.add(cid)
            self._spawn(self._deliver(cid, conv_rows))
        return any(n >= BATCH for n in per_channel.values())

    async def drain(self) -> None:
        """Deliver until nothing due is left (tests, shutdown)."""
        while True:
            await self.pass_once()
            if not self._tasks:
                return
            await asyncio.gather(*list(self._tasks))

    async def _deliver(self, cid: int, rows: list[OutboxRow]) -> None:
        try:
            for row in rows:
                if not await self._deliver_one(row):
                    return  # keep order: later rows wait for this one's retry
        finally:
            self._busy.discard(cid)
            self._wake.set()

    async def _deliver_one(self, row: OutboxRow) -> bool:
        channel = self.channels.get(row.channel)
        if channel is None:
            await self.worker.run(jobs.mark_failed, row.id,
                                  f"channel '{row.channel}' is not enabled on this server")
            return True
        await self._limiters[row.channel].acquire(row.user_id)
        try:
            platform_id = await channel.send(row.delivery())
        except SendError as exc:
            return await self._failed(row, exc)
        except Exception as exc:  # a bug or an unexpected library error: retry, loudly
            log.exception("outbox %d: unexpected error from channel %s", row.id, row.channel)
            return await self._failed(row, SendError(repr(exc), permanent=False))
        now = self.clock.now()
        await self._mark_sent(row.id, now, platform_id)
        self._sent_count[row.channel].inc()
        if row.created:
            self._delay[row.channel].observe(max(0.0, now - row.created))
        event("sent", row.conversation_id, row.channel, "message %d%s", row.id,
              f" on attempt {row.attempts + 1}" if row.attempts else "")
        return True

    async def _mark_sent(self, outbox_id: int, now: float, platform_id: str | None) -> None:
        """Record a delivery; returns once that is committed. Rows delivered in the same
        loop iteration share one database job (under load: hundreds per job)."""
        if self._sent is None:
            self._sent = ([], asyncio.get_running_loop().create_future())
            self._spawn(self._flush_sent())
        self._sent[0].append((outbox_id, now, platform_id))
        await asyncio.shield(self._sent[1])

    async def _flush_sent(self) -> None:
        assert self._sent is not None
        rows, done = self._sent
        try:
            await asyncio.sleep(0)  # let the other deliveries of this iteration join
            self._sent = None
            await self.worker.run(jobs.mark_all_sent, rows)
        except Exception as exc:  # the waiting deliveries see the database error
            done.set_exception(exc)
        except BaseException:  # cancelled (shutdown): nobody will mark these rows
            if self._sent is not None and self._sent[1] is done:
                self._sent = None
            done.cancel()
            raise
        else:
            done.set_result(None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _failed(self, row: OutboxRow, exc: SendError) -> bool:
        error = f"{exc.code}: {exc}" if exc.code else str(exc)
        if exc.permanent or row.attempts + 1 >= MAX_ATTEMPTS:
            log.warning("conv=%s %s failed: message %d not delivered: %s", row.conversation_id,
                        row.channel, row.id, error)
            self.stats.outbox.labels(row.channel, "failed").inc()
            await self.worker.run(jobs.mark_failed, row.id, error)
            return True
        delay = exc.retry_after if exc.retry_after is not None else backoff(row.attempts)
        event("retry", row.conversation_id, row.channel, "message %d: %s; again in %.1f s",
              row.id, error, delay)
        self.stats.outbox.labels(row.channel, "retried").inc()
        await self.worker.run(jobs.mark_retry, row.id, self.clock.now() + delay, error)
        return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
