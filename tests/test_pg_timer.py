"""The PostgreSQL worker's own timer (the database process's) sleeps by the database's
clock, counted on the monotonic clock: a node whose wall clock is off by an hour, or jumps
back and forth, neither fires a wait early, nor an hour late, nor spins."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from bot.ledger import Ledger
from bot.messages import Inbound
from storage.pg_worker import MIN_SLEEP, PgWorker
from storage.postgres import PgLedger
from tests.postgres import empty
from tests.test_store_contract import _config

LEFT = 0.6  # s from the database's now to the wait's deadline


@pytest.fixture
def pg_url(pg_database: str) -> str:
    empty(pg_database)
    return pg_database


@pytest.mark.parametrize("wall", [
    "an hour fast", "an hour slow", "jumping an hour either way at every read"])
def test_the_timer_sleeps_by_the_database_clock(pg_url: str, tmp_path: Path,
                                                 wall: str) -> None:
    steps = itertools.cycle([3600.0, -3600.0])
    clocks = {"an hour fast": lambda: time.time() + 3600,
              "an hour slow": lambda: time.time() - 3600,
              "jumping an hour either way at every read": lambda: time.time() + next(steps)}
    ledger = PgLedger(pg_url, _config(tmp_path, f'url = "{pg_url}"'))
    try:
        with ledger.transaction():
            ledger.inbound(Inbound("rec", "u1", "hi"), 0.0)  # waits at main/pay
            ledger.conn.execute("UPDATE waits SET deadline = extract(epoch from now()) + %s",
                                (LEFT,))
            [(wait_id, _)] = ledger.due_waits(1e12, 10)
        worker = PgWorker(ledger, timer=Ledger.timer_pass, answer=lambda replies: None,
                          threads=1, wall=clocks[wall])
        worker.start()
        began = time.monotonic()
        try:
            while time.monotonic() - began < LEFT + 3 and state(ledger, wait_id) == "pending":
                time.sleep(0.01)
            fired = time.monotonic() - began
            time.sleep(0.3)  # long enough for a busy loop to show
        finally:
            worker.join()
        assert state(ledger, wait_id) == "expired", wall
        assert LEFT - 0.1 < fired < LEFT + 0.5, (wall, fired)
        assert worker.passes <= 3, (wall, worker.passes)  # at start, at the deadline, +1
    finally:
        ledger.close()


def test_a_due_wait_left_pending_is_retried_not_spun_on(pg_url: str, tmp_path: Path) -> None:
    """A pass that says the next deadline has already passed (work left) comes back after
    MIN_SLEEP, not at once in a loop."""
    ledger = PgLedger(pg_url, _config(tmp_path, f'url = "{pg_url}"'))
    calls: list[float] = []

    def stuck(store: Ledger, now: float) -> tuple[object, float]:
        calls.append(time.monotonic())
        return None, store.transaction_time(now) - 10.0  # "due ten seconds ago"

    worker = PgWorker(ledger, timer=stuck, answer=lambda replies: None, threads=1)
    try:
        worker.start()
        time.sleep(0.2)
        worker.join()
        assert 2 <= len(calls) <= 0.2 / MIN_SLEEP + 1, len(calls)
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert min(gaps) >= MIN_SLEEP * 0.9, gaps
    finally:
        ledger.close()


def state(ledger: PgLedger, wait_id: str) -> str:
    with ledger.transaction():
        wait = ledger.wait(wait_id)
        assert wait is not None
        return wait.state
