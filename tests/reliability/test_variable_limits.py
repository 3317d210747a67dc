"""Bounded variables: an event that would take a variable (or a conversation's variables)
past its limit is refused as a whole — nothing committed, the user told, the log naming the
variable — whether the value comes from a typed answer, a `set` loop, a webhook's mapping,
a WebView's callback data or a timer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from bot.engine import Engine, Links
from bot.errors import VariableTooLarge
from bot.state import Conversation
from channels.base import Inbound
from storage.store import Store
from tests.support import Harness, conversation_key, harness, write_config
from tests.test_engine import make_config
from tests.test_waits import SECRET, signed

LIMITS = """
[bot]
max_variable_bytes = 1024
max_conversation_bytes = 4096
"""
TOO_MUCH = "Too much for me, sorry."

FLOWS = f"""
[flows.main]
start = "menu"
error_message = "{TOO_MUCH}"

[flows.main.blocks.menu]
type = "buttons"
text = "Pick"
choices = [{{ label = "note", next = "note" }}, {{ label = "pay", next = "pay" }},
           {{ label = "hook", next = "hook" }}, {{ label = "double", next = "double" }},
           {{ label = "later", next = "later" }}]

[flows.main.blocks.note]
type = "input"
text = "Note?"
variable = "note"
next = "append"
[flows.main.blocks.append]
type = "set"
variable = "notes"
value = "{{{{notes}}}}{{{{note}}}}|"
next = "note"

[flows.main.blocks.pay]
type = "webview"
url = "https://pay.example/checkout"
text = "Pay here"
expiration = 60
response_variable = "payment"
on_success = "paid"
on_error = "paid"
on_expired = "paid"
[flows.main.blocks.paid]
type = "end"
text = "paid {{{{payment.ref}}}}"

[flows.main.blocks.hook]
type = "webhook"
timeout = 30
map = {{ order = "order" }}
on_success = "hooked"
on_failure = "hooked"
[flows.main.blocks.hooked]
type = "end"
text = "hooked {{{{order}}}}"

[flows.main.blocks.later]
type = "delay"
seconds = 5
next = "double"
[flows.main.blocks.double]
type = "set"
variable = "x"
value = "{{{{x}}}} {{{{x}}}}"
next = "double"
"""


@pytest.fixture
async def h(tmp_path: Path) -> Any:
    async with harness(write_config(tmp_path, FLOWS, LIMITS)) as h:
        yield h


async def snapshot(h: Harness, user: str = "u1") -> Conversation:
    conv = await h.runtime.worker.run(Store.conversation, "rec", user, "unused", 0)
    assert isinstance(conv, Conversation)
    return conv


def refused_in_log(caplog: pytest.LogCaptureFixture, what: str) -> bool:
    return any("refused an event" in r.getMessage() and what in r.getMessage()
               for r in caplog.records)


async def test_a_typed_answer_past_the_limit(h: Harness,
                                             caplog: pytest.LogCaptureFixture) -> None:
    await h.say("hi")
    assert await h.texts("note") == ["Note?"]
    before = await snapshot(h)
    with caplog.at_level(logging.WARNING):
        assert await h.texts("n" * 1100) == [TOO_MUCH]
    after = await snapshot(h)
    assert (after.block, after.variables) == (before.block, before.variables)  # nothing kept
    assert refused_in_log(caplog, "variable 'last_message' would be 1102 bytes; the limit is "
                                  "1024 (bot.max_variable_bytes), at main/note")
    assert await h.texts("short") == ["Note?"]  # still at the question; a fitting answer works
    assert (await snapshot(h)).variables["notes"] == "short|"


async def test_a_set_that_appends_in_a_loop(h: Harness,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The issue's 4 KB notes appended 2,000 times, at a smaller scale: the append that
    would pass the limit is refused, the notes kept so far stay."""
    await h.say("hi")
    await h.say("note")
    assert await h.texts("a" * 400) == ["Note?"]
    assert await h.texts("b" * 400) == ["Note?"]
    before = await snapshot(h)
    with caplog.at_level(logging.WARNING):
        assert await h.texts("c" * 400) == [TOO_MUCH]
    after = await snapshot(h)
    assert after.variables == before.variables and after.variables["note"] == "b" * 400
    assert refused_in_log(caplog, "variable 'notes' would be 1205 bytes")


async def test_a_set_that_doubles_in_a_loop_stops_at_the_limit(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Was: MemoryError. Now the event is refused and the user stays at the menu."""
    await h.say("hi")
    before = await snapshot(h)
    with caplog.at_level(logging.WARNING):
        assert await h.texts("double") == [TOO_MUCH]
    after = await snapshot(h)
    assert (after.block, after.variables) == (before.block, before.variables)
    assert "x" not in after.variables
    assert refused_in_log(caplog, "variable 'x' would be")
    assert [m.text for m in await h.say("note")] == ["Note?"]  # the menu still answers


async def test_webhook_mapping_past_the_limit_is_413_and_the_wait_stays(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    await h.say("hi")
    await h.say("hook")
    key = await h.runtime.worker.run(conversation_key, "rec", "u1")
    before = await snapshot(h)
    with caplog.at_level(logging.WARNING):
        status, body = await h.post("/webhook", json={"conversation_key": key,
                                                      "order": "o" * 2000})
    assert status == 413
    assert body["error"] == "variable_too_large"
    assert "'order'" in body["message"] and "Nothing was changed" in body["message"]
    assert refused_in_log(caplog, "variable 'order' would be 2002 bytes")
    after = await snapshot(h)
    assert (after.block, after.wait_id, after.variables) == (
        before.block, before.wait_id, before.variables)
    wait = await h.runtime.worker.run(Store.wait, after.wait_id)
    assert wait is not None and wait.state == "pending"
    assert [m.text for m in h.new_messages("u1")] == [TOO_MUCH]
    status, body = await h.post("/webhook", json={"conversation_key": key, "order": "A-1"})
    assert status == 200, body
    assert [m.text for m in h.new_messages("u1")] == ["hooked A-1"]


async def test_callback_data_past_the_limit_is_413_and_the_wait_stays(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    await h.say("hi")
    [link] = await h.say("pay")
    assert link.link is not None
    eid = parse_qs(urlsplit(link.link.url).query)["executionId"][0]
    before = await snapshot(h)
    with caplog.at_level(logging.WARNING):
        status, body = await h.post("/webview/callback", json={
            "executionId": eid, "success": True, "data": {"ref": "r" * 2000}})
    assert (status, body["error"]) == (413, "variable_too_large")
    assert "'payment'" in body["message"]
    assert refused_in_log(caplog, "variable 'payment' would be")
    after = await snapshot(h)
    assert (after.block, after.wait_id, after.variables) == (
        before.block, before.wait_id, before.variables)
    assert [m.text for m in h.new_messages("u1")] == [TOO_MUCH]
    status, body = await h.post("/webview/callback", json={
        "executionId": eid, "success": True, "data": {"ref": "R-1"}})
    assert status == 200, body
    assert [m.text for m in h.new_messages("u1")] == ["paid R-1"]


async def test_a_timer_that_would_pass_the_limit_ends_its_wait_and_keeps_the_user(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """An expiry can't be refused (it would fire again forever): the wait ends, the user
    stays at the block with the variables they had, and is told."""
    await h.say("hi")
    assert await h.texts("later") == []
    before = await snapshot(h)
    with caplog.at_level(logging.WARNING):
        assert await h.advance(5) == 1
    after = await snapshot(h)
    assert [m.text for m in h.new_messages("u1")] == [TOO_MUCH]
    assert (after.block, after.wait_id, after.variables) == ("later", None, before.variables)
    wait = await h.runtime.worker.run(Store.wait, before.wait_id)
    assert wait is not None and wait.state == "done"
    assert refused_in_log(caplog, "variable 'x' would be")
    assert await h.texts("again") == []  # the next message runs the delay block again
    assert (await snapshot(h)).wait_id is not None


async def test_all_variables_of_a_conversation_together(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    flows = """
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "input"
        text = "A?"
        variable = "a"
        next = "b"
        [flows.main.blocks.b]
        type = "input"
        text = "B?"
        variable = "b"
        next = "end"
        [flows.main.blocks.end]
        type = "end"
        text = "done"
    """
    limits = "[bot]\nmax_variable_bytes = 1024\nmax_conversation_bytes = 2048\n"
    async with harness(write_config(tmp_path, flows, limits)) as h:
        assert await h.texts("hi") == ["A?"]
        assert await h.texts("a" * 900) == ["B?"]
        before = await snapshot(h)
        with caplog.at_level(logging.WARNING):
            assert await h.texts("b" * 900) == [
                "Sorry, that was more than I can keep, so I could not go on. "
                "Please try again with something shorter."]  # bot.error_message
        assert (await snapshot(h)).variables == before.variables
        assert refused_in_log(caplog, "the conversation's variables (largest: ")
        assert refused_in_log(caplog, "the limit is 2048 (bot.max_conversation_bytes)")
        assert await h.texts("b") == ["done"]


def test_check_warns_about_a_set_that_doubles_in_a_loop() -> None:
    config = make_config(FLOWS)
    assert [w for w in config.warnings if w.startswith(
        "flows.main.blocks.double.value: uses {{x}} 2 times, so it multiplies it by 2 each "
        "round of the loop double → double")], config.warnings
    assert not [w for w in config.warnings if "blocks.append" in w]  # additive: no warning


def test_the_engine_stops_doubling_at_the_limit_without_memory_error() -> None:
    """The issue's case with the default limits: 2^100 would not fit in any memory."""
    config = make_config("""
        [flows.main]
        start = "double"
        [flows.main.blocks.double]
        type = "set"
        variable = "x"
        value = "{{x}}{{x}}ab"
        next = "double"
    """)
    engine = Engine(config.flows, config.bot, Links("http://b", "http://b/webhook"),
                    lambda: "id")
    conv = Conversation(id=1, channel="rec", user_id="u1", key="K")
    with pytest.raises(VariableTooLarge) as info:
        engine.on_message(conv, Inbound("rec", "u1", "go"), 0.0)
    assert (info.value.variable, info.value.limit) == ("x", 65536)
    assert 65536 < info.value.size <= 2 * 65536 + 4


@pytest.mark.parametrize(("bot", "error"), [
    ("max_variable_bytes = 10", "bot.max_variable_bytes: must be 1024..16777216, not 10"),
    ("max_variable_bytes = 8192\nmax_conversation_bytes = 4096",
     "bot.max_conversation_bytes: must be at least max_variable_bytes (8192), not 4096"),
])
def test_limits_are_validated(tmp_path: Path, bot: str, error: str) -> None:
    from bot.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, "[flows.main]\nstart = 'a'\n[flows.main.blocks.a]\ntype = 'end'\n",
                     f"[bot]\n{bot}\n")
    assert [e for e in info.value.errors if e.startswith(error)], info.value.errors


async def test_a_limit_lowered_between_restarts_does_not_lock_a_conversation_in(
        tmp_path: Path) -> None:
    """Config edited between restarts: a conversation already past the new limit goes on
    as long as an event does not make it larger."""
    flows = """
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "input"
        text = "A?"
        variable = "a"
        next = "b"
        [flows.main.blocks.b]
        type = "input"
        text = "B?"
        variable = "b"
        next = "a"
    """
    async with harness(write_config(tmp_path, flows)) as h:
        assert await h.texts("hi") == ["A?"]
        assert await h.texts("a" * 1000) == ["B?"]
        assert await h.texts("b" * 1000) == ["A?"]
    limits = "[bot]\nmax_variable_bytes = 1024\nmax_conversation_bytes = 1024\n"
    async with harness(write_config(tmp_path, flows, limits)) as h:
        assert await h.texts("x") == ["B?"]  # smaller than before: goes on
        assert await h.texts("y" * 700) == [
            "Sorry, that was more than I can keep, so I could not go on. "
            "Please try again with something shorter."]  # larger than before: refused
        assert (await snapshot(h)).variables["a"] == "x"


async def test_a_refused_signed_webhook_is_not_remembered_as_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third party that retries a refused message id (with less data) is judged again,
    not told "duplicate" for a payload that was never applied."""
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    flows = FLOWS.replace('map = {{ order = "order" }}'.replace("{{", "{").replace("}}", "}"),
                          'map = { order = "order" }\nsecret_env = "HOOK_SECRET"')
    async with harness(write_config(tmp_path, flows, LIMITS)) as h:
        await h.say("hi")
        await h.say("hook")
        key = await h.runtime.worker.run(conversation_key, "rec", "u1")
        big = json.dumps({"conversation_key": key, "order": "o" * 2000}).encode()
        status, body = await h.post("/webhook", data=big, headers=signed(big, "msg_1"))
        assert (status, body["error"]) == (413, "variable_too_large")
        small = json.dumps({"conversation_key": key, "order": "A-2"}).encode()
        status, body = await h.post("/webhook", data=small, headers=signed(small, "msg_1"))
        assert status == 200 and body.get("duplicate") is not True, body
        assert [m.text for m in h.new_messages("u1")] == [TOO_MUCH, "hooked A-2"]
