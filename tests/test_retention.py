"""Retention: finished data older than its `[retention]` age is deleted in small batches,
and dedupe stays right inside the window (a redelivered update is still handled once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import ConfigError
from tests.support import harness, query, write_config

pytestmark = pytest.mark.usefixtures("both_workers", "both_backends")

HOUR = 3600.0
DAY = 86400.0

FLOWS = """
[flows.main]
start = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Name?"
variable = "name"
next = "nap"
[flows.main.blocks.nap]
type = "delay"
seconds = 2592000
next = "bye"
[flows.main.blocks.bye]
type = "end"
text = "bye {{name}}"
"""

SMALL_BATCH = """
[retention]
batch = 10
"""


def counts(store: object) -> dict[str, int]:
    """A database job: rows per table (and outbox rows per channel and state)."""
    out = {t: query(store, f"SELECT count(*) FROM {t}")[0][0]  # type: ignore[arg-type]
           for t in ("events", "waits", "conversations", "outbox")}
    for channel, state, n in query(store, "SELECT channel, state, count(*) FROM outbox "  # type: ignore[arg-type]
                                   "GROUP BY channel, state"):
        out[f"{channel}_{state}"] = n
    return out


async def test_a_redelivered_update_inside_the_window_is_handled_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, FLOWS, SMALL_BATCH)
    async with harness(config) as h:
        assert await h.texts("hi", event_id="tg:1") == ["Name?"]
        h.clock.advance(47 * HOUR)  # Telegram redelivers within 24 h; the default keeps 72
        await h.runtime.prune()
        assert await h.texts("hi", event_id="tg:1") == []  # still known: not handled again
        assert (await h.runtime.worker.run(counts))["events"] == 1
        h.clock.advance(26 * HOUR)
        deleted = await h.runtime.prune()
        assert deleted.get("events") == 1
        assert (await h.runtime.worker.run(counts))["events"] == 0


async def test_old_finished_rows_go_young_and_unfinished_ones_stay(tmp_path: Path) -> None:
    config = write_config(tmp_path, FLOWS, SMALL_BATCH)
    async with harness(config) as h:
        for i in range(25):
            await h.say("hi", user=f"old{i}", event_id=f"e{i}")
        await h.runtime.worker.run(query, "UPDATE outbox SET state = 'failed' WHERE user_id = ?",
                                   ("old0",))
        web = ("INSERT INTO outbox (conversation_id, channel, user_id, message, state, "
               "next_attempt, created) VALUES (0, 'web', 's', '{\"text\":\"x\"}', 'sent', ?, ?)")
        await h.runtime.worker.run(query, web, (h.clock.now(), h.clock.now()))
        await h.say("Ann", user="old1")  # now waits 30 days at `nap`: a pending wait
        before = await h.runtime.worker.run(counts)
        assert before["waits"] == 1 and before["conversations"] == 25

        h.clock.advance(31 * DAY)  # past delivered / web history / ended waits (30 days)
        await h.advance(0)  # the delay fired: old1's wait ended, "bye Ann" sent
        await h.say("hi", user="young", event_id="young")
        deleted = await h.runtime.prune()
        after = await h.runtime.worker.run(counts)
        assert deleted["delivered"] == 24 and deleted["web_history"] == 1
        assert deleted["events"] == 25
        assert after["rec_failed"] == 1  # failed rows are kept 90 days: the reason stays
        assert after.get("web_sent", 0) == 0
        assert after["rec_sent"] == 2  # young's question and old1's "bye Ann"
        assert deleted["ended_waits"] == 1 and after["waits"] == 0  # begun 31 days ago
        assert after["events"] == 1

        h.clock.advance(60 * DAY)
        deleted = await h.runtime.prune()
        after = await h.runtime.worker.run(counts)
        assert deleted["failed"] == 1 and after.get("rec_failed", 0) == 0


async def test_idle_conversations_go_with_their_variables_but_never_a_waiting_one(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, FLOWS, SMALL_BATCH)
    async with harness(config) as h:
        for i in range(35):
            await h.say("hi", user=f"idle{i}")
        await h.say("hi", user="waiter")
        await h.say("Bob", user="waiter")  # a 30-day delay: waits, never idle
        await h.runtime.worker.run(query, "UPDATE outbox SET state = 'pending', "
                                   "next_attempt = 9e18 WHERE user_id = 'idle0'")
        h.clock.advance(181 * DAY)
        await h.runtime.worker.run(query, "UPDATE waits SET deadline = 9e18")  # still open
        deleted = await h.runtime.prune()
        assert deleted["idle_conversations"] == 34  # idle0 still has a message to send
        left = {u for (u,) in await h.runtime.worker.run(
            query, "SELECT user_id FROM conversations")}
        assert left == {"waiter", "idle0"}
        assert await h.runtime.worker.run(query, "SELECT state FROM waits") == [("pending",)]
        # a deleted user who comes back starts afresh, with no variable of before
        assert await h.texts("hi", user="idle5") == ["Name?"]
        (variables,) = (await h.runtime.worker.run(
            query, "SELECT variables FROM conversations WHERE user_id = 'idle5'"))[0]
        assert '"name"' not in variables


@pytest.mark.parametrize(("setting", "words"), [
    ("events_hours = 24", "Telegram redelivers"),
    ("idle_conversations_days = 7", "30 days"),
    ("batch = 0", "10..10000"),
])
def test_retention_settings_that_would_lose_data_are_refused(
        tmp_path: Path, setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        write_config(tmp_path, FLOWS, f"[retention]\n{setting}\n")
    assert any(e.startswith("retention.") and words in e for e in err.value.errors), \
        err.value.errors


def test_zero_keeps_forever(tmp_path: Path) -> None:
    config = write_config(tmp_path, FLOWS, "[retention]\nevents_hours = 0\ndelivered_days = 0\n")
    cut = config.retention.cutoffs(1e9)
    assert "events" not in cut and "delivered" not in cut and "failed" in cut
