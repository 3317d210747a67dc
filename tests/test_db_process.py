"""The database worker's own timer (what the database process runs) and the process
worker itself: jobs and errors across the process boundary, jobs that cannot cross, and
a database process that dies under the server."""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.errors import Conflict
from bot.state import Step, Wait
from storage.process import DatabaseProcessError, ProcessWorker
from storage.store import Store
from storage.worker import TIMER, DbWorker
from tests.reliability.common import Server

GUARD = 10.0  # seconds; only a hung test waits this long


def fire(store: Store, now: float) -> tuple[list[str], float | None]:
    """A timer pass: expire what is due, come back at the next deadline."""
    fired = [wid for wid, _ in store.due_waits(now, 100)
             if store.claim(wid, "expired", now, due=True)]
    return fired, store.next_deadline()


def add_wait(store: Store, wait_id: str, deadline: float) -> None:
    """A job (module level: it pickles) that writes a pending wait."""
    conv = store.conversation("tg", wait_id, f"K-{wait_id}", 0)
    store.save(conv, Step(waits=[Wait(wait_id, "webview", "main", "pay", deadline, True)]), 0)


def refuse(store: Store) -> None:
    store.record_event("refused", 0)
    raise Conflict("already_resolved", "Accepted once.", outcome="success")


def state(store: Store, wait_id: str) -> str | None:
    wait = store.wait(wait_id)
    return wait.state if wait else None


def timer_worker(path: Path) -> tuple[DbWorker, queue.Queue[list[str]]]:
    passes: queue.Queue[list[str]] = queue.Queue()

    def answer(ran: list[Any]) -> None:
        for (_, _, reply), ok, value in ran:
            assert ok, value
            if reply == TIMER and value:
                passes.put(value)

    return DbWorker(Store(path), answer=answer, timer=fire), passes


def test_worker_timer_fires_overdue_waits_at_start_then_each_new_deadline(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "t.db")
    with store.transaction():
        add_wait(store, "overdue", time.time() - 60)  # came due while the server was down
        add_wait(store, "later", time.time() + 3600)
    store.close()
    worker, passes = timer_worker(tmp_path / "t.db")
    worker.start()
    try:
        assert passes.get(timeout=GUARD) == ["overdue"]
        # a job writes a wait that is already due: the worker, asleep until "later" (an
        # hour away), wakes up for it without anyone telling it but the store
        worker.submit(add_wait, ("soon", time.time() - 0.001), ("unused", None))
        assert passes.get(timeout=GUARD) == ["soon"]
        assert passes.empty()
    finally:
        worker.join()
    check = Store(tmp_path / "t.db")
    assert [state(check, w) for w in ("overdue", "soon", "later")] == [
        "expired", "expired", "pending"]


async def test_process_worker_runs_jobs_and_passes_errors_through(tmp_path: Path) -> None:
    worker = ProcessWorker(functools.partial(Store, tmp_path / "p.db"))
    await worker.open()
    try:
        assert worker.pid not in (None, os.getpid())
        await worker.run(add_wait, "W1", time.time() + 60)
        assert await worker.run(Store.wait, "nope") is None
        # an ApiError keeps its class, code and extras across the process boundary, and
        # its job's savepoint undid what it wrote
        with pytest.raises(Conflict) as refused:
            await worker.run(refuse)
        assert refused.value.status == 409 and refused.value.extra == {"outcome": "success"}
        assert await worker.run(Store.record_event, "refused", 1) is True
        # many jobs of one loop iteration: one frame there, grouped commits, every answer
        states = await asyncio.gather(*(worker.run(state, "W1") for _ in range(200)))
        assert states == ["pending"] * 200 and worker.jobs >= 203
        # a job that cannot be pickled fails alone, with a sentence that names it
        with pytest.raises(TypeError, match="cannot be sent to the database process"):
            await worker.run(lambda s: s.counts())
        assert (await worker.run(Store.counts))["waits_pending"] == 1
    finally:
        await worker.stop()
    assert worker.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(worker.pid, 0)  # the process ended with the worker


async def test_a_dead_database_process_fails_waiting_jobs_and_stops_the_server(
        tmp_path: Path) -> None:
    worker = ProcessWorker(functools.partial(Store, tmp_path / "p.db"))
    stopped = asyncio.Event()
    worker.on_exit = stopped.set  # the server's own: SIGTERM to itself
    await worker.open()
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(DatabaseProcessError):
        await asyncio.wait_for(worker.run(Store.counts), GUARD)
    await asyncio.wait_for(stopped.wait(), GUARD)
    with pytest.raises(DatabaseProcessError, match="not running"):
        await worker.run(Store.counts)
    await worker.stop()


async def test_a_database_that_cannot_open_is_a_clear_start_up_error(tmp_path: Path) -> None:
    worker = ProcessWorker(functools.partial(Store, tmp_path / "missing-dir" / "p.db"))
    with pytest.raises(DatabaseProcessError, match="did not start: unable to open") as info:
        await worker.open()
    assert info.value.reason == "unable to open database file"


def test_serve_exits_1_when_its_database_process_dies_and_ends_it_on_kill_9(
        tmp_path: Path, serve: Callable[..., Server]) -> None:
    """What a supervisor sees: `flowbot serve` stops with exit status 1 (so a restart-on-
    failure policy restarts it) when the database process dies, and a `kill -9` of the
    server leaves no database process behind."""
    for kill_server in (False, True):
        home = tmp_path / ("kill-server" if kill_server else "kill-db")
        home.mkdir()
        server = serve(home)
        server.start()
        assert server.proc is not None
        children = [int(pid) for task in Path(f"/proc/{server.proc.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        assert len(children) == 1
        if kill_server:
            server.kill9()
            assert _gone(children[0])
        else:
            os.kill(children[0], signal.SIGKILL)
            assert server.proc.wait(GUARD) == 1
            assert "stopped because the database process exited" in server.log.read_text()


def _gone(pid: int) -> bool:
    """The process ended (a zombie waiting for whoever adopted it counts as ended)."""
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "\nState:\tZ" in status:
            return True
        time.sleep(0.01)
    return False


async def test_closing_cancelled_as_the_database_process_exits_still_ends(
        tmp_path: Path) -> None:
    """Python 3.11's asyncio.wait_for returns the result, swallowing the cancellation, when
    the awaited process exits in the same loop iteration as the cancel: a shutdown that
    cancels the close then went on as if nothing happened. The close ends cancelled, and
    the writer lock is let go (the database process keeps its own copy until it ends)."""
    db = tmp_path / "p.db"
    worker = ProcessWorker(functools.partial(Store, db), lock=db)
    await worker.open()
    proc = worker._proc
    assert proc is not None
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.Event()

    async def wait() -> int:  # the process's exit, held until the test lets it through
        waiting.set()
        return await exited

    proc.wait = wait  # type: ignore[method-assign]
    task = asyncio.create_task(worker.stop())
    await asyncio.wait_for(waiting.wait(), GUARD)
    exited.set_result(0)  # the process exits...
    task.cancel()  # ...as the shutdown is cancelled
    done, _ = await asyncio.wait({task}, timeout=GUARD)
    assert task in done and task.cancelled()
    assert worker._held is None
    del proc.wait  # the real one again: the process ends on the closed socket
    assert await asyncio.wait_for(proc.wait(), GUARD) == 0


def test_no_library_code_uses_asyncio_wait_for() -> None:
    """The same bug, kept from coming back: every timeout in bot/, channels/ and storage/
    is an `asyncio.timeout` block."""
    root = Path(__file__).resolve().parent.parent
    found = [f"{path.relative_to(root)}:{n}"
             for folder in ("bot", "channels", "storage")
             for path in sorted((root / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if "asyncio.wait_for(" in line]
    assert found == []
