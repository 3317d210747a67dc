"""Benchmarks 1 and 2: `POST /webview/callback` and `POST /webhook` (the key in the body, and
the per-conversation URL `/webhook/<key>`) under load, against the two ceilings (a bare
aiohttp handler, bare SQLite claims), on a database of pending waits."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bench.claims import claim_rate, transition_rate
from bench.common import (
    LoadResult,
    Seeded,
    Server,
    bare_server,
    copy_db,
    count_states,
    flowbot_server,
    free_port,
    log,
    outbox_file,
    outbox_lines,
    pg_copy_of,
    read_ids,
    run_wrk,
    seed,
    table,
    template_db,
    wait_until,
    write_config,
)

PATHS = {"callback": "/webview/callback", "webhook": "/webhook", "webhook_url": "/webhook/"}
WEBHOOK_MODES = ("webhook", "webhook_url")


@dataclass
class Level:
    flowbot: LoadResult
    bare: LoadResult
    committed: int  # of the ids this level sent, how many waits are now resolved
    pg: LoadResult | None = None  # the same load on PostgreSQL (--storage)

    @property
    def ratio(self) -> float:
        return self.flowbot.rps / self.bare.rps if self.bare.rps else 0.0


def prepare(args: argparse.Namespace, mode: str) -> tuple[Path, Seeded]:
    """The run's database (a copy of the seeded template) and the ids to send."""
    workdir: Path = args.workdir
    template, ids = template_db(workdir, args.waits)
    db = copy_db(template, workdir / f"{mode}.db")
    if mode in WEBHOOK_MODES:
        n = args.webhook_waits
        log(f"adding {n:,} pending webhook waits")
        ids = seed(db, n, kind="webhook", ids_file=workdir / f"{mode}.ids", user_prefix="h")
    return db, ids


class _PgSide:
    """With `--storage postgresql://…`: a third server, flowbot on a PostgreSQL copy of the
    same database, loaded at each level right after flowbot on SQLite."""

    def __init__(self, args: argparse.Namespace, db: Path, mode: str) -> None:
        self.args, self.mode = args, mode
        self.url = ""
        self.first = 0
        self.committed: dict[int, int] = {}
        self.lines = self.transitions = 0
        self.server: Server | None = None
        if args.storage:
            self.url = pg_copy_of(db, args.storage, f"flowbot_bench_{mode}")

    def __enter__(self) -> _PgSide:
        if self.url:
            self.port = free_port()
            workdir: Path = self.args.workdir
            config = write_config(workdir, self.url, self.port, f"{self.mode}-pg")
            self.server = flowbot_server(config, self.port,
                                         workdir / f"{self.mode}-pg-server.log").start()
            log(f"{self.mode}: flowbot on PostgreSQL up in {self.server.startup_s:.2f} s")
        return self

    def level(self, c: int, ids: Seeded) -> LoadResult | None:
        if self.server is None:
            return None
        if c == self.args.concurrency[0] and self.first == 0:  # warm up like the others
            warm = run_wrk(self._url(), mode=self.mode, concurrency=16, seconds=1, ids=ids,
                           first=0, server_pid=self.server.pid)
            self.first += warm.used
        r = run_wrk(self._url(), mode=self.mode, concurrency=c, seconds=self.args.seconds,
                    ids=ids, first=self.first, server_pid=self.server.pid)
        sent = read_ids(ids.ids_file, self.first, r.used)
        self.first += r.used
        table_ = "waits" if self.mode == "callback" else "conversations"
        committed = count_states(self.url, sent, table_).get("success", 0)
        if committed < r.requests - r.non_2xx or r.non_2xx or r.errors:
            raise SystemExit(f"PostgreSQL {self.mode} c={c}: {r.requests - r.non_2xx} answers "
                             f"200 but {committed} committed; {r.non_2xx} non-2xx")
        self.committed[c] = committed
        return r

    def _url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATHS[self.mode]}"

    def __exit__(self, *exc: object) -> None:
        if self.server is None:
            return
        if not any(exc):
            resolved = count_states(self.url, self._sent_ids(), "waits" if self.mode ==
                                    "callback" else "conversations")
            self.transitions = resolved.get("success", 0)
            jsonl = outbox_file(self.args.workdir, f"{self.mode}-pg")
            wait_until(lambda: outbox_lines(jsonl) >= self.transitions, 60)
            self.lines = outbox_lines(jsonl)
        self.server.stop()

    def _sent_ids(self) -> list[str]:
        ids_file = (self.args.workdir / "webhook.ids" if self.mode == "webhook"
                    else self.args.workdir / f"template-{self.args.waits}.ids")
        return read_ids(ids_file, 0, self.first)


def run(args: argparse.Namespace, mode: str) -> dict[str, object]:
    workdir: Path = args.workdir
    db, ids = prepare(args, mode)
    port, bport = free_port(), free_port()
    config = write_config(workdir, db, port, mode)
    jsonl = outbox_file(workdir, mode)
    path = PATHS[mode]
    levels: list[Level] = []
    first = 0
    pg = _PgSide(args, db, mode)
    with flowbot_server(config, port, workdir / f"{mode}-server.log") as srv, \
            bare_server(bport, workdir / "bare.log") as bare, pg:
        log(f"{mode}: flowbot up in {srv.startup_s:.2f} s with "
            f"{args.waits + (args.webhook_waits if mode in WEBHOOK_MODES else 0):,} pending waits")
        warm = run_wrk(f"http://127.0.0.1:{port}{path}", mode=mode, concurrency=16,
                       seconds=1, ids=ids, first=first, server_pid=srv.pid)
        first += warm.used
        run_wrk(f"http://127.0.0.1:{bport}{path}", mode=mode, concurrency=16, seconds=1)
        for c in args.concurrency:
            # the two servers take turns at each level, so both see the same machine
            fb = run_wrk(f"http://127.0.0.1:{port}{path}", mode=mode, concurrency=c,
                         seconds=args.seconds, ids=ids, first=first, server_pid=srv.pid)
            sent = read_ids(ids.ids_file, first, fb.used)
            first += fb.used
            states = count_states(db, sent, "waits" if mode == "callback" else "conversations")
            committed = states.get("success", 0)
            ok = fb.requests - fb.non_2xx
            if committed < ok or fb.non_2xx or fb.errors:
                raise SystemExit(f"{mode} c={c}: {ok} answers 200 but {committed} committed; "
                                 f"{fb.non_2xx} non-2xx, {fb.errors} socket errors")
            b = run_wrk(f"http://127.0.0.1:{bport}{path}", mode=mode, concurrency=c,
                        seconds=args.seconds, server_pid=bare.pid)
            levels.append(Level(fb, b, committed, pg.level(c, ids)))
            log(f"{mode} c={c}: flowbot {fb.rps:,.0f}/s p99 {fb.p99_ms:.1f} ms, "
                f"bare {b.rps:,.0f}/s → {fb.rps / b.rps:.0%}"
                + (f"; PostgreSQL {levels[-1].pg.rps:,.0f}/s" if levels[-1].pg else ""))
        resolved = count_states(db, read_ids(ids.ids_file, 0, first),
                                "waits" if mode == "callback" else "conversations")
        transitions = resolved.get("success", 0)
        delivered = wait_until(lambda: outbox_lines(jsonl) >= transitions, 60)
        lines = outbox_lines(jsonl)
    claims: list[tuple[int, float]] = []
    db_path = 0.0
    if mode == "callback":
        for group in args.claim_groups:
            chunk = read_ids(ids.ids_file, first, args.claims)
            first += len(chunk)
            rate, won = claim_rate(db, chunk, group)
            if won != len(chunk):
                raise SystemExit(f"claims: only {won} of {len(chunk)} waits were pending")
            claims.append((group, rate))
        chunk = read_ids(ids.ids_file, first, args.claims)
        first += len(chunk)
        db_path = transition_rate(config, chunk, 64)

    print(f"\n### {mode}: POST {path} — {args.waits:,} pending WebView waits"
          + (f" + {args.webhook_waits:,} Webhook waits (10 mapped fields)"
             if mode in WEBHOOK_MODES else "") + f", {args.seconds:g} s per level\n")
    print(table(
        ["c", "flowbot req/s", "p50 ms", "p99 ms", "bare req/s", "bare p50", "bare p99",
         "flowbot/bare", "200s", "committed", "server CPU"],
        [[lv.flowbot.concurrency, lv.flowbot.rps, lv.flowbot.p50_ms, lv.flowbot.p99_ms,
          lv.bare.rps, lv.bare.p50_ms, lv.bare.p99_ms, f"{lv.ratio:.0%}",
          lv.flowbot.requests - lv.flowbot.non_2xx, lv.committed,
          f"{lv.flowbot.server_cpu:.2f}"] for lv in levels]))
    print(f"\nEvery 200 committed (each level: resolved waits ≥ 200 answers). Messages "
          f"delivered to the file channel: {lines:,} for {transitions:,} transitions"
          f"{'' if delivered else ' (NOT all delivered within 60 s)'}.")
    if claims:
        print("\nBare SQLite claims on the same database (one conditional UPDATE per "
              "executionId, WAL, synchronous=NORMAL):\n")
        print(table(["claims per COMMIT", "claims/s"], claims))
        print(f"\nWhole callback transitions through the database process, no HTTP, 64 at a "
              f"time: {db_path:,.0f}/s.")
    if pg.url:
        print(f"\n### {mode} on PostgreSQL (`--storage`, same run, same waits copied in): "
              "flowbot on SQLite vs PostgreSQL\n")
        print(table(
            ["c", "SQLite req/s", "SQLite p99 ms", "PostgreSQL req/s", "PG p50 ms", "PG p99 ms",
             "PG/SQLite", "PG 200s", "PG committed", "flowbot CPU (PG)"],
            [[lv.flowbot.concurrency, lv.flowbot.rps, lv.flowbot.p99_ms, lv.pg.rps,
              lv.pg.p50_ms, lv.pg.p99_ms,
              f"{lv.pg.rps / lv.flowbot.rps:.0%}" if lv.flowbot.rps else "-",
              lv.pg.requests - lv.pg.non_2xx, pg.committed.get(lv.flowbot.concurrency, 0),
              f"{lv.pg.server_cpu:.2f}"] for lv in levels if lv.pg is not None]))
        print(f"\nPostgreSQL: every 200 committed; messages delivered {pg.lines:,} for "
              f"{pg.transitions:,} transitions. Its server's CPU (the postgres backends) is "
              "not in the flowbot CPU column.")
    at64 = next((lv for lv in levels if lv.flowbot.concurrency == 64), None)
    summary: dict[str, object] = {"levels": levels, "claims": claims, "db_path": db_path,
                                  "delivered": delivered, "transitions": transitions}
    if at64 is not None:
        summary["ratio64"] = at64.ratio
        summary["p99_64"] = at64.flowbot.p99_ms
        print(f"\nAt c=64: {at64.ratio:.0%} of the bare handler (target ≥ 50 %: "
              f"{'met' if at64.ratio >= 0.5 else 'missed'}), p99 {at64.flowbot.p99_ms:.1f} ms "
              f"(target < 20 ms: {'met' if at64.flowbot.p99_ms < 20 else 'missed'}).")
    return summary
