"""Where the callback path's time goes: CPU per request of each server thread, and a py-spy
profile (`pip install py-spy`) sorted into the parts of the path. `python -m bench profile`."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from bench.common import (
    copy_db,
    flowbot_server,
    free_port,
    log,
    run_wrk,
    table,
    template_db,
    write_config,
)

# (part, frames that mark it); the first match wins, checked from the top of the list
PARTS = [
    ("outbox: delivery to the channel", ("Outbox.", "FileChannel.")),
    ("DB thread: SQLite COMMIT (WAL write, checkpoints)", ("Store.commit",)),
    ("DB thread: callback transition (SQL, engine, JSON)", ("Runtime.webview_callback.<locals>"
                                                           ".job",)),
    ("DB thread: other jobs, savepoints, hand-off", ("DbWorker._loop",)),
    ("loop: our handler (parse, runtime, answer)", ("bot/http_api.py",)),
    ("loop: aiohttp HTTP (parse, route, write)", ("RequestHandler", "_SelectorSocketTransport",
                                                  "Application._handle")),
    ("loop: waiting in epoll", ("select (selectors",)),
]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the event loop's thread and of the others (the DB worker's, mostly)."""
    out: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        out["event loop (main thread)" if tid == str(pid) else "other threads (DB worker)"] += \
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
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
        cpu0 = thread_cpu(srv.pid)
        sampler = None
        if spy:
            sampler = subprocess.Popen(
                [spy, "record", "--pid", str(srv.pid), "--format", "raw", "-o", str(raw),
                 "--duration", str(int(args.seconds)), "--rate", "200", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = run_wrk(url, mode="callback", concurrency=64, seconds=args.seconds, ids=ids,
                    first=warm.used, server_pid=srv.pid)
        cpu1 = thread_cpu(srv.pid)
        if sampler is not None:
            sampler.wait(60)
    per_thread = [[name, (cpu1[name] - cpu0.get(name, 0)) / r.requests * 1e6]
                  for name in cpu1 if cpu1[name] - cpu0.get(name, 0) > 0.05]
    print(f"\n### profile: callback path at c=64, {r.rps:,.0f} req/s\n")
    print(table(["thread", "CPU µs per request"], per_thread))
    if not spy:
        log("py-spy is not installed (pip install py-spy): no breakdown")
        return {"per_thread": per_thread}
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        name = next((part for part, marks in PARTS if any(m in stack for m in marks)), "other")
        parts[name] += n
    print("\npy-spy samples of both threads (a thread waiting for the GIL counts as busy):\n")
    print(table(["part of the path", "share of samples"],
                [[name, f"{n / total:.0%}"] for name, n in parts.most_common()]))
    return {"per_thread": per_thread, "parts": dict(parts)}
