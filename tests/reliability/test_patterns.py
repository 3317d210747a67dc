"""Admin-written regexes (input `pattern`, condition `matches`) can't stall the bot: one user
typing text that makes a pattern backtrack must not hold up anyone else's chat or callback."""

from __future__ import annotations

import asyncio
import logging
import os
import textwrap
import time
from pathlib import Path

import pytest

from bot import patterns
from bot.config import Config, load_config
from channels.base import Inbound
from tests.test_engine import Chat
from tests.test_web_channel import Tab, chat_app, execution_id, texts

# The issue's pattern: `re` needs 9.6 s for 28 letters and "!"; `regex` answers at once.
ISSUE_PATTERN = r"([A-Za-z]+\s?)*"
ISSUE_TEXT = "abcdefghijklmnopqrstuvwxyzab!"
# One that `regex`'s own guards don't save: only the time limit stops it.
TIMEOUT_PATTERN = r"(a|aa)+$"
TIMEOUT_TEXT = "a" * 40 + "!"

FLOWS = """
[flows.main]
start = "which"
[flows.main.blocks.which]
type = "buttons"
text = "Pay or code?"
choices = [{{ label = "pay", next = "pay" }}, {{ label = "code", next = "code" }}]
[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Pay here"
expiration = 600
on_success = "paid"
on_error = "paid"
on_expired = "paid"
[flows.main.blocks.paid]
type = "end"
text = "paid"
[flows.main.blocks.code]
type = "input"
text = "Your code?"
variable = "code"
validation = "regex"
pattern = '{pattern}'
retry_message = "Not a code."
next = "check"
[flows.main.blocks.check]
type = "condition"
rules = [{{ variable = "code", op = "matches", value = '{pattern}', next = "ok" }}]
else = "ok"
[flows.main.blocks.ok]
type = "end"
text = "got {{{{code}}}}"
"""


def web_config(tmp_path: Path, pattern: str) -> Config:
    """FLOWS with `pattern`, on the web chat channel."""
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        public_url = "http://bot.test"
        [storage]
        path = "{tmp_path / 'flowbot.db'}"
        worker = "{os.environ.get('FLOWBOT_TEST_WORKER', 'thread')}"
        [channels.web]
        enabled = true
        [bot]
        # the regex library counts CPU time: on a busy CI machine the default 0.05 s
        # can stretch to ~0.5 s of wall time, too close to the 1 s this test allows
        regex_timeout = 0.01
    """) + FLOWS.format(pattern=pattern))
    return load_config(path)


@pytest.mark.usefixtures("both_workers")
@pytest.mark.parametrize(("pattern", "text", "fine"), [(ISSUE_PATTERN, ISSUE_TEXT, "abc de"),
                                                       (TIMEOUT_PATTERN, TIMEOUT_TEXT, "aaa")])
async def test_catastrophic_pattern_does_not_hold_up_a_callback(
        tmp_path: Path, pattern: str, text: str, fine: str) -> None:
    """One user types the text that makes the pattern backtrack; at the same moment another
    user's payment page posts its callback. The callback is answered in well under a second
    and the typist gets the retry message (a time-out counts as no match)."""
    async with chat_app(web_config(tmp_path, pattern)) as chat:
        payer, typist = Tab(chat, "a" * 32), Tab(chat, "b" * 32)
        await payer.open()
        await typist.open()
        assert texts(await payer.say("hi")) == ["Pay or code?"]
        [link] = await payer.say("pay")
        assert texts(await typist.say("hi")) == ["Pay or code?"]
        assert texts(await typist.say("code")) == ["Your code?"]

        # the typist's message is queued for the database worker before the callback
        queued = asyncio.Event()
        handle = chat.runtime.handle_inbound
        started = 0.0

        async def noting(event: Inbound) -> bool:
            nonlocal started
            started = time.perf_counter()  # a frozen event loop counts against the callback
            queued.set()
            return await handle(event)

        chat.runtime.handle_inbound = noting  # type: ignore[method-assign]
        assert typist.ws is not None
        await typist.ws.send_json({"type": "text", "id": "slow", "text": text})
        await asyncio.wait_for(queued.wait(), 5)
        await asyncio.sleep(0)  # `handle` ran up to its job's submission
        resp = await chat.client.post("/webview/callback", json={
            "executionId": execution_id(link), "success": True, "data": {}})
        took = time.perf_counter() - started
        assert resp.status == 200, await resp.text()
        assert took < 1.0, f"the callback waited {took:.2f}s behind one user's regex"
        assert texts(await payer.messages()) == ["paid"]
        assert texts(await typist.messages()) == ["Not a code.", "Your code?"]
        assert texts(await typist.say(fine)) == [f"got {fine}"]  # a fitting answer still works


def test_time_out_counts_as_no_match_and_is_logged_once_a_minute(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patterns, "_throttle", patterns._Throttle())
    chat = Chat(FLOWS.format(pattern=TIMEOUT_PATTERN), bot="[bot]\nregex_timeout = 0.01\n")
    chat.say("hi")
    chat.say("code")
    with caplog.at_level(logging.WARNING, logger="bot.patterns"):
        for _ in range(3):
            assert chat.say(TIMEOUT_TEXT) == ["Not a code.", "Your code?"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # rate-limited: one line for three time-outs
    assert lines[0].startswith("flows.main.blocks.code.pattern: the pattern '(a|aa)+$' took "
                               "longer than 0.01s on a user's text; counted as no match")
    assert chat.say("aaaa") == ["got aaaa"]
    assert chat.vars["code"] == "aaaa"


def test_matches_condition_times_out_to_no_match(caplog: pytest.LogCaptureFixture) -> None:
    chat = Chat("""
        [flows.main]
        start = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "Say"
        variable = "said"
        next = "check"
        [flows.main.blocks.check]
        type = "condition"
        rules = [{ variable = "said", op = "matches", value = '(a|aa)+$', next = "yes" }]
        else = "no"
        [flows.main.blocks.yes]
        type = "end"
        text = "yes"
        [flows.main.blocks.no]
        type = "end"
        text = "no"
    """, bot="[bot]\nregex_timeout = 0.01\n")
    chat.say("hi")
    with caplog.at_level(logging.WARNING, logger="bot.patterns"):
        assert chat.say(TIMEOUT_TEXT) == ["no"]
    assert "flows.main.blocks.check.rules.0.value: the pattern" in caplog.text
    chat.say("hi")
    assert chat.say("aaa") == ["yes"]


def test_patterns_keep_python_syntax_and_meaning() -> None:
    """What admins test in Python works: Unicode \\w, lookarounds, backreferences."""
    def fits(pattern: str, text: str) -> bool:
        return patterns.matches(pattern, text, whole=True, timeout=0.1, place="t")
    assert fits(r"\w+", "Ñandú") and fits(r"\d+", "١٢٣")  # Unicode letters and digits
    assert fits(r"(?=.*\d)[a-z\d]{6,}", "abc123") and not fits(r"(?=.*\d)[a-z\d]{6,}", "abcdef")
    assert fits(r"(\w)\1", "aa") and not fits(r"(\w)\1", "ab")
    assert patterns.problem("(") is not None and patterns.problem(r"(?P<x>a)(?P=x)") is None
