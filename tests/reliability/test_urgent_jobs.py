"""The database worker's urgent lane, which keeps expiries on time under callback load: an
urgent job runs before the jobs queued in front of it, commits on its own, and a failing
one is undone alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

from storage.store import Store
from storage.worker import DbWorker


async def test_urgent_job_overtakes_the_queue_and_commits_alone(tmp_path: Path) -> None:
    worker = DbWorker(Store(tmp_path / "w.db"))
    worker.start()
    gate, started = threading.Event(), threading.Event()
    order: list[str] = []
    commits: list[int] = []

    def blocker(store: Store) -> None:
        started.set()
        gate.wait(5)  # holds the DB thread while the queue fills up
        order.append("blocker")

    def job(name: str) -> Callable[[Store], str]:
        def run(store: Store) -> str:
            order.append(name)
            commits.append(worker.commits)
            store.record_event(name, 0)
            return name
        return run

    first = asyncio.ensure_future(worker.run(blocker))
    while not started.is_set():  # the DB thread holds it, alone in its batch
        await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(worker.run(job(f"q{i}"))) for i in range(5)]
    await asyncio.sleep(0.05)
    urgent = asyncio.ensure_future(worker.run(job("urgent"), urgent=True))
    await asyncio.sleep(0.05)
    gate.set()
    assert await urgent == "urgent"
    await asyncio.gather(first, *queued)
    assert order == ["blocker", "urgent", "q0", "q1", "q2", "q3", "q4"]
    # the urgent job's commit did not wait for the queued jobs: they ran after it
    assert commits[0] < commits[1] == commits[-1]
    await worker.stop()


async def test_failing_urgent_job_is_undone_alone(tmp_path: Path) -> None:
    worker = DbWorker(Store(tmp_path / "w.db"))
    worker.start()

    def bad(store: Store) -> None:
        store.record_event("bad", 0)
        raise ValueError("boom")

    results = await asyncio.gather(
        worker.run(lambda s: s.record_event("a", 0)),
        worker.run(bad, urgent=True),
        worker.run(lambda s: s.record_event("b", 0)),
        return_exceptions=True)
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], ValueError)
    seen = await worker.run(lambda s: [r[0] for r in s.conn.execute("SELECT id FROM events")])
    assert sorted(seen) == ["a", "b"]
    await worker.stop()
