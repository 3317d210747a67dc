"""`flowbot conversations` and `flowbot conversation` on a seeded database, SQLite and
PostgreSQL alike: what waits on what until when, with which variables, what was sent and
what failed — read-only, and never a full executionId or conversation_key."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bot.cli import main
from channels.base import SendError
from tests.support import harness, query, write_config

on_both = pytest.mark.usefixtures("both_backends")

FLOWS = """
[flows.main]
start = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Your name?"
variable = "name"
next = "choose"
[flows.main.blocks.choose]
type = "buttons"
text = "Pay or wait for the shop?"
choices = [{ label = "pay", next = "pay" }, { label = "shop", next = "hook" }]
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/p"
text = "Pay here"
expiration = 600
on_success = "bye"
on_error = "bye"
on_expired = "bye"
[flows.main.blocks.hook]
type = "webhook"
text = "Waiting for the shop"
timeout = 300
on_success = "bye"
on_failure = "bye"
[flows.main.blocks.bye]
type = "end"
text = "bye"
"""


@pytest.fixture
async def seeded(tmp_path: Path) -> dict[str, str]:
    """ann waits at the WebView, bob at the webhook, cy at the question (her last message
    failed for good); returns the secrets the output must not show, and the config."""
    config = write_config(tmp_path, FLOWS)
    async with harness(config) as h:
        for user in ("ann", "bob", "cy"):
            await h.say("hi", user=user)
        await h.say("Ann ✓ ‮RTL", user="ann")
        got = await h.say("pay", user="ann")
        link = next(m.link for m in got if m.link is not None)
        await h.say("Bob", user="bob")
        await h.say("shop", user="bob")
        h.channel.failures.append(SendError("chat not found", code="400", permanent=True))
        await h.say("Cy", user="cy")  # "Pay or wait…" fails for good
        keys = dict(await h.runtime.worker.run(
            query, "SELECT user_id, key FROM conversations"))
    return {"eid": parse_qs(urlsplit(link.url).query)["executionId"][0],
            "ann_key": keys["ann"], "bob_key": keys["bob"],
            "config": str(tmp_path / "config.toml")}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_no_secret(out: str, seeded: dict[str, str]) -> None:
    for name in ("eid", "ann_key", "bob_key"):
        assert seeded[name] not in out, name


@on_both
async def test_conversations_lists_and_filters(seeded: dict[str, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = seeded["config"]
    code, out = run(capsys, "conversations", "--config", cfg)
    assert code == 0
    assert "main/pay" in out and "webview" in out and "main/hook" in out and "main/choose" in out
    assert seeded["eid"] not in out and seeded["eid"][:6] in out  # the wait id, cut
    code, out = run(capsys, "conversations", "--config", cfg, "--waiting")
    assert [line.split()[2] for line in out.splitlines()[1:]] == sorted(
        ["ann", "bob"], key=lambda u: out.index(" " + u + " "))
    code, out = run(capsys, "conversations", "--config", cfg, "--block", "pay", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["user_id"] for r in rows] == ["ann"]
    assert rows[0]["wait"]["kind"] == "webview" and rows[0]["wait"]["state"] == "pending"
    assert rows[0]["wait"]["id"] == seeded["eid"][:6] + "…"
    assert rows[0]["key"] == seeded["ann_key"][:6] + "…"
    code, out = run(capsys, "conversations", "--config", cfg, "--block", "main/hook", "--json")
    assert [json.loads(x)["user_id"] for x in out.splitlines()] == ["bob"]
    code, out = run(capsys, "conversations", "--config", cfg, "--channel", "web")
    assert out.strip() == "no conversation matches"
    # the fake clock seeded them in November 2023: idle for 7 days, not since 2023-11-01
    code, out = run(capsys, "conversations", "--config", cfg, "--idle-since", "7d", "--json")
    assert len(out.splitlines()) == 3
    code, out = run(capsys, "conversations", "--config", cfg, "--idle-since", "2023-11-01")
    assert out.strip() == "no conversation matches"
    code, out = run(capsys, "conversations", "--config", cfg, "--idle-since", "soon")
    assert code == 2 and "30m, 12h, 7d" in out


@on_both
async def test_conversation_shows_one_by_key_or_user(seeded: dict[str, str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = seeded["config"]
    code, out = run(capsys, "conversation", "--config", cfg, "ann")
    assert code == 0
    assert "at:          main/pay (webview block)" in out
    assert "waiting for: webview at main/pay" in out and "deadline 2023-11-14" in out
    assert 'name = "Ann ✓ \u202eRTL"' in out
    assert "sent" in out and "Pay here" in out and "executionId=" + seeded["eid"][:6] + "…" in out
    assert_no_secret(out, seeded)
    assert seeded["ann_key"] not in out and "conversation_key = \"" + seeded["ann_key"][:6] in out

    code, out = run(capsys, "conversation", "--config", cfg, seeded["bob_key"], "--json")
    doc = json.loads(out)
    assert (doc["user_id"], doc["flow"], doc["block"]) == ("bob", "main", "hook")
    assert doc["waits"][0]["kind"] == "webhook" and doc["waits"][0]["holds"]
    assert [m["text"] for m in doc["messages"]] == [
        "Your name?", "Pay or wait for the shop?", "Waiting for the shop"]
    assert all(m["state"] == "sent" for m in doc["messages"])
    assert seeded["bob_key"] not in out

    code, out = run(capsys, "conversation", "--config", cfg, "cy", "--json")
    doc = json.loads(out)
    failed = doc["messages"][-1]
    assert failed["state"] == "failed" and "chat not found" in failed["error"]
    assert failed["buttons"] == ["pay", "shop"]

    code, out = run(capsys, "conversation", "--config", cfg, "nobody")
    assert code == 2 and "no conversation" in out


def test_inspection_needs_a_database_and_creates_none(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    write_config(tmp_path, FLOWS)
    code, out = run(capsys, "conversations", "--config", str(tmp_path / "config.toml"))
    assert code == 1 and "no database" in out
    assert not (tmp_path / "flowbot.db").exists()


def test_a_postgresql_database_without_tables_is_named_not_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_scratch: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWBOT_TEST_STORAGE", pg_scratch)
    write_config(tmp_path, FLOWS)
    cfg = str(tmp_path / "config.toml")
    for args in (["conversations"], ["conversation", "ann"]):
        code, out = run(capsys, *args, "--config", cfg)
        assert code == 1 and "has no flowbot tables yet" in out, out
        assert pg_scratch.rsplit("/", 1)[1] in out and "Traceback" not in out


def test_an_unreachable_postgresql_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWBOT_TEST_STORAGE", "postgresql://nobody@127.0.0.1:1/none")
    write_config(tmp_path, FLOWS)
    code, out = run(capsys, "conversations", "--config", str(tmp_path / "config.toml"))
    assert code == 1 and out.startswith("flowbot: cannot reach the PostgreSQL database none "
                                        "on 127.0.0.1:1: OperationalError"), out
    assert len(out.strip().splitlines()) == 1


def test_keys_never_look_like_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversation key (or executionId) starting with "-" was taken for an option by
    `flowbot conversation KEY` (one key in 64)."""
    from bot import ledger

    drawn = iter(["-Ab3" + "x" * 20, "Ab3-" + "x" * 20])
    monkeypatch.setattr(ledger.secrets, "token_urlsafe", lambda n: next(drawn))
    assert ledger.new_token() == "_Ab3" + "x" * 20
    assert ledger.new_token() == "Ab3-" + "x" * 20


async def test_a_key_that_starts_with_a_dash_is_shown_after_double_dash(
        seeded: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Keys made before new_token avoided a leading "-" still work, after `--`."""
    code, out = run(capsys, "conversation", "--config", seeded["config"], "--",
                    "-no-such-key")
    assert code == 2 and "no conversation" in out
