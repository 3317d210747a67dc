"""The ceiling for the SQLite side: one conditional UPDATE per executionId, grouped commits.

The same statement the runtime's claim runs, on the same database file, with the same
pragmas (WAL, synchronous=NORMAL), from one thread, `group` claims per COMMIT.
"""

from __future__ import annotations

import time
from pathlib import Path

from storage.store import Store


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
