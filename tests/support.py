"""Test helpers: a recording channel and a harness around a real app on 127.0.0.1."""

from __future__ import annotations

import asyncio
import heapq
import os
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from bot.clock import FakeClock
from bot.config import Config, load_config
from bot.outbox import Outbox
from bot.runtime import Runtime
from bot.server import OUTBOX, RUNTIME, build_app
from bot.store import Store
from channels.base import Delivery, Inbound, Message, RateLimit, Route, SendError
from storage.store import SQLiteStore


@dataclass
class RecordingChannel:
    """A channel that records what it was asked to send; can be told to fail."""

    name: str = "rec"
    rate_limit: RateLimit = RateLimit()
    sent: list[Delivery] = field(default_factory=list)
    failures: list[SendError] = field(default_factory=list)  # raised by the next sends

    def routes(self) -> Sequence[Route]:
        return []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, delivery: Delivery) -> str | None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(delivery)
        return f"rec-{delivery.id}"

    def messages(self, user: str) -> list[Message]:
        return [d.message for d in self.sent if d.user_id == user]


def pay_flow(expiration: int = 60) -> str:
    """The `[flows.main]` TOML most storage tests share: a WebView block "pay" (the
    given expiration, in seconds) whose success or error ends at "paid" ("paid") and
    whose expiry ends at "late" ("expired")."""
    return PAY_FLOW.replace("expiration = 60", f"expiration = {expiration}")


PAY_FLOW = """
[flows.main]
start = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "Pay"
expiration = 60
on_success = "paid"
on_error = "paid"
on_expired = "late"
[flows.main.blocks.paid]
type = "end"
text = "paid"
[flows.main.blocks.late]
type = "end"
text = "expired"
"""


def storage_where(tmp_path: Path) -> str:
    """The `[storage]` line that says where the data is: a SQLite file in tmp_path, or the
    PostgreSQL database FLOWBOT_TEST_STORAGE names (see `both_backends`)."""
    url = os.environ.get("FLOWBOT_TEST_STORAGE")
    return f'url = "{url}"' if url else f'path = "{tmp_path / "flowbot.db"}"'


def write_config(tmp_path: Path, flows: str, extra: str = "", *,
                 public_url: str = "http://bot.test", server: str = "") -> Config:
    """A config with the web channel off, a DB in tmp_path, and the given flows.
    `server` adds lines to [server]; `extra` adds tables after the channels. The database
    worker is a thread unless FLOWBOT_TEST_WORKER says "process" (see `both_workers`); the
    data is in PostgreSQL when FLOWBOT_TEST_STORAGE names it (see `both_backends`)."""
    text = textwrap.dedent(f"""
        [server]
        public_url = "{public_url}"
    """) + textwrap.dedent(server) + textwrap.dedent(f"""
        [storage]
        {storage_where(tmp_path)}
        worker = "{os.environ.get('FLOWBOT_TEST_WORKER', 'thread')}"
        [channels.web]
        enabled = false
    """) + textwrap.dedent(extra) + textwrap.dedent(flows)
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


@dataclass
class Harness:
    client: TestClient[Any, Any]
    runtime: Runtime
    outbox: Outbox
    clock: FakeClock
    channel: RecordingChannel
    seen: dict[str, int] = field(default_factory=dict)

    async def flush(self) -> None:
        await self.outbox.drain()

    def new_messages(self, user: str) -> list[Message]:
        msgs = self.channel.messages(user)
        start = self.seen.get(user, 0)
        self.seen[user] = len(msgs)
        return msgs[start:]

    async def say(self, text: str, user: str = "u1", payload: str | None = None,
                  **kw: Any) -> list[Message]:
        """The user writes (or presses a button); returns the messages they get back."""
        await self.runtime.handle_inbound(Inbound("rec", user, text, payload, **kw))
        await self.flush()
        return self.new_messages(user)

    async def texts(self, text: str, user: str = "u1", **kw: Any) -> list[str]:
        return [m.text for m in await self.say(text, user, **kw)]

    async def advance(self, seconds: float) -> int:
        """Move time and fire whatever fell due, as the timer would."""
        self.clock.advance(seconds)
        fired = await self.runtime.fire_due()
        await self.flush()
        return fired

    async def post(self, path: str, **kw: Any) -> tuple[int, Any]:
        resp = await self.client.post(path, **kw)
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        await self.flush()
        return resp.status, body


async def eventually(condition: Callable[[], object], timeout: float = 3.0) -> None:
    """Poll until `condition()` is true: for work the real timer/outbox tasks do."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def harness(config: Config, channel: RecordingChannel | None = None
                  ) -> AsyncIterator[Harness]:
    channel = channel or RecordingChannel()
    clock = FakeClock()
    app = build_app(config, channel_factories={"rec": lambda _c, _r: channel}, clock=clock,
                    run_background=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        scan = app[RUNTIME].stranded_scan  # the background one after a config edit
        if scan is not None:
            await scan
        yield Harness(client, app[RUNTIME], app[OUTBOX], clock, channel)


def query(store: Store, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """A database job that pickles (module-level, plain answer): rows of one query, written
    with SQLite's `?` placeholders (PostgreSQL gets `%s`)."""
    if not isinstance(store, SQLiteStore):
        sql = sql.replace("?", "%s")
    cur = store.conn.execute(sql, params)
    rows: list[tuple[Any, ...]] = cur.fetchall() if cur.description else []
    return rows


def conversation_key(store: Store, channel: str, user: str) -> str:
    """A database job (it pickles, for the process worker): the user's conversation key."""
    return store.conversation(channel, user, "unused", 0).key


def db_rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """A database job: every row of every table, to show that a refused request changed
    nothing (compare a snapshot taken before it with one taken after). Leaves out
    `settings`: what the stranded check (in the background after start-up) keeps about
    itself, not state a request may change."""
    tables = [name for (name,) in store.conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name" if isinstance(store, SQLiteStore) else
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")]
    return {t: sorted(store.conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)
            for t in tables if t != "settings"}


class VirtualTime:
    """Monotonic time for the rate limiters (bot.clock.Monotonic) that moves only when told:
    `sleep` parks its caller until `advance()` reaches its wake-up time. With every sender
    parked, `advance()` jumps to the earliest wake-up, so send times come out exact."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._n = 0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._n += 1
        heapq.heappush(self._sleepers, (self.now + seconds, self._n, fut))
        await fut

    @property
    def parked(self) -> int:
        return len(self._sleepers)

    def advance(self) -> float:
        """Jump to the earliest wake-up and wake everyone due then; returns the new time."""
        self.now = max(self.now, self._sleepers[0][0])
        while self._sleepers and self._sleepers[0][0] <= self.now:
            heapq.heappop(self._sleepers)[2].set_result(None)
        return self.now

    async def run(self, active: Callable[[], int], done: Callable[[], bool],
                  timeout: float = 30.0) -> None:
        """Until `done()`: whenever all `active()` senders are parked here (none is sending,
        none is in the database), advance. `timeout` (real seconds) is a safety cap."""
        end = asyncio.get_running_loop().time() + timeout
        spins = 0
        while not done():
            if asyncio.get_running_loop().time() > end:
                raise AssertionError(f"not done at t={self.now}: {self.parked} of {active()} parked")
            if self.parked and self.parked >= active():
                self.advance()
                spins = 0
            else:  # woken senders re-parking, or a send or a database job under way
                spins += 1
            await asyncio.sleep(0 if spins < 100 else 0.001)
