"""Where the callback path's time goes: CPU per request of the server and its database
process, and a py-spy profile of both (`pip install py-spy`) sorted into the parts of the
path. `python -m bench profile`."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from bench.common import (
    copy_db,
    cpu_seconds,
    flowbot_server,
    free_port,
    log,
    run_wrk,
    table,
    template_db,
    with_children,
    write_config,
)

# (part, frames that mark it); the first match wins, checked from the top of the list
PARTS = [
    ("server: outbox, delivery to the channel", ("Outbox.", "FileChannel.")),
    ("server: hand-off to the database process", ("ProcessWorker.", "storage/process.py")),
    ("server: our handler (parse, runtime, answer)", ("bot/http_api.py", "Runtime.")),
    ("server: aiohttp HTTP (parse, route, write)", ("RequestHandler", "StreamWriter",
                                                    "Application._handle", "run_app")),
    ("DB process: COMMIT (WAL write)", ("Store.commit",)),
    ("DB process: WAL checkpoints (a thread of their own)", ("Checkpointer.",)),
    ("DB process: callback transition (SQL, engine, JSON)", ("Ledger.webview_callback",)),
    ("DB process: outbox reads and marks", ("Store.pending_by_channel", "Store.mark_all_sent")),
    ("DB process: savepoints, batches, answers", ("DbWorker.", "main.<locals>.answer")),
]
IDLE = ("select (selectors", "_do_waitpid", "readinto (socket", "wait (threading")


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the server process and of its children (the database process)."""
    out: Counter[str] = Counter()
    for p in with_children(pid):
        out["server (event loop)" if p == pid else "database process"] += cpu_seconds(p)
    return dict(out)


def run(args: argparse.Namespace) -> dict[str, object]:
    workdir: Path = args.workdir
    template, ids = template_db(workdir, args.waits)
    db = copy_db(template, workdir / "profile.db")
    port = free_port()
    config = write_config(workdir, db, port, "profile")
    spy = shutil.which("py-spy")
    raw = workdir / "profile.txt"
    with flowbot_server(config, port, workdir / "profile-server.log") as srv:
        url = f"http://127.0.0.1:{port}/webview/callback"
        warm = run_wrk(url, mode="callback", concurrency=64, seconds=2, ids=ids,
                       server_pid=srv.pid)
        cpu0 = process_cpu(srv.pid)
        samplers = []
        if spy:
            samplers = [subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--format", "raw", "-o", f"{raw}.{i}",
                 "--duration", str(int(args.seconds)), "--rate", "200", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for i, pid in enumerate(with_children(srv.pid))]
        r = run_wrk(url, mode="callback", concurrency=64, seconds=args.seconds, ids=ids,
                    first=warm.used, server_pid=srv.pid)
        cpu1 = process_cpu(srv.pid)
        for sampler in samplers:
            sampler.wait(60)
    per_thread = [[name, (cpu1[name] - cpu0.get(name, 0)) / r.requests * 1e6]
                  for name in cpu1 if cpu1[name] - cpu0.get(name, 0) > 0.05]
    print(f"\n### profile: callback path at c=64, {r.rps:,.0f} req/s\n")
    print(table(["process", "CPU µs per request"], per_thread))
    if not spy:
        log("py-spy is not installed (pip install py-spy): no breakdown")
        return {"per_thread": per_thread}
    parts: Counter[str] = Counter()
    total = 0
    lines = [line for i in range(len(samplers))
             for line in Path(f"{raw}.{i}").read_text().splitlines()]
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if any(mark in stack.rsplit(";", 1)[-1] for mark in IDLE):
            continue  # a thread asleep in a system call
        n = int(count)
        total += n
        name = next((part for part, marks in PARTS if any(m in stack for m in marks)), "other")
        parts[name] += n
    print("\npy-spy samples of both processes, idle waits left out:\n")
    print(table(["part of the path", "share of samples"],
                [[name, f"{n / total:.0%}"] for name, n in parts.most_common()]))
    return {"per_thread": per_thread, "parts": dict(parts)}
