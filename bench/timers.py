"""Benchmark 3: lateness of expiries (deadline → committed) while callbacks load the server;
with `--storage postgresql://…` on PostgreSQL too, in the same run."""

from __future__ import annotations

import argparse
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    LoadResult,
    Seeded,
    copy_db,
    flowbot_server,
    free_port,
    log,
    pg_copy_of,
    run_wrk,
    seed,
    table,
    template_db,
    wait_until,
    write_config,
)

LEAD = 8.0  # seconds between seeding and the first deadline: start-up plus margin


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def run(args: argparse.Namespace) -> dict[str, object]:
    """On SQLite; with `--storage postgresql://…` then on a PostgreSQL copy of the same
    database (same waits, same timers rebased to a fresh window), in the same run."""
    workdir: Path = args.workdir
    template, load_ids = template_db(workdir, args.waits)
    result = _run_on(args, template, load_ids, postgres=False)
    if args.storage:
        result["postgresql"] = _run_on(args, template, load_ids, postgres=True)
    return result


def _run_on(args: argparse.Namespace, template: Path, load_ids: Seeded, *,
            postgres: bool) -> dict[str, object]:
    workdir: Path = args.workdir
    name = "timers-pg" if postgres else "timers"
    db = copy_db(template, workdir / f"{name}.db")
    prune = 0 if postgres else getattr(args, "prune", 0)  # migrate-storage leaves old rows
    if prune:
        seed_old(db, prune)
    n, window = args.timers, args.timer_window
    lead = getattr(args, "timer_lead", LEAD)
    start = time.time() + lead
    deadlines = sorted(start + random.random() * window for _ in range(n))
    log(f"{name}: {n:,} waits falling due over {window:g} s, load c={args.timer_load}")
    seed(db, n, kind="webview", ids_file=workdir / f"{name}.ids",
         deadlines=deadlines, user_prefix="t")
    where: Path | str = db
    if postgres:
        where = pg_copy_of(db, args.storage, "flowbot_bench_timers")
        shift = time.time() + lead - start  # the copy took time: the same window, later
        _rows(where, "UPDATE waits SET deadline = deadline + %s FROM conversations c WHERE "
              "c.id = waits.conversation_id AND c.user_id LIKE 't%%'", (shift,))
        start += shift
    port = free_port()
    # the first pruning round starts about when the window does (start-up takes some of
    # the lead), so the deletions overlap the expiries and callbacks being measured
    every = int(max(1.0, start - time.time() - 2))
    config = write_config(workdir, where, port, name,
                          f"\n[retention]\nevery_seconds = {every}\n" if prune else "")
    load: list[LoadResult] = []
    progress: list[int] = []  # old event ids left at the window's start and end
    with flowbot_server(config, port, workdir / f"{name}-server.log") as srv:
        if time.time() > start:
            log("warning: the server started after the first deadline; lateness includes it")
        load_for = start + window + 2 - time.time()
        if args.timer_load:
            thread = threading.Thread(target=lambda: load.append(run_wrk(
                f"http://127.0.0.1:{port}/webview/callback", mode="callback",
                concurrency=args.timer_load, seconds=load_for, ids=load_ids,
                server_pid=srv.pid)))
            thread.start()
            if prune:  # how far the pruning got when the window began and ended
                for at in (start, start + window):
                    time.sleep(max(0.0, at - time.time()))
                    progress.append(_old_events(db))
            thread.join(load_for + 90)
            if not load:
                raise SystemExit("timers: the callback load failed; see the error above")
        else:
            time.sleep(max(0.0, load_for))

        def expired() -> int:
            return int(_rows(where, "SELECT count(*) FROM waits WHERE kind = 'webview' AND "
                             "state = 'expired'")[0][0])

        wait_until(lambda: expired() >= n, 30)
    late = sorted((r[0] * 1000, r[1] - start) for r in _rows(
        where, "SELECT w.resolved_at - w.deadline, w.deadline FROM waits w JOIN "
        "conversations c ON c.id = w.conversation_id WHERE c.user_id LIKE 't%%' "
        "AND w.state = 'expired'", ()))
    lateness = [ms for ms, _at in late]
    p50, p99 = _percentile(lateness, 50), _percentile(lateness, 99)
    worst = lateness[-1] if lateness else float("nan")
    rps = load[0].rps if load else 0.0
    print(f"\n### timers on {'PostgreSQL' if postgres else 'SQLite'}: {n:,} expiries due "
          f"over {window:g} s, callback load c={args.timer_load} on {args.waits:,} pending "
          "waits" + (f", pruning {prune:,} old rows of each kind meanwhile" if prune else "")
          + "\n")
    print(table(["expired", "lateness p50 ms", "p99 ms", "max ms", "callbacks/s meanwhile",
                 "callback p99 ms"],
                [[len(lateness), p50, p99, worst, rps, load[0].p99_ms if load else "-"]]))
    met = p99 < 20 and worst < 100
    print(f"\nTarget p99 < 20 ms and max < 100 ms: {'met' if met else 'missed'}."
          f"{'' if len(lateness) == n else f' ONLY {len(lateness)} of {n} expired.'}")
    over = [(ms, at) for ms, at in late if ms >= 20]
    if over:  # when in the window: one stall late many at once, or scattered pauses
        stalls = sorted({round(at, 1) for _ms, at in over})
        print(f"{len(over)} expiries 20 ms or more late, due at {len(stalls)} moments "
              f"(s into the window): {', '.join(f'{t:g}' for t in stalls[:12])}"
              f"{' …' if len(stalls) > 12 else ''}.")
    if prune:
        at_start, at_end = progress or [-1, -1]
        print(f"Pruning: old event ids left at the window's start {at_start:,}, at its end "
              f"{at_end:,}, after the run {_old_events(db):,} (of {prune:,}; the outbox rows "
              "and ended waits go in the same rounds).")
    return {"expired": len(lateness), "p50": p50, "p99": p99, "max": worst, "rps": rps}


def _rows(db: Path | str, sql: str, args: tuple[object, ...] | None = None
          ) -> list[tuple[Any, ...]]:
    """Rows of one statement (`%s` placeholders, `%%` for a literal %) on the SQLite file
    or the PostgreSQL URL `db`; committed."""
    if isinstance(db, str):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            cur = conn.execute(sql, args)
            return cur.fetchall() if cur.description else []
    con = sqlite3.connect(db, timeout=30)
    try:
        with con:
            return con.execute(sql.replace("%%", "%").replace("%s", "?"), args or ()
                               ).fetchall()
    finally:
        con.close()


def _old_events(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT count(*) FROM events WHERE at < ?",
                               (time.time() - 50 * 86400,)).fetchone()[0])
    finally:
        con.close()


def seed_old(db: Path, n: int) -> None:
    """`n` processed event ids, `n` delivered outbox rows and `n` ended waits, 100 days old:
    work for the pruning that runs meanwhile."""
    old = time.time() - 100 * 86400
    con = sqlite3.connect(db)
    with con:
        con.executemany("INSERT INTO events (id, at) VALUES (?, ?)",
                        ((f"old:{i}", old) for i in range(n)))
        con.executemany(
            "INSERT INTO outbox (conversation_id, channel, user_id, message, state, "
            "next_attempt, created, sent_at) VALUES (0, 'file', 'old', '{\"text\":\"x\"}', "
            "'sent', ?, ?, ?)", ((old, old, old) for _ in range(n)))
        con.executemany(
            "INSERT INTO waits (id, conversation_id, kind, flow, block, deadline, blocking, "
            "state, created, resolved_at) VALUES (?, 0, 'webview', 'main', 'pay', ?, 1, "
            "'expired', ?, ?)", ((f"old{i}", old, old, old) for i in range(n)))
    con.close()

