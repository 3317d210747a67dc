"""Benchmark 4: resident memory and start-up time with 0, N/10 and N pending waits; with
`--storage postgresql://…` on PostgreSQL copies of the same databases too, same run."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import (
    copy_db,
    flowbot_server,
    free_port,
    log,
    pg_copy_of,
    rss_mb,
    seed,
    table,
    template_db,
    write_config,
)
from storage.store import Store

STARTS = 3  # start-ups per size; the median is reported


def _db(workdir: Path, n: int, full: int) -> Path:
    db = workdir / f"scale-{n}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if n == full:
        template, _ = template_db(workdir, full)
        return copy_db(template, db)
    if n == 0:
        Store(db).close()
    else:
        seed(db, n, kind="webview", ids_file=workdir / f"scale-{n}.ids")
    return db


def run(args: argparse.Namespace) -> dict[str, object]:
    """On SQLite; with `--storage postgresql://…` then on PostgreSQL copies of the same
    databases, in the same run."""
    workdir: Path = args.workdir
    sizes = [0, args.waits // 10, args.waits]
    dbs = {n: _db(workdir, n, args.waits) for n in sizes}
    result = _measure(args, {n: db for n, db in dbs.items()}, "SQLite")
    if args.storage:
        urls: dict[int, Path | str] = {
            n: pg_copy_of(db, args.storage, f"flowbot_bench_scale_{i}")
            for i, (n, db) in enumerate(dbs.items())}
        result["postgresql"] = _measure(args, urls, "PostgreSQL")
    return result


def _measure(args: argparse.Namespace, dbs: dict[int, Path | str], backend: str
             ) -> dict[str, object]:
    workdir: Path = args.workdir
    sizes = list(dbs)
    rows = []
    results: dict[int, tuple[float, float]] = {}
    for n, db in dbs.items():
        starts, rss, settled = [], [], []
        for _ in range(STARTS):
            port = free_port()
            config = write_config(workdir, db, port, f"scale-{n}")
            with flowbot_server(config, port, workdir / "scale-server.log") as srv:
                starts.append(srv.startup_s)
                rss.append(rss_mb(srv.pid))
                time.sleep(1.0)  # the timer's first pass and the outbox have run
                settled.append(rss_mb(srv.pid))
        startup, mem = statistics.median(starts), statistics.median(settled)
        results[n] = (startup, mem)
        rows.append([n, startup * 1000, max(starts) * 1000, statistics.median(rss), mem,
                     _size_mb(db)])
        log(f"scale {backend} {n:,}: start-up {startup * 1000:.0f} ms, RSS {mem:.1f} MB")
    print(f"\n### scale on {backend}: start-up (process start → /healthz answers) and RSS "
          f"of flowbot's processes, median of {STARTS} starts\n")
    print(table(["pending waits", "start-up ms", "worst ms", "RSS at /healthz MB",
                 "RSS 1 s later MB", "database MB"], rows))
    growth = results[sizes[-1]][1] - results[0][1]
    slowest = max(s for s, _ in results.values())
    print(f"\nRSS grows {growth:.1f} MB from 0 to {sizes[-1]:,} pending waits (target < 30 MB: "
          f"{'met' if growth < 30 else 'missed'}); slowest start-up {slowest * 1000:.0f} ms "
          f"(target < 2 s: {'met' if slowest < 2 else 'missed'})."
          + (" PostgreSQL's own memory (its backends, shared buffers) is not in the RSS."
             if backend == "PostgreSQL" else ""))
    return {"growth_mb": growth, "startup_s": slowest, "rows": rows}


def _size_mb(db: Path | str) -> float:
    """The SQLite file's size, or pg_database_size of the PostgreSQL database, in MiB."""
    if isinstance(db, Path):
        return db.stat().st_size / 2**20
    import psycopg

    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return float(row[0]) / 2**20 if row else float("nan")
