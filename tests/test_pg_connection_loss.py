"""PostgreSQL sessions ended under a running server (a database restart, a failover,
`pg_terminate_backend`, a pooler dropping connections): the pool's dead connections cost
no request a 503, and nothing is half applied."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from storage import postgres
from storage.backends import PROBE_TIMEOUT
from tests.postgres import empty
from tests.support import Harness, harness, pay_flow, write_config

FLOWS = pay_flow(expiration=600)


def end_sessions(url: str) -> int:
    """Terminate every other session on this test's own database; how many."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    return int(row[0]) if row else 0


async def waiting(h: Harness, users: list[str]) -> dict[str, str]:
    """Each user at the WebView block, all at once (several pooled connections in use:
    callbacks alone would share one, see PgWorker's batches); their executionIds."""
    async def one(user: str) -> str:
        link = [m for m in await h.say("hi", user) if m.link][-1].link
        assert link is not None
        return parse_qs(urlsplit(link.url).query)["executionId"][0]

    return dict(zip(users, await asyncio.gather(*map(one, users)), strict=True))


@pytest.mark.parametrize("worker", ["thread", "process"])
async def test_callbacks_after_every_session_was_ended_get_200(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch,
        worker: str) -> None:
    empty(pg_database)
    monkeypatch.setenv("FLOWBOT_TEST_STORAGE", pg_database)
    monkeypatch.setenv("FLOWBOT_TEST_WORKER", worker)
    async with harness(write_config(tmp_path, FLOWS)) as h:
        users = [f"u{i}" for i in range(12)]
        eids = await waiting(h, users)

        async def callback(user: str) -> int:
            resp = await h.client.post("/webview/callback",
                                       json={"executionId": eids[user], "success": True})
            return resp.status

        # several pooled connections in use at once (see waiting), then all of them ended
        # while idle
        assert end_sessions(pg_database) >= 2
        assert await asyncio.gather(*(callback(u) for u in users[:6])) == [200] * 6
        assert [await callback(u) for u in users[6:]] == [200] * 6
        assert (await h.client.get("/healthz")).status == 200
        await h.flush()
        for user in users:
            assert [m.text for m in h.channel.messages(user)] == ["Pay", "paid"]


class Link:
    """127.0.0.1:`port` → PostgreSQL on 5432, which `cut()` takes down the way a crashed or
    unreachable server is: every connection through it dropped, new ones refused."""

    def __init__(self, target: int = 5432) -> None:
        self.target = target
        self.up = True
        self.hung = False  # new connections accepted, then nothing answered
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                down.close()
                continue
            if self.hung:
                self._socks.append(down)
                continue
            up = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [down, up]
            self._join(down, up)

    def _join(self, down: socket.socket, up: socket.socket) -> None:
        """Relay both ways between the client's socket and the server's."""
        for a, b in ((down, up), (up, down)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._socks = []

    def close(self) -> None:
        self.cut()
        self._listener.close()


@contextlib.contextmanager
def link() -> Iterator[Link]:
    made = Link()
    try:
        yield made
    finally:
        made.close()


def test_waits_for_the_database_are_shorter_than_its_callers_patience() -> None:
    """A browser or a webhook sender waits ~10-30 s: the 503 must come before."""
    assert postgres.POOL_TIMEOUT <= PROBE_TIMEOUT / 2
    assert postgres.RECONNECT_TIMEOUT <= 10


async def test_an_unreachable_database_answers_503_soon_and_the_server_recovers(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Database down: a clear 503 with Retry-After within the pool's wait (it was 30 s,
    past the caller's patience), /healthz 503, nothing applied; back up: the next
    callback goes through at once (psycopg_pool's backoff kept it on 503 about as long
    as the outage had lasted)."""
    empty(pg_database)
    # the defaults' behaviour, faster: a wait longer than psycopg_pool's first reconnection
    # delay (1 s ± 10 %), which a 0.5 s wait once missed after recovery on a clean-clone CI
    monkeypatch.setattr(postgres, "POOL_TIMEOUT", 1.5)
    monkeypatch.setattr(postgres, "RECONNECT_TIMEOUT", 0.5)
    with link() as db:
        monkeypatch.setenv("FLOWBOT_TEST_STORAGE",
                           pg_database.replace("127.0.0.1:5432", f"127.0.0.1:{db.port}"))
        async with harness(write_config(tmp_path, FLOWS)) as h:
            eids = await waiting(h, ["ann", "bob"])
            db.cut()
            for user in ("ann", "ann", "bob"):
                began = time.monotonic()
                resp = await h.client.post(
                    "/webview/callback", json={"executionId": eids[user], "success": True})
                assert resp.status == 503 and resp.headers["Retry-After"]
                assert (await resp.json())["error"] == "storage_unavailable"
                assert time.monotonic() - began < 3
            assert (await h.client.get("/healthz")).status == 503
            db.up = True
            began = time.monotonic()
            resp = await h.client.post("/webview/callback",
                                       json={"executionId": eids["ann"], "success": True})
            assert resp.status == 200, await resp.text()
            assert time.monotonic() - began < 3
            assert (await h.client.get("/healthz")).status == 200
            await h.flush()
            assert [m.text for m in h.channel.messages("ann")] == ["Pay", "paid"]
            assert [m.text for m in h.channel.messages("bob")] == ["Pay"]


async def test_the_pool_recovers_soon_from_a_host_that_accepted_and_never_answered(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections dropped, then a host that accepts and never answers (a stuck host, a
    PgBouncer waiting for a dead server): callbacks get 503 within the pool's wait, and
    once the database answers again the pool's next connection goes through within the
    connect timeout. Without one (libpq's default) the pool's reconnection stayed stuck
    in its attempt for ~130 s after the host came back."""
    empty(pg_database)
    monkeypatch.setattr(postgres, "POOL_TIMEOUT", 0.5)
    monkeypatch.setattr(postgres, "RECONNECT_TIMEOUT", 0.5)
    monkeypatch.setattr(postgres, "SIDE_CONNECT_TIMEOUT", 2)  # libpq's least
    monkeypatch.setenv("FLOWBOT_TEST_WORKER", "thread")  # the timeouts above apply there
    with link() as db:
        monkeypatch.setenv("FLOWBOT_TEST_STORAGE",
                           pg_database.replace("127.0.0.1:5432", f"127.0.0.1:{db.port}"))
        async with harness(write_config(tmp_path, FLOWS)) as h:
            eids = await waiting(h, ["ann"])
            db.cut()
            db.hung, db.up = True, True
            resp = await h.client.post("/webview/callback",
                                       json={"executionId": eids["ann"], "success": True})
            assert resp.status == 503
            db.hung = False
            began = time.monotonic()
            while resp.status == 503 and time.monotonic() - began < 30:
                resp = await h.client.post(
                    "/webview/callback", json={"executionId": eids["ann"], "success": True})
            assert resp.status == 200, await resp.text()
            assert time.monotonic() - began < 8
            await h.flush()
            assert [m.text for m in h.channel.messages("ann")] == ["Pay", "paid"]


async def test_metrics_do_not_hang_on_a_database_that_never_answers(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers (a stuck host, a PgBouncer
    waiting for a dead server): /metrics answers with the last counts once its own
    connection gives up, instead of holding a thread for libpq's default of minutes."""
    empty(pg_database)
    monkeypatch.setattr(postgres, "SIDE_CONNECT_TIMEOUT", 2)  # libpq's least
    with link() as db:
        monkeypatch.setenv("FLOWBOT_TEST_STORAGE",
                           pg_database.replace("127.0.0.1:5432", f"127.0.0.1:{db.port}"))
        async with harness(write_config(tmp_path, FLOWS)) as h:
            await waiting(h, ["ann"])
            resp = await h.client.get("/metrics")
            assert 'flowbot_pending_waits{kind="webview"} 1' in await resp.text()
            db.hung = True
            began = time.monotonic()
            resp = await h.client.get("/metrics")
            assert resp.status == 200
            assert 'flowbot_pending_waits{kind="webview"} 1' in await resp.text()
            assert time.monotonic() - began < 10
