"""Callback and expiry racing for the same waits: exactly one branch each, every time."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from bot.store import Store
from channels.base import Inbound
from tests.support import Harness, harness, write_config

pytestmark = pytest.mark.usefixtures("both_backends")

FLOWS = """
[flows.main]
start = "pay"
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example"
text = "Pay"
expiration = 60
on_success = "paid"
on_error = "failed"
on_expired = "expired"
[flows.main.blocks.paid]
type = "end"
text = "paid"
[flows.main.blocks.failed]
type = "end"
text = "failed"
[flows.main.blocks.expired]
type = "end"
text = "expired"
"""


def execution_id(h: Harness, user: str) -> str:
    link = h.channel.messages(user)[0].link
    assert link is not None
    return parse_qs(urlsplit(link.url).query)["executionId"][0]


async def open_waits(h: Harness, n: int, prefix: str) -> dict[str, str]:
    users = [f"{prefix}{i}" for i in range(n)]
    await asyncio.gather(*(h.runtime.handle_inbound(Inbound("rec", u, "hi")) for u in users))
    await h.flush()
    return {u: execution_id(h, u) for u in users}


def wait_states(store: Store, eids: list[str]) -> list[str]:
    """A database job (module-level: it pickles for the process worker)."""
    return [w.state if (w := store.wait(e)) else "missing" for e in eids]


async def states(h: Harness, eids: list[str]) -> list[str]:
    return await h.runtime.worker.run(wait_states, eids)


@pytest.fixture
async def h(tmp_path: Path) -> Any:
    async with harness(write_config(tmp_path, FLOWS)) as h:
        yield h


async def test_callback_vs_expiry_at_the_deadline_1000_times(h: Harness) -> None:
    """All callbacks are sent while the clock crosses the deadline and the timer fires: each
    wait is won by exactly one side, and the answer, the state and the messages agree."""
    eids = await open_waits(h, 1000, "r")
    h.clock.advance(60 - 0.001)  # a millisecond before every deadline

    done = 0

    async def callback(eid: str) -> Any:
        nonlocal done
        resp = await h.client.post("/webview/callback",
                                   json={"executionId": eid, "success": True})
        done += 1
        return resp

    async def timer() -> int:
        while done < 300:  # cross the deadline while ~700 callbacks are still in flight
            await asyncio.sleep(0.001)
        h.clock.advance(0.002)
        return await h.runtime.fire_due()

    answers = await asyncio.gather(*(callback(e) for e in eids.values()), timer())
    responses, fired = answers[:-1], answers[-1]
    await h.flush()

    outcomes: Counter[str] = Counter()
    said_by_user: dict[str, list[str]] = {u: [] for u in eids}
    for d in h.channel.sent:
        if d.message.text != "Pay":
            said_by_user[d.user_id].append(d.message.text)
    final = await states(h, list(eids.values()))
    for user, resp, state in zip(eids, responses, final, strict=True):
        said = said_by_user[user]
        assert said in (["paid"], ["expired"]), (user, said)
        assert resp.status == (200 if said == ["paid"] else 410)
        assert state == ("success" if said == ["paid"] else "expired")
        outcomes[said[0]] += 1
    assert outcomes["paid"] + outcomes["expired"] == 1000
    assert outcomes["paid"] >= 300 and outcomes["expired"] > 0, outcomes  # both sides won
    assert isinstance(fired, int) and fired <= outcomes["expired"]
    # nothing is left for a later timer pass to fire twice
    assert await h.runtime.fire_due() == 0


async def test_ten_concurrent_copies_of_each_callback(h: Harness) -> None:
    eids = await open_waits(h, 100, "c")
    requests = [h.client.post("/webview/callback", json={"executionId": e, "success": False})
                for e in eids.values() for _ in range(10)]
    responses = await asyncio.gather(*requests)
    await h.flush()
    by_eid: dict[str, list[int]] = {}
    for (eid, resp) in zip([e for e in eids.values() for _ in range(10)], responses, strict=True):
        by_eid.setdefault(eid, []).append(resp.status)
    wrong = [s for s in by_eid.values() if sorted(s) != [200] + [409] * 9]
    assert not wrong, wrong[:5]
    said = Counter(d.user_id for d in h.channel.sent if d.message.text == "failed")
    assert said == Counter(dict.fromkeys(eids, 1))
