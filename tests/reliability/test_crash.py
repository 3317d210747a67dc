"""`flowbot serve` killed with SIGKILL at random moments under callback load, and restarted.

A ledger of every executionId sent and every answer received proves: each wait resolved
exactly once; every 200 was committed; every committed message reached the channel (the
file channel's JSON lines); waits that fell due while the server was down expired right
after it came back. The outbox is at-least-once across a crash: a row written to the
channel but not yet marked sent when the process died is sent again after the restart.
Those duplicates are counted and bounded.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict, deque
from pathlib import Path

import aiohttp
import pytest

from tests.reliability.common import Server, long_form, seed_waits, states

CONCURRENCY = 16


Ledger = dict[str, list[tuple[str, str | None]]]  # executionId → (status, outcome) per try


async def _load(server: Server, todo: deque[str], ledger: Ledger, kill_after: float | None
                ) -> None:
    """POST callbacks for `todo` at CONCURRENCY until it is empty, or kill the server after
    `kill_after` seconds. Ids whose answer was lost go back to the front of `todo`."""
    lost: list[str] = []
    killed = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def worker() -> None:
            while todo and not killed.is_set():
                eid = todo.popleft()
                body = {"executionId": eid, "success": True, "data": {"ref": eid[:10]}}
                try:
                    async with http.post(server.base + "/webview/callback", json=body) as r:
                        doc = await r.json()
                        ledger[eid].append((str(r.status), doc.get("outcome")))
                except (aiohttp.ClientError, TimeoutError, ConnectionError):
                    ledger[eid].append(("lost", None))
                    lost.append(eid)

        workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        if kill_after is not None:
            await asyncio.wait(workers, timeout=kill_after)
            server.kill9()  # even when the load ran out first: the next start needs the port
            killed.set()
        await asyncio.gather(*workers)
    todo.extendleft(lost)


@pytest.mark.usefixtures("both_backends")
async def test_kill_9_under_load_loses_nothing(tmp_path: Path, request: pytest.FixtureRequest
                                               ) -> None:
    long = long_form(request)
    kills = 20 if long else 3
    rng = random.Random(1234)
    server = Server(tmp_path)
    called = seed_waits(server.db, 20_000 if long else 3_000, deadline=time.time() + 3600,
                        prefix="u")
    todo = deque(called)
    ledger: Ledger = defaultdict(list)
    late: list[str] = []
    restarted_after_late = 0.0
    try:
        server.start()
        for k in range(kills):
            await _load(server, todo, ledger, kill_after=rng.uniform(0.2, 0.8))
            if k == 0:
                # While the server is down, waits fall due (their deadline is already past).
                late = seed_waits(server.db, 200, deadline=time.time() - 0.5, prefix="late")
                restarted_after_late = time.time()
            server.start()
        await _load(server, todo, ledger, kill_after=None)  # the rest, no more kills

        def settled() -> bool:
            pending = server.sql("SELECT count(*) FROM outbox WHERE state = 'pending'")[0][0]
            expired = server.sql("SELECT count(*) FROM waits WHERE state = 'expired'")[0][0]
            return pending == 0 and expired == len(late)

        deadline = time.monotonic() + 30
        while not settled() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        server.stop()

    # each executionId: at most one 200, and finally an answer that says it succeeded
    assert not todo
    for eid in called:
        tries = ledger[eid]
        answers = [t for t in tries if t[0] != "lost"]
        assert [t[0] for t in answers].count("200") <= 1, (eid, tries)
        assert answers, (eid, tries)
        assert all(t == ("200", "success") or t == ("409", "success") for t in answers), tries
        if answers[0][0] == "409":  # its first answer was lost: the kill came after the commit
            assert tries[0][0] == "lost", tries

    # the database: every called wait succeeded, every late one expired after the restart
    final = states(server.db, called + late)
    assert Counter(s for s, _, _ in final.values()) == {"success": len(called),
                                                        "expired": len(late)}
    for wid in late:
        _, resolved, due = final[wid]
        assert resolved is not None and resolved >= restarted_after_late > due

    # one transition each: exactly one branch message per conversation, all committed ones
    # delivered; duplicates only from deliveries cut by a kill
    rows = server.sql("SELECT o.id, o.state, o.message, c.user_id FROM outbox o "
                      "JOIN conversations c ON c.id = o.conversation_id")
    per_user = Counter(user for _, _, _, user in rows)
    assert set(per_user.values()) == {1}, per_user.most_common(3)
    assert {state for _, state, _, _ in rows} == {"sent"}
    texts = {user: json.loads(message)["text"] for _, _, message, user in rows}
    assert all(texts[user].startswith("expired") == user.startswith("late") for user in texts)
    # every committed message reached the channel exactly once. The outbox itself is
    # at-least-once across a crash (a row written just before a kill, before its 'sent' mark
    # committed, is sent again); the channel drops the resend by its idempotency key, and
    # the server logs each such resend, which we count for the record.
    delivered = Counter(server.deliveries())
    assert set(delivered) == {oid for oid, _, _, _ in rows}
    assert set(delivered.values()) == {1}, delivered.most_common(3)
    resends = server.log.read_text().count("already delivered before a restart")
    lost_answers = sum(1 for tries in ledger.values() for t in tries if t[0] == "lost")
    print(f"\ncrash: {kills} kills, {len(called):,} callbacks ({lost_answers} answers lost to "
          f"kills and retried), {len(late)} overdue expiries after restart, "
          f"{resends} resends after a kill, dropped by the channel")
    request.node.user_properties.append(("resends", resends))
