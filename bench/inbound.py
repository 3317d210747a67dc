"""Benchmark 5: chat messages in through `POST /telegram` and `POST /twilio/whatsapp`.

Each request is a first message from a new user: the channel checks the secret header
(Telegram) or the X-Twilio-Signature (Twilio, computed with the twilio library for every
request beforehand), the runtime commits the event (dedupe by update_id / MessageSid),
the flow starts and its WebView wait and link message are committed, and only then the
server answers. The replies go out through a local fake of each API, at the channel's
rate limit (Telegram 30/s, WhatsApp 80/s by default), so deliveries trail the inbound.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from bench.common import (
    BENCH_FLOWS,
    LoadResult,
    Seeded,
    Server,
    flowbot_server,
    free_port,
    log,
    run_wrk,
    table,
)

TG_TOKEN = "123456789:AAbenchTokenNotARealOne_abcdefghijkl"
TW_SID = "AC" + "0" * 32
TW_FROM = "whatsapp:+14155238886"
LINE = 400  # fixed width of one pre-signed Twilio request in the requests file
CONCURRENCY = (16, 64)


def _config(workdir: Path, port: int, api: int) -> Path:
    path = workdir / "inbound.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
public_url = "http://127.0.0.1:{port}"

[storage]
path = "{workdir / 'inbound.db'}"

[channels.web]
enabled = false

[channels.telegram]
enabled = true
token_env = "BENCH_TG_TOKEN"
secret_env = "BENCH_TG_SECRET"
mode = "webhook"
register_webhook = false
api_base_url = "http://127.0.0.1:{api}/bot"

[channels.whatsapp]
enabled = true
account_sid = "{TW_SID}"
auth_token_env = "BENCH_TW_TOKEN"
from = "{TW_FROM}"
api_base_url = "http://127.0.0.1:{api}"
""" + BENCH_FLOWS)
    return path


def _signed_requests(workdir: Path, url: str, token: str, n: int) -> Seeded:
    """n Twilio webhook posts from n new users, each signed for `url`."""
    validator = RequestValidator(token)
    path = workdir / "twilio.requests"
    with path.open("w") as f:
        for i in range(n):
            form = {"AccountSid": TW_SID, "Body": "hi", "From": f"whatsapp:+1555{i:07d}",
                    "MessageSid": f"SM{secrets.token_hex(16)}", "NumMedia": "0",
                    "ProfileName": f"User {i}", "To": TW_FROM, "WaId": f"1555{i:07d}"}
            line = f"{validator.compute_signature(url, form)}\t{urlencode(form)}"
            if len(line) >= LINE:
                raise ValueError("a signed request does not fit the line width")
            f.write(line.ljust(LINE - 1) + "\n")
    return Seeded(path, n)


def _sent(api: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{api}/counts", timeout=5) as resp:
        doc: dict[str, int] = json.loads(resp.read())
        return doc


def run(args: argparse.Namespace) -> dict[str, object]:
    workdir: Path = args.workdir
    for suffix in ("", "-wal", "-shm"):
        Path(f"{workdir / 'inbound.db'}{suffix}").unlink(missing_ok=True)
    port, api = free_port(), free_port()
    config = _config(workdir, port, api)
    tg_secret, tw_token = secrets.token_urlsafe(24), secrets.token_hex(16)
    n = int(args.inbound_seconds * 6000 * len(CONCURRENCY)) + 10_000  # more than it can use
    log(f"inbound: signing {n:,} Twilio requests")
    twilio = _signed_requests(workdir, f"http://127.0.0.1:{port}/twilio/whatsapp", tw_token, n)
    fake = Server([sys.executable, "-m", "bench.fakeapi", str(api)], api,
                  workdir / "fakeapi.log").start()
    rows: list[list[object]] = []
    results: list[LoadResult] = []
    try:
        server = flowbot_server(config, port, workdir / "inbound-server.log")
        server.env = {"BENCH_TG_TOKEN": TG_TOKEN, "BENCH_TG_SECRET": tg_secret,
                      "BENCH_TW_TOKEN": tw_token}
        with server as srv:
            first = 0
            for c in CONCURRENCY:
                before = _sent(api)
                tg = run_wrk(f"http://127.0.0.1:{port}/telegram", mode="telegram",
                             concurrency=c, seconds=args.inbound_seconds,
                             first=1_000_000 * c, server_pid=srv.pid, secret=tg_secret)
                tw = run_wrk(f"http://127.0.0.1:{port}/twilio/whatsapp", mode="twilio",
                             concurrency=c, seconds=args.inbound_seconds, ids=twilio,
                             first=first, server_pid=srv.pid, line=LINE)
                first += tw.used
                after = _sent(api)
                for name, r, key in (("POST /telegram", tg, "telegram"),
                                     ("POST /twilio/whatsapp", tw, "whatsapp")):
                    if r.non_2xx or r.errors:
                        raise SystemExit(f"inbound {name}: {r.non_2xx} non-2xx answers, "
                                         f"{r.errors} socket errors; see the server log")
                    rows.append([name, c, r.rps, r.p50_ms, r.p99_ms, f"{r.server_cpu:.2f}",
                                 after.get(key, 0) - before.get(key, 0)])
                    results.append(r)
                log(f"inbound c={c}: telegram {tg.rps:,.0f}/s, twilio {tw.rps:,.0f}/s")
    finally:
        fake.stop()
    print(f"\n### inbound: first messages from new users, {args.inbound_seconds:g} s per row "
          "(each starts the flow: event, conversation, WebView wait and link message "
          "committed before the answer)\n")
    print(table(["endpoint", "c", "updates/s", "p50 ms", "p99 ms", "server CPU",
                 "replies sent to the fake API meanwhile"], rows))
    print("\nReplies leave through the outbox at the channel's rate limit (Telegram 30/s, "
          "WhatsApp 80/s), so they trail the inbound rate by design.")
    return {"rows": rows}
