"""`python -m bench callback|webhook|timers|scale|inbound|loadgen|profile|flood|all`: figures.
`--storage postgresql://…` runs callback, webhook, timers and scale on PostgreSQL too, in the
same run.

Everything runs on 127.0.0.1, each run bounded in time. Tables go to stdout (Markdown),
progress to stderr. See bench/README.md for the figures and what limits each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("which", choices=("callback", "webhook", "timers", "scale", "inbound",
                                     "loadgen", "profile", "flood", "all"))
    p.add_argument("--quick", action="store_true",
                   help="small and short: 200k waits, 3 s per level, 20k timers in 20 s")
    p.add_argument("--waits", type=int, default=1_000_000,
                   help="pending WebView waits seeded into the database (default 1,000,000)")
    p.add_argument("--webhook-waits", type=int, default=300_000,
                   help="pending Webhook waits added for the webhook benchmark")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each load level")
    p.add_argument("--concurrency", type=_ints, default=[1, 16, 64, 256])
    p.add_argument("--claims", type=int, default=50_000,
                   help="executionIds per group size in the bare SQLite claim benchmark")
    p.add_argument("--claim-groups", type=_ints, default=[1, 16, 64, 256])
    p.add_argument("--timers", type=int, default=100_000, help="waits falling due")
    p.add_argument("--timer-window", type=float, default=60.0,
                   help="seconds over which they fall due")
    p.add_argument("--timer-load", type=int, default=64,
                   help="callback concurrency during the timer benchmark (0: no load)")
    p.add_argument("--timer-lead", type=float, default=8.0,
                   help="timers: seconds from seeding to the first deadline (start-up time; "
                   "raise it on a loaded machine)")
    p.add_argument("--prune", type=int, default=0,
                   help="timers: also seed this many rows of each prunable kind, 100 days "
                   "old, and prune every second meanwhile (retention's cost; 0: off)")
    p.add_argument("--inbound-seconds", type=float, default=10.0)
    p.add_argument("--ws-attempts", type=int, default=20_000,
                   help="flood: WebSocket attempts from one client address")
    p.add_argument("--ws-parallel", type=int, default=500,
                   help="flood: WebSocket attempts under way at once")
    p.add_argument("--slowloris", type=int, default=1000,
                   help="flood: connections that send one header line at a time, forever")
    p.add_argument("--slow-interval", type=float, default=10.0,
                   help="flood: seconds between a slowloris client's header lines")
    p.add_argument("--flood-seconds", type=float, default=20.0,
                   help="flood: length of the baseline and of the flood")
    p.add_argument("--callback-concurrency", type=int, default=16,
                   help="flood: callbacks in flight during the baseline and the flood")
    p.add_argument("--flood-waits", type=int, default=200_000,
                   help="flood: pending waits seeded (the callbacks resolve them)")
    p.add_argument("--storage", default="", metavar="postgresql://…",
                   help="callback, webhook, timers, scale: also run flowbot on a PostgreSQL "
                   "copy of the same database (databases flowbot_bench_* are created on "
                   "that server)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where databases and logs go (default: a new temporary directory; "
                   "seeded templates are reused when the same directory is given again)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.waits = min(args.waits, 200_000)
        args.webhook_waits = min(args.webhook_waits, 100_000)
        args.seconds = min(args.seconds, 3.0)
        args.claims = min(args.claims, 10_000)
        args.timers = min(args.timers, 20_000)
        args.timer_window = min(args.timer_window, 20.0)
        args.inbound_seconds = min(args.inbound_seconds, 3.0)
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="flowbot-bench-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"# workdir {args.workdir}", file=sys.stderr)
    from bench import flood, inbound, loadgen, paths, profile, scale, timers

    started = time.monotonic()
    runs = {
        "callback": lambda: paths.run(args, "callback"),
        # the key in the body, then the per-conversation URL ({{webhook_url}})
        "webhook": lambda: [paths.run(args, mode) for mode in paths.WEBHOOK_MODES],
        "timers": lambda: timers.run(args),
        "scale": lambda: scale.run(args),
        "inbound": lambda: inbound.run(args),
        "loadgen": lambda: loadgen.run(args),
        "profile": lambda: profile.run(args),
        "flood": lambda: flood.run(args),
    }
    chosen = ["callback", "webhook", "timers", "scale", "inbound"] if args.which == "all" \
        else [args.which]
    for name in chosen:
        runs[name]()
        sys.stdout.flush()
    print(f"\n# done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
