"""The ceilings on the database side, on the same database file: bare SQLite claims (one
conditional UPDATE per executionId, the statement the runtime's claim runs, same pragmas,
`group` claims per COMMIT), and whole callback transitions through the database process
with no HTTP in front (what the callback path would reach if HTTP cost nothing).
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

from bot.config import load_config
from bot.ledger import Ledger
from bot.server import new_event_loop
from storage.process import ProcessWorker
from storage.store import SQLiteLedger, Store


def claim_rate(db: Path, ids: list[str], group: int) -> tuple[float, int]:
    """Claims per second over `ids`, and how many of them changed a row."""
    store = Store(db)
    conn = store.conn
    won = 0
    t = time.perf_counter()
    for i in range(0, len(ids), group):
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        for wid in ids[i:i + group]:
            cur = conn.execute(
                "UPDATE waits SET state = ?, resolved_at = ? "
                "WHERE id = ? AND state = 'pending' AND deadline > ?",
                ("success", now, wid, now))
            won += cur.rowcount
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t
    store.close()
    return len(ids) / elapsed, won


def transition_rate(config: Path, ids: list[str], concurrency: int) -> float:
    """Callback transitions per second through the database process, `concurrency` at a
    time, from an event loop in this process: the callback path without its HTTP."""
    cfg = load_config(config)

    async def run() -> float:
        worker = ProcessWorker(functools.partial(SQLiteLedger, cfg.storage.path, cfg, {}))
        await worker.open()
        todo = iter(ids)

        async def client() -> None:
            for eid in todo:
                await worker.run(Ledger.webview_callback, eid, True, {"ref": "R"}, None,
                                 time.time())

        t = time.perf_counter()
        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            await worker.stop()
        return len(ids) / (time.perf_counter() - t)

    loop = new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()
