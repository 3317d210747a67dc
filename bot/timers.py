"""The timer: sleeps until the earliest pending deadline in SQLite, then fires what is due."""

from __future__ import annotations

import asyncio
import logging
import math

from bot.clock import Clock
from bot.runtime import Runtime

log = logging.getLogger(__name__)

MAX_SLEEP = 30.0  # re-read the table now and then, in case another process added rows


class Timer:
    def __init__(self, runtime: Runtime, clock: Clock) -> None:
        self.runtime = runtime
        self.clock = clock
        self._wake = asyncio.Event()
        self._target = math.inf
        runtime.on_deadline = self.notify

    def notify(self, deadline: float) -> None:
        """A wait with this deadline was committed; wake up if it is sooner than planned."""
        if deadline < self._target:
            self._wake.set()

    async def run(self) -> None:
        """Fire overdue waits at once (start-up), then forever sleep-until-due and fire."""
        while True:
            # cleared before the pass, so a wait committed during it still wakes us
            self._wake.clear()
            self._target = math.inf
            try:
                await self.runtime.fire_due()
                nxt = self.runtime.next_deadline
            except Exception:
                log.exception("timer pass failed; trying again in 1 s")
                nxt = self.clock.now() + 1
            self._target = math.inf if nxt is None else nxt
            delay = MAX_SLEEP if nxt is None else min(MAX_SLEEP, max(0.0, nxt - self.clock.now()))
            if delay > 0:
                try:  # not wait_for: on Python 3.11 it swallows a cancel that meets a wake-up
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
