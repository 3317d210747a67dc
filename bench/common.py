"""Shared pieces of the benchmarks: the bench config, seeding, server processes, wrk, tables."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.store import Store

HERE = Path(__file__).resolve().parent
ID_WIDTH = 24  # secrets.token_urlsafe(18) is 24 characters, like the runtime's ids
LINE = ID_WIDTH + 1  # one id per line in the ids files the wrk script seeks into
FAR = 30 * 86400.0  # deadline of the seeded waits that must not expire during a run

BENCH_FLOWS = """
[bot]
start_flow = "main"

[flows.main]
start = "pay"

[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Press the button to pay."
button = "Pay"
expiration = 86400
response_variable = "payment"
on_success = "paid"
on_error = "failed"
on_expired = "expired"

[flows.main.blocks.paid]
type = "end"
text = "Payment received, reference {{payment.ref}}."

[flows.main.blocks.failed]
type = "end"
text = "The payment failed."

[flows.main.blocks.expired]
type = "end"
text = "The payment page expired."

[flows.hook]
start = "order"

[flows.hook.blocks.order]
type = "webhook"
timeout = 300
map = { f0 = "order.f0", f1 = "order.f1", f2 = "order.f2", f3 = "order.f3", f4 = "order.f4", \
f5 = "order.f5", f6 = "order.f6", f7 = "order.f7", f8 = "order.f8", f9 = "order.f9" }
on_success = "got"
on_failure = "lost"

[flows.hook.blocks.got]
type = "end"
text = "Order {{f0}} is {{f1}}."

[flows.hook.blocks.lost]
type = "end"
text = "No webhook arrived."
""".replace("\\\n", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(workdir: Path, db: Path | str, port: int, name: str = "bench",
                 extra: str = "") -> Path:
    """A server config on `db` (a SQLite file, or a postgresql:// URL) whose file channel
    starts empty: the database is a fresh copy, so its outbox ids start over, and the
    channel would take them for re-sends."""
    path = workdir / f"{name}.toml"
    where = f'url = "{db}"' if isinstance(db, str) else f'path = "{db}"'
    outbox_file(workdir, name).unlink(missing_ok=True)
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
public_url = "http://127.0.0.1:{port}"

[storage]
{where}

[channels.web]
enabled = false

[channels.file]
enabled = true
path = "{outbox_file(workdir, name)}"
""" + extra + BENCH_FLOWS)
    return path


def outbox_file(workdir: Path, name: str) -> Path:
    return workdir / f"{name}-outbox.jsonl"


# -- seeding -----------------------------------------------------------------------------


@dataclass
class Seeded:
    """Ids a load generator may use: executionIds (webview) or conversation keys (webhook)."""

    ids_file: Path
    count: int


def _fast(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA cache_size=-400000")  # 400 MB while seeding only


def seed(db: Path, n: int, *, kind: str, ids_file: Path, deadlines: Iterable[float] | None = None,
         user_prefix: str = "u") -> Seeded:
    """Add `n` conversations, each waiting at the bench flow's webview or webhook block.

    Rows go in with raw executemany in one transaction (what the runtime would write,
    without running the engine a million times). The load generator's ids are written
    to `ids_file` in random order, so lookups hit the B-tree as real traffic does.
    """
    store = Store(db)
    _fast(store.conn)
    now = time.time()
    flow, block = ("main", "pay") if kind == "webview" else ("hook", "order")
    wait_ids = sorted(secrets.token_urlsafe(18) for _ in range(n))
    keys = [secrets.token_urlsafe(18) for _ in range(n)]
    dl = list(deadlines) if deadlines is not None else [now + FAR] * n
    start = store.conn.execute("SELECT coalesce(max(id), 0) FROM conversations").fetchone()[0] + 1
    variables = json.dumps({"channel": "file"})
    with store.transaction():
        store.conn.executemany(
            "INSERT INTO conversations (id, channel, user_id, key, flow, block, wait_id, "
            "variables, version, created, updated) VALUES (?, 'file', ?, ?, ?, ?, ?, ?, 1, ?, ?)",
            ((start + i, f"{user_prefix}{start + i}", keys[i], flow, block, wait_ids[i],
              variables, now, now) for i in range(n)))
        store.conn.executemany(
            "INSERT INTO waits (id, conversation_id, kind, flow, block, deadline, blocking, "
            "created) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
            ((wait_ids[i], start + i, kind, flow, block, dl[i], now) for i in range(n)))
    store.close()
    wanted = wait_ids if kind == "webview" else keys
    order = list(range(n))
    random.shuffle(order)
    with ids_file.open("w") as f:
        f.writelines(wanted[i] + "\n" for i in order)
    return Seeded(ids_file, n)


def read_ids(ids_file: Path, first: int, count: int) -> list[str]:
    with ids_file.open("rb") as f:
        f.seek(first * LINE)
        return f.read(count * LINE).decode().split()


def template_db(workdir: Path, n: int) -> tuple[Path, Seeded]:
    """A DB with `n` pending webview waits, seeded once per size and copied per run."""
    db = workdir / f"template-{n}.db"
    ids = workdir / f"template-{n}.ids"
    if not (db.exists() and ids.exists()):
        for p in (db, ids):
            p.unlink(missing_ok=True)
        t = time.perf_counter()
        seed(db, n, kind="webview", ids_file=ids)
        con = sqlite3.connect(db)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        log(f"seeded {n:,} pending webview waits in {time.perf_counter() - t:.1f} s")
    return db, Seeded(ids, n)


def copy_db(src: Path, dst: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{dst}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(src, dst)
    return dst


# -- processes ---------------------------------------------------------------------------


def with_children(pid: int) -> list[int]:
    """The process and its children: `flowbot serve` and its database process."""
    pids = [pid]
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(c) for c in children.read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) one process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds a process and its children have used so far."""
    return sum(cpu_seconds(p) for p in with_children(pid))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children."""
    total = 0
    for p in with_children(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total / 1024


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@dataclass
class Server:
    """A server process on 127.0.0.1 (flowbot serve, or the bare handler)."""

    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    def start(self) -> Server:
        t = time.perf_counter()
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        wait_http(f"http://127.0.0.1:{self.port}/healthz", self.proc)
        self.startup_s = time.perf_counter() - t
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def flowbot_server(config: Path, port: int, log_path: Path) -> Server:
    exe = shutil.which("flowbot")
    argv = [exe] if exe else [sys.executable, "-m", "bot.cli"]
    return Server([*argv, "serve", "--config", str(config)], port, log_path)


def bare_server(port: int, log_path: Path) -> Server:
    return Server([sys.executable, "-m", "bench.bare", str(port)], port, log_path)


# -- wrk ---------------------------------------------------------------------------------


@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    seconds: float
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    used: int  # ids consumed (requests issued, including ones cut off at the end)
    server_cpu: float = 0.0  # CPU seconds per wall second (1.0 = one core)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(url: str, *, mode: str, concurrency: int, seconds: float, ids: Seeded | None = None,
            first: int = 0, label: str = "", server_pid: int | None = None,
            threads: int = 1, line: int = LINE, secret: str = "") -> LoadResult:
    """One wrk run; every request carries the next unused id from `ids` (from `first`)."""
    threads = max(1, min(threads, concurrency))
    per_thread = 0
    if ids is not None:
        per_thread = (ids.count - first) // threads
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_IDS": str(ids.ids_file) if ids else "",
           "BENCH_FIRST": str(first), "BENCH_PER_THREAD": str(per_thread),
           "BENCH_LINE": str(line), "BENCH_SECRET": secret}
    cpu0 = proc_cpu(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s",
         "--timeout", "10s", "-s", str(HERE / "post.lua"), url],
        env=env, capture_output=True, text=True, timeout=seconds + 60, check=False)
    wall = time.perf_counter() - t0
    cpu = (proc_cpu(server_pid) - cpu0) / wall if server_pid else 0.0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    doc = json.loads(line[6:])
    used = sum(doc["used"])
    if ids is not None and any(u >= per_thread for u in doc["used"]):
        raise RuntimeError(f"wrk ran out of ids ({used:,} used); seed more waits or run shorter")
    return LoadResult(label, concurrency, doc["requests"], doc["duration_us"] / 1e6,
                      doc["non2xx"], doc["errors"], doc["p50_us"] / 1000, doc["p99_us"] / 1000,
                      doc["max_us"] / 1000, used, cpu)


def count_states(db: Path | str, ids: Sequence[str], table: str = "waits",
                 column: str = "id") -> dict[str, int]:
    """How many of these rows are in each state (read-only; the server may be running)."""
    if isinstance(db, str):
        return _count_states_pg(db, ids, table)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out: dict[str, int] = {}
    try:
        for i in range(0, len(ids), 10_000):
            chunk = ids[i:i + 10_000]
            marks = ",".join("?" * len(chunk))
            if table == "waits":
                sql = f"SELECT state, count(*) FROM waits WHERE id IN ({marks}) GROUP BY state"
            else:  # conversation keys → their (one) seeded wait
                sql = ("SELECT w.state, count(*) FROM conversations c JOIN waits w "
                       f"ON w.conversation_id = c.id WHERE c.key IN ({marks}) GROUP BY w.state")
            for state, n in con.execute(sql, chunk):
                out[state] = out.get(state, 0) + n
    finally:
        con.close()
    return out


def outbox_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def wait_until(pred: Any, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


# -- output ------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, so the output pastes into bench/README.md as is."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- PostgreSQL (--storage postgresql://…) -------------------------------------------------


def _count_states_pg(url: str, ids: Sequence[str], table: str) -> dict[str, int]:
    import psycopg

    if table == "waits":
        sql = "SELECT state, count(*) FROM waits WHERE id = ANY(%s) GROUP BY state"
    else:
        sql = ("SELECT w.state, count(*) FROM conversations c JOIN waits w "
               "ON w.conversation_id = c.id WHERE c.key = ANY(%s) GROUP BY w.state")
    with psycopg.connect(url) as conn:
        return {state: n for state, n in conn.execute(sql, (list(ids),))}


def pg_copy_of(sqlite_db: Path, admin_url: str, name: str) -> str:
    """A fresh PostgreSQL database `name` (on the server of `admin_url`) holding what the
    SQLite file holds, through `flowbot migrate-storage`'s copy; its URL."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from storage.migrate import copy_sqlite_to_postgres

    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(admin_url)._replace(path="/" + name))
    t = time.perf_counter()
    copied = copy_sqlite_to_postgres(sqlite_db, url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        try:  # the copy's WAL and dirty pages flushed now, not during the measurement
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            log("CHECKPOINT refused (needs superuser or pg_checkpoint): the copy's "
                "checkpoint may fall into the measurement")
    log(f"copied {copied.pending_waits:,} pending waits into PostgreSQL database {name} "
        f"in {time.perf_counter() - t:.1f} s")
    return url
