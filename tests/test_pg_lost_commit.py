"""A connection lost at COMMIT, after the server got it and before its answer was read
(storage/postgres.py, `PgStore.commit`): the caller of a transition the server committed
gets the committed answer (not a 503, nor a 409 for its own change) and what it wrote is
noticed as after any commit; one the server rolled back runs again; one whose outcome
cannot be learnt answers 503 and never runs again. A proxy loses the connection at that
exact point: no sleeping."""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from storage import postgres
from storage.pg_worker import PgWorker
from tests.postgres import empty
from tests.support import harness, pay_flow, write_config
from tests.test_pg_connection_loss import Link, waiting

# success leads to a second WebView block: the callback's commit writes a new wait too
FLOWS = pay_flow(expiration=600).replace('on_success = "paid"', 'on_success = "again"') + """
[flows.main.blocks.again]
type = "webview"
url = "https://pay.example/again"
text = "Pay again"
expiration = 300
on_success = "paid"
on_error = "paid"
on_expired = "late"
"""
CLAIM = b"UPDATE waits SET state"  # a callback's claim, in the pipeline that carries COMMIT
COMMITTED = b"C\x00\x00\x00\x0bCOMMIT\x00"  # the server's answer to COMMIT (CommandComplete)


class CommitLink(Link):
    """A `Link` that loses one COMMIT's connection: after `arm(marker)`, the first connection
    whose client sends `marker` loses it at its COMMIT, both ways at once. `applied`: once
    the server has answered COMMIT (it committed; the answer is never relayed); else the
    bytes carrying `marker` (and COMMIT after it) never reach the server, which sees its
    client gone and rolls back, and the client sees the end only once the server closed
    its side (the rollback is recorded by then). `then_down`: new connections are refused
    from then on (the outcome cannot be asked)."""

    def __init__(self) -> None:
        super().__init__()
        self.marker: bytes | None = None
        self.applied = True
        self.then_down = False
        self.cuts = 0
        self._lock = threading.Lock()

    def arm(self, marker: bytes, *, applied: bool = True, then_down: bool = False) -> None:
        self.applied, self.then_down, self.marker = applied, then_down, marker

    def _take(self) -> bool:
        """Whether this cut is the armed one (once)."""
        with self._lock:
            if self.marker is None:
                return False
            self.marker = None
            self.cuts += 1
            self.up = not self.then_down
            return True

    def _join(self, down: socket.socket, up: socket.socket) -> None:
        seen = threading.Event()  # this connection's client sent the marker
        threading.Thread(target=self._to_server, args=(down, up, seen), daemon=True).start()
        threading.Thread(target=self._to_client, args=(up, down, seen), daemon=True).start()

    def _to_server(self, down: socket.socket, up: socket.socket, seen: threading.Event) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while data := down.recv(65536):
                marker, window = self.marker, tail + data
                if marker is not None and marker in window:
                    if not self.applied and self._take():
                        up.shutdown(socket.SHUT_WR)  # _to_client closes down at the server's end
                        return
                    seen.set()
                tail = window[-64:]
                up.sendall(data)
        _close(down, up)

    def _to_client(self, up: socket.socket, down: socket.socket, seen: threading.Event) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while data := up.recv(65536):
                window = tail + data
                if seen.is_set() and COMMITTED in window and self._take():
                    break
                tail = window[-len(COMMITTED):]
                down.sendall(data)
        _close(down, up)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def commit_link() -> Iterator[CommitLink]:
    made = CommitLink()
    try:
        yield made
    finally:
        made.close()


def through(url: str, port: int) -> str:
    """`url` by way of the proxy, in clear (the proxy reads the server's answers)."""
    url = url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    return url + ("&" if "?" in url else "?") + "sslmode=disable&gssencmode=disable"


def rows(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        found = {f"waits_{state}": n for state, n in conn.execute(
            "SELECT state, count(*) FROM waits GROUP BY state")}
        found |= {f"outbox_{state}": n for state, n in conn.execute(
            "SELECT state, count(*) FROM outbox GROUP BY state")}
    return found


@pytest.mark.parametrize("lost", ["after COMMIT was applied", "before COMMIT reached it",
                                  "and the database with it"])
async def test_a_callback_whose_commit_answer_is_lost(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, lost: str) -> None:
    empty(pg_database)
    monkeypatch.setenv("FLOWBOT_TEST_WORKER", "thread")  # the worker is looked into below
    monkeypatch.setattr(postgres, "POOL_TIMEOUT", 0.5)  # the database down: 503 sooner
    caplog.set_level(logging.WARNING, logger="storage.postgres")
    with commit_link() as db:
        monkeypatch.setenv("FLOWBOT_TEST_STORAGE", through(pg_database, db.port))
        async with harness(write_config(tmp_path, FLOWS)) as h:
            eid = (await waiting(h, ["ann"]))["ann"]
            await h.flush()
            worker = h.runtime.worker
            assert isinstance(worker, PgWorker)
            commits = worker.commits
            worker._due = math.inf
            deadlines: list[float] = []
            monkeypatch.setattr(h.runtime, "on_deadline", deadlines.append)
            db.arm(CLAIM, applied=lost != "before COMMIT reached it",
                   then_down=lost == "and the database with it")

            resp = await h.client.post("/webview/callback",
                                       json={"executionId": eid, "success": True})
            assert db.cuts == 1
            if lost == "and the database with it":
                # the outcome cannot be learnt: 503, and the job is not run again
                assert resp.status == 503, await resp.text()
                assert (await resp.json())["error"] == "storage_unavailable"
                assert "status unknown" in caplog.text
                assert worker.commits == commits
                db.up = True
            else:
                # the caller's own change: its answer, noticed as after any commit
                assert resp.status == 200, await resp.text()
                assert await resp.json() == {"status": "ok", "outcome": "success"}
                assert ("committed" if lost == "after COMMIT was applied"
                        else "aborted") in caplog.text
                assert worker.commits == commits + 1
                assert len(deadlines) == 1  # the runtime's timer: the new wait's
                assert worker._due < math.inf
            # applied once either way: one branch, its rows there once
            assert rows(pg_database) == {"waits_success": 1, "waits_pending": 1,
                                         "outbox_sent": 1, "outbox_pending": 1}
            await h.flush()
            assert [m.text for m in h.channel.messages("ann")] == ["Pay", "Pay again"]
            assert rows(pg_database) == {"waits_success": 1, "waits_pending": 1,
                                         "outbox_sent": 2}
            resp = await h.client.post("/webview/callback",
                                       json={"executionId": eid, "success": True})
            assert resp.status == 409  # now resolved, as for any second callback
