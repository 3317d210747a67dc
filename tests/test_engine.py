"""The engine alone: transcripts of every block, without aiohttp or SQLite."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bot.config import BotConfig, Config, parse_config
from bot.engine import Engine, Links, button_tag, webview_link
from bot.state import Conversation, Step, Wait
from bot.toml_reader import Problems
from channels.base import Inbound, Message

NOW = 1000.0


def make_config(flows: str, bot: str = "") -> Config:
    doc = tomllib.loads(textwrap.dedent(bot) + textwrap.dedent(flows))
    problems = Problems()
    config = parse_config(doc, Path("/tmp"), problems)
    assert problems.errors == []
    return config


class Chat:
    """A conversation driven through the pure engine; keeps what was said."""

    def __init__(self, flows: str, bot: str = "") -> None:
        config = make_config(flows, bot)
        counter = itertools.count(1)
        self.engine = Engine(config.flows, config.bot,
                             Links("http://bot.test", "http://bot.test/webhook"),
                             lambda: f"id{next(counter)}")
        self.conv = Conversation(id=1, channel="rec", user_id="u1", key="KEY")
        self.last: Step = Step()
        self.waits: list[Wait] = []  # every wait the engine asked for, in order

    def say(self, text: str = "", payload: str | None = None, **kw: object) -> list[str]:
        self.last = self.engine.on_message(self.conv, Inbound("rec", "u1", text, payload, **kw),
                                           NOW)  # type: ignore[arg-type]
        self.waits += self.last.waits
        return [m.text for m in self.last.messages]

    def resolve(self, outcome: str, data: object = None) -> list[str]:
        self.last = self.engine.on_wait(self.conv, self.waits[-1], outcome, data, NOW + 1)
        self.waits += self.last.waits
        return [m.text for m in self.last.messages]

    @property
    def vars(self) -> dict[str, object]:
        return self.conv.variables


def test_message_input_and_end() -> None:
    chat = Chat("""
        [flows.main]
        start = "hi"
        [flows.main.blocks.hi]
        type = "message"
        text = "Hello {{user_name}}!"
        next = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "Your age?"
        variable = "age"
        validation = "number"
        retry_message = "A number, please."
        next = "done"
        [flows.main.blocks.done]
        type = "end"
        text = "You are {{age}}."
    """)
    assert chat.say("hi", user_name="Ann") == ["Hello Ann!", "Your age?"]
    assert chat.say("old") == ["A number, please.", "Your age?"]
    assert chat.say("42") == ["You are 42."]
    assert chat.vars["age"] == 42
    assert chat.conv.block is None
    # after the end, any message starts over
    assert chat.say("again") == ["Hello Ann!", "Your age?"]


@pytest.mark.parametrize(("validation", "good", "bad"), [
    ("text", "anything", "   "),
    ("number", "3,5", "three"),
    ("email", "ann@example.com", "ann@example"),
    ("phone", "+49 (30) 1234-567", "12ab"),
])
def test_input_validations(validation: str, good: str, bad: str) -> None:
    chat = Chat(f"""
        [flows.main]
        start = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "?"
        variable = "v"
        validation = "{validation}"
        next = "ok"
        [flows.main.blocks.ok]
        type = "message"
        text = "got {{{{v}}}}"
    """)
    chat.say("start")
    assert chat.say(bad) == [f"Sorry, that is not a valid {validation}.", "?"]
    assert chat.say(good)[0].startswith("got ")


def test_input_regex() -> None:
    chat = Chat("""
        [flows.main]
        start = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "Order number?"
        variable = "order"
        validation = "regex"
        pattern = "A-\\\\d{4}"
        next = "ok"
        [flows.main.blocks.ok]
        type = "message"
        text = "Order {{order}}"
    """)
    chat.say("x")
    assert chat.say("A-12") == ["Sorry, that is not a valid regex.", "Order number?"]
    assert chat.say("A-1234") == ["Order A-1234"]


BUTTONS = """
    [flows.main]
    start = "menu"
    [flows.main.blocks.menu]
    type = "buttons"
    text = "Pick"
    variable = "pick"
    choices = [
      { label = "Red", next = "red" },
      { label = "Blue", next = "blue", value = "b" },
    ]
    [flows.main.blocks.red]
    type = "message"
    text = "red {{pick}}"
    [flows.main.blocks.blue]
    type = "message"
    text = "blue {{pick}}"
"""


def test_buttons_by_press_label_and_number() -> None:
    chat = Chat(BUTTONS)
    chat.say("hi")
    shown: Message = chat.last.messages[0]
    assert [b.label for b in shown.buttons] == ["Red", "Blue"]
    assert shown.buttons[1].payload == f"{button_tag('main', 'menu')}:1"
    assert chat.say("", payload=shown.buttons[1].payload) == ["blue b"]
    chat.say("/start")
    assert chat.say("red") == ["red Red"]
    chat.say("/start")
    assert chat.say("2") == ["blue b"]


def test_buttons_reask_on_anything_else_and_stale_press() -> None:
    chat = Chat(BUTTONS)
    chat.say("hi")
    assert chat.say("green") == ["Please choose one of the options.", "Pick"]
    assert chat.last.messages[1].buttons  # the buttons are shown again
    assert chat.say("", payload="deadbeef:0") == ["Please choose one of the options.", "Pick"]


@pytest.mark.parametrize(("op", "value", "var", "expected"), [
    ("equals", "yes", "YES", "hit"),
    ("not_equals", "yes", "no", "hit"),
    ("contains", "ell", "hello", "hit"),
    ("not_contains", "x", "hello", "hit"),
    ("is_empty", "", "", "hit"),
    ("is_not_empty", "", "a", "hit"),
    ("greater_than", "10", "11", "hit"),
    ("greater_than", "10", "9", "miss"),
    ("less_than", "10", "9", "hit"),
    ("less_than", "10", "abc", "miss"),
    ("matches", "^\\\\d+$", "123", "hit"),
    ("matches", "^\\\\d+$", "12a", "miss"),
])
def test_condition_ops(op: str, value: str, var: str, expected: str) -> None:
    chat = Chat(f"""
        [flows.main]
        start = "set"
        [flows.main.blocks.set]
        type = "set"
        variable = "x"
        value = "{var}"
        next = "cond"
        [flows.main.blocks.cond]
        type = "condition"
        rules = [{{ variable = "x", op = "{op}", value = "{value}", next = "hit" }}]
        else = "miss"
        [flows.main.blocks.hit]
        type = "message"
        text = "hit"
        [flows.main.blocks.miss]
        type = "message"
        text = "miss"
    """)
    assert chat.say("go") == [expected]


def test_jump_to_block_and_other_flow() -> None:
    chat = Chat("""
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "jump"
        block = "b"
        [flows.main.blocks.b]
        type = "message"
        text = "in main"
        next = "c"
        [flows.main.blocks.c]
        type = "jump"
        flow = "other"
        [flows.other]
        start = "x"
        [flows.other.blocks.x]
        type = "message"
        text = "in other"
    """)
    assert chat.say("go") == ["in main", "in other"]
    assert chat.conv.flow == "other"


def test_loop_stops_with_logged_error(caplog: pytest.LogCaptureFixture) -> None:
    chat = Chat("""
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "message"
        text = "tick"
        next = "b"
        [flows.main.blocks.b]
        type = "jump"
        block = "a"
    """, bot="[bot]\nmax_steps = 20\n")
    said = chat.say("go")
    assert said == ["tick"] * 10
    assert chat.conv.block is None
    assert "without waiting for anyone" in caplog.text


def test_delay_waits_then_goes_on() -> None:
    chat = Chat("""
        [flows.main]
        start = "d"
        [flows.main.blocks.d]
        type = "delay"
        seconds = 30
        next = "m"
        [flows.main.blocks.m]
        type = "message"
        text = "later"
    """)
    assert chat.say("go") == []
    (wait,) = chat.last.waits
    assert (wait.kind, wait.deadline) == ("delay", NOW + 30)
    assert chat.say("hello?") == [BotConfig.default_pending_message]
    assert chat.resolve("done") == ["later"]


WEBVIEW = """
    [flows.main]
    start = "pay"
    [flows.main.blocks.pay]
    type = "webview"
    url = "https://pay.example/checkout?shop=1#top"
    text = "Pay here"
    button = "Pay {{amount}}"
    input_variables = ["amount", "name"]
    expiration = 60
    pending_message = "Finish paying first, {{name}}."
    response_variable = "payment"
    on_success = "ok"
    on_error = "bad"
    on_expired = "late"
    [flows.main.blocks.ok]
    type = "message"
    text = "paid {{payment.ref}}"
    [flows.main.blocks.bad]
    type = "message"
    text = "failed {{payment.reason}}"
    [flows.main.blocks.late]
    type = "message"
    text = "expired"
"""


@pytest.mark.parametrize(("outcome", "data", "said"), [
    ("success", {"ref": "R1"}, ["paid R1"]),
    ("error", {"reason": "declined"}, ["failed declined"]),
    ("expired", None, ["expired"]),
])
def test_webview_branches(outcome: str, data: object, said: list[str]) -> None:
    chat = Chat(WEBVIEW)
    chat.vars.update(amount="9.99", name="Ann & Bob")
    assert chat.say("go") == ["Pay here"]
    link = chat.last.messages[0].link
    assert link is not None and link.label == "Pay 9.99"
    (wait,) = chat.last.waits
    assert (wait.kind, wait.blocking, wait.deadline) == ("webview", True, NOW + 60)
    assert chat.say("hello?") == ["Finish paying first, Ann & Bob."]
    assert chat.resolve(outcome, data) == said


def test_webview_link_building() -> None:
    v = {"name": "Ann & Bob/é", "n": 3}
    url = webview_link("http://bot.test", "https://p.example/x?a=1#frag", v, "EID", ("name", "n"))
    parts = urlsplit(url)
    assert parts.fragment == "frag"
    assert parse_qs(parts.query) == {"a": ["1"], "executionId": ["EID"],
                                      "name": ["Ann & Bob/é"], "n": ["3"]}
    assert url.startswith("https://p.example/x?a=1&executionId=EID&name=Ann+%26+Bob%2F")
    assert webview_link("http://bot.test", "https://p.example/x", {}, "E", ()) == \
        "https://p.example/x?executionId=E"
    assert webview_link("http://bot.test/pre", "/demo/webview", {}, "E", ()) == \
        "http://bot.test/pre/demo/webview?executionId=E"


def test_webview_non_blocking_goes_on_and_keeps_data() -> None:
    chat = Chat("""
        [flows.main]
        start = "form"
        [flows.main.blocks.form]
        type = "webview"
        url = "https://form.example"
        text = "Fill in when you like"
        blocking = false
        response_variable = "form"
        next = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "Meanwhile, your city?"
        variable = "city"
    """)
    assert chat.say("go") == ["Fill in when you like", "Meanwhile, your city?"]
    wait = chat.last.waits[0]
    assert not wait.blocking
    assert chat.engine.on_wait(chat.conv, wait, "success", {"x": 1}, NOW).messages == []
    assert chat.vars["form"] == {"x": 1}
    assert chat.conv.block == "ask"


WEBHOOK = """
    [flows.main]
    start = "wait"
    [flows.main.blocks.wait]
    type = "webhook"
    text = "Send to {{webhook_url}} with key {{conversation_key}}"
    timeout = 30
    map = { status = "order.status", first = "items.0.id", missing = "nope.x" }
    save_payload_to = "payload"
    on_success = "ok"
    on_failure = "fail"
    [flows.main.blocks.ok]
    type = "message"
    text = "{{status}} {{first}} [{{missing}}]"
    [flows.main.blocks.fail]
    type = "message"
    text = "timed out"
"""


def test_webhook_maps_fields_and_fails_on_timeout() -> None:
    chat = Chat(WEBHOOK)
    assert chat.say("go") == ["Send to http://bot.test/webhook/KEY with key KEY"]
    payload = {"order": {"status": "paid"}, "items": [{"id": 7}]}
    assert chat.resolve("success", payload) == ["paid 7 []"]
    assert chat.vars["payload"] == payload and chat.vars["missing"] == ""
    chat.say("/start")
    assert chat.resolve("failure") == ["timed out"]


def test_restart_word_cancels_the_pending_wait() -> None:
    chat = Chat(WEBHOOK, bot='[bot]\nrestart_words = ["/start", "menu"]\n')
    chat.say("go")
    wait_id = chat.conv.wait_id
    chat.say("MENU")
    assert chat.last.cancelled_wait == wait_id
    assert chat.conv.wait_id != wait_id


def test_builtin_variables() -> None:
    chat = Chat("""
        [flows.main]
        start = "m"
        [flows.main.blocks.m]
        type = "message"
        text = "{{channel}} {{user_id}} {{user_name}} {{last_message}} {{conversation_key}}"
    """)
    assert chat.say("hey", user_name="Zoe") == ["rec u1 Zoe hey KEY"]


def test_engine_imports_neither_aiohttp_nor_sqlite() -> None:
    code = ("import sys, bot.engine; "
            "bad = {'aiohttp', 'sqlite3', 'telegram', 'twilio'} & set(sys.modules); "
            "assert not bad, bad")
    # not under coverage (.ci/run measures subprocesses): coverage itself imports sqlite3
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
