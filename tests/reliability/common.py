"""Shared by the reliability suite: the flows, an app that can be closed and rebuilt on the
same database (with the same fake clock and the same recording channel), seeding, and a
snapshot of the database to prove that a rejected request changed nothing."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.clock import FakeClock
from bot.config import Config, load_config
from bot.outbox import Outbox
from bot.runtime import Runtime
from bot.server import OUTBOX, RUNNER_OPTIONS, RUNTIME, build_app
from channels.base import Inbound
from storage.store import Store
from tests.support import RecordingChannel

EXPIRATION = 60  # WebView expiration in the in-process tests (FakeClock seconds)
TIMEOUT = 30  # Webhook timeout

FLOWS = f"""
[flows.main]
start = "menu"

[flows.main.blocks.menu]
type = "buttons"
text = "Pick"
choices = [{{ label = "pay", next = "pay" }}, {{ label = "hook", next = "hook" }}]

[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Pay here"
expiration = {EXPIRATION}
response_variable = "payment"
on_success = "paid"
on_error = "failed"
on_expired = "expired"

[flows.main.blocks.paid]
type = "message"
text = "paid {{{{payment.ref}}}}"

[flows.main.blocks.failed]
type = "message"
text = "failed"

[flows.main.blocks.expired]
type = "message"
text = "expired"

[flows.main.blocks.hook]
type = "webhook"
text = "hook waiting"
timeout = {TIMEOUT}
map = {{ status = "order.status" }}
on_success = "hooked"
on_failure = "timeout"

[flows.main.blocks.hooked]
type = "message"
text = "hooked {{{{status}}}}"

[flows.main.blocks.timeout]
type = "message"
text = "timeout"
"""

BRANCH_PREFIXES = ("paid", "failed", "expired", "hooked", "timeout")


def long_form(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--long"))


def write_config(tmp_path: Path, extra: str = "", flows: str = FLOWS) -> Path:
    path = tmp_path / "flowbot.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        public_url = "http://bot.test"
        [storage]
        path = "{tmp_path / 'flowbot.db'}"
        [channels.web]
        enabled = false
    """) + textwrap.dedent(extra) + flows)
    return path


@dataclass
class App:
    """The real app on 127.0.0.1 (timer and outbox driven by hand), restartable in place."""

    config: Config
    clock: FakeClock = field(default_factory=FakeClock)
    channel: RecordingChannel = field(default_factory=RecordingChannel)
    client: TestClient[Any, Any] | None = None
    starts: int = 0
    # the aiohttp handler's options: production's (bot.server.RUNNER_OPTIONS) by default
    server_options: dict[str, Any] = field(default_factory=lambda: dict(RUNNER_OPTIONS))

    async def start(self) -> App:
        app = build_app(self.config, channel_factories={"rec": lambda _c, _r: self.channel},
                        clock=self.clock, run_background=False)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**self.server_options)  # the handler's options go here
        self.client = TestClient(server)
        await self.client.start_server()
        scan = app[RUNTIME].stranded_scan  # the check for stranded conversations: done
        if scan is not None:
            await scan
        self.starts += 1
        return self

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def restart(self) -> None:
        await self.close()
        await self.start()

    @property
    def runtime(self) -> Runtime:
        assert self.client is not None
        return self.client.server.app[RUNTIME]

    @property
    def outbox(self) -> Outbox:
        assert self.client is not None
        return self.client.server.app[OUTBOX]

    async def say(self, user: str, text: str) -> None:
        await self.runtime.handle_inbound(Inbound("rec", user, text))

    async def flush(self) -> None:
        await self.outbox.drain()

    async def expire(self, seconds: float) -> int:
        self.clock.advance(seconds)
        return await self.runtime.fire_due()

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        assert self.client is not None
        resp = await self.client.post(path, json=body)
        return resp.status, await resp.json()

    def texts(self, user: str) -> list[str]:
        return [d.message.text for d in self.channel.sent if d.user_id == user]

    def branches(self, user: str) -> list[str]:
        return [t for t in self.texts(user) if t.startswith(BRANCH_PREFIXES)]


def pending_wait_of(store: Store, user: str) -> tuple[str, str, str]:
    """A database job (module-level: it pickles for the process worker)."""
    conv = store.conversation("rec", user, "", 0)
    assert conv.wait_id is not None, f"{user} is not waiting"
    wait = store.wait(conv.wait_id)
    assert wait is not None
    return wait.id, wait.kind, conv.key


async def pending_wait(app: App, user: str) -> tuple[str, str, str]:
    """(wait id, kind, conversation key) of the user's pending wait."""
    return await app.runtime.worker.run(pending_wait_of, user)


def snapshot(db: Path) -> str:
    """A digest of every row of every table: equal digests, unchanged state."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        for table in tables:
            for row in con.execute(f"SELECT * FROM {table} ORDER BY 1"):
                digest.update(json.dumps([table, *row], default=str).encode())
        return digest.hexdigest()
    finally:
        con.close()


Db = Path | str  # a SQLite file, or a postgresql:// URL (the PostgreSQL half)


def _pg_rows(url: str, query: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query.replace("?", "%s"), tuple(args))
        return cur.fetchall() if cur.description else []


def _seed_pg(url: str, ids: list[str], deadline: float, prefix: str, channel: str,
             now: float) -> None:
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor() as cur:  # one transaction
        cur.execute("SELECT coalesce(max(id), 0) FROM conversations")
        first = cur.fetchone()[0] + 1  # type: ignore[index]
        cur.executemany(
            "INSERT INTO conversations (id, channel, user_id, key, flow, block, wait_id, "
            "variables, version, created, updated) VALUES (%s, %s, %s, %s, 'main', 'pay', %s, "
            "'{}', 1, %s, %s)",
            [(first + i, channel, f"{prefix}{first + i}", secrets.token_urlsafe(18), wid,
              now, now) for i, wid in enumerate(ids)])
        cur.executemany(
            "INSERT INTO waits (id, conversation_id, kind, flow, block, deadline, "
            "blocking, created) VALUES (%s, %s, 'webview', 'main', 'pay', %s, true, %s)",
            [(wid, first + i, deadline, now) for i, wid in enumerate(ids)])
        cur.execute("SELECT setval(pg_get_serial_sequence('conversations', 'id'), "
                    "(SELECT max(id) FROM conversations))")


def seed_waits(db: Db, n: int, *, deadline: float, prefix: str,
               channel: str = "file") -> list[str]:
    """`n` conversations waiting at main/pay with raw inserts (no engine): executionIds."""
    now = time.time()
    ids = [secrets.token_urlsafe(18) for _ in range(n)]
    if isinstance(db, str):
        from storage.postgres import PgStore

        PgStore(db).close()  # the schema, as a first start would make it
        _seed_pg(db, ids, deadline, prefix, channel, now)
        return ids
    store = Store(db)
    try:
        with store.transaction():
            first = store.conn.execute(
                "SELECT coalesce(max(id), 0) FROM conversations").fetchone()[0] + 1
            store.conn.executemany(
                "INSERT INTO conversations (id, channel, user_id, key, flow, block, wait_id, "
                "variables, version, created, updated) VALUES (?, ?, ?, ?, 'main', 'pay', ?, "
                "'{}', 1, ?, ?)",
                [(first + i, channel, f"{prefix}{first + i}", secrets.token_urlsafe(18), wid,
                  now, now) for i, wid in enumerate(ids)])
            store.conn.executemany(
                "INSERT INTO waits (id, conversation_id, kind, flow, block, deadline, "
                "blocking, created) VALUES (?, ?, 'webview', 'main', 'pay', ?, 1, ?)",
                [(wid, first + i, deadline, now) for i, wid in enumerate(ids)])
    finally:
        store.close()
    return ids


def states(db: Db, ids: Iterable[str]) -> dict[str, tuple[str, float | None, float]]:
    """wait id → (state, resolved_at, deadline), read-only."""
    if isinstance(db, str):
        return {wid: (state, resolved, deadline) for wid, state, resolved, deadline in _pg_rows(
            db, "SELECT id, state, resolved_at, deadline FROM waits WHERE id = ANY(?)",
            [list(ids)])}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out: dict[str, tuple[str, float | None, float]] = {}
    try:
        ids = list(ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for wid, state, resolved, deadline in con.execute(
                    f"SELECT id, state, resolved_at, deadline FROM waits "
                    f"WHERE id IN ({marks})", chunk):
                out[wid] = (state, resolved, deadline)
    finally:
        con.close()
    return out


def load(path: Path) -> Config:
    return load_config(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STALL = 60.0  # s without a sign of progress from a server process: it hangs (not: it is slow)
T = TypeVar("T")


class Server:
    """One `flowbot serve` process at a time on a fixed port and database."""

    def __init__(self, tmp: Path, flows: str = FLOWS) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        url = os.environ.get("FLOWBOT_TEST_STORAGE")  # the PostgreSQL half (both_backends)
        self.db: Db = url or tmp / "flowbot.db"
        where = f'url = "{url}"' if url else f'path = "{self.db}"'
        self.jsonl = tmp / "outbox.jsonl"
        self.log = tmp / "server.log"
        self.config = tmp / "flowbot.toml"
        self.config.write_text(textwrap.dedent(f"""
            [server]
            port = {self.port}
            public_url = "{self.base}"
            [storage]
            {where}
            [channels.web]
            enabled = false
            [channels.file]
            enabled = true
            path = "{self.jsonl}"
        """) + flows)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "a server is still running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT)
        self.started_at = time.time()
        # a guard against a hang, not a bound on start-up: a busy CI machine (coverage,
        # load 10+) may take many seconds; a process that exits fails at once (below)
        deadline = time.monotonic() + STALL
        try:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(self.base + "/healthz", timeout=1) as resp:
                        if resp.status == 200:
                            return
                except OSError:
                    time.sleep(0.02)
            raise AssertionError("flowbot serve did not answer /healthz")
        except BaseException:
            self.stop()  # a server that did not come up is not left running
            raise

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def progress(self) -> tuple[tuple[int, int], ...]:
        """Changes while the server works: its output file, its log, its database files."""
        paths = [self.jsonl, self.log]
        if not isinstance(self.db, str):
            paths += [self.db, self.db.with_name(self.db.name + "-wal")]
        out = []
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                out.append((0, 0))
            else:
                out.append((st.st_size, st.st_mtime_ns))
        return tuple(out)

    def until(self, check: Callable[[], T], what: str, stall: float = STALL) -> T:
        """Poll `check()` until it returns something true, and return that. No deadline a
        busy machine could miss: it fails when the server exits, or when it shows no sign
        of progress (`progress()`) for `stall` seconds — a hang."""
        last, since = self.progress(), time.monotonic()
        while not (got := check()):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"flowbot serve exited ({self.proc.returncode}) before "
                                     f"{what}:\n{self.log.read_text()[-3000:]}")
            now = self.progress()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > stall:
                raise AssertionError(f"flowbot serve made no progress for {stall:g} s before "
                                     f"{what}")
            time.sleep(0.05)
        return got

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a read-only query, with SQLite's `?` placeholders on either backend."""
        if isinstance(self.db, str):
            return _pg_rows(self.db, query, args)
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(query, args).fetchall()
        finally:
            con.close()

    def deliveries(self) -> list[int]:
        """The outbox ids the channel got, in order."""
        if not self.jsonl.exists():
            return []
        return [json.loads(line)["outbox_id"] for line in self.jsonl.read_text().splitlines()]
