"""Config validation and the `check` / `graph` commands, as an admin meets them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import load_config
from bot.errors import ConfigError
from tests.prereq import require

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


def test_example_config_passes_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr()
    assert "ok (1 flow(s)" in out.out
    assert "warning" not in out.err


def test_example_flow_uses_both_waits() -> None:
    config = load_config(EXAMPLE)
    kinds = {type(b).__name__ for b in config.flows["main"].blocks.values()}
    assert {"WebViewBlock", "WebhookBlock", "InputBlock", "ButtonsBlock"} <= kinds


def test_every_problem_is_reported_at_once_with_its_place(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, """
        [server]
        port = "eighty"
        colour = "blue"
        [flows.main]
        start = "hello"
        [flows.main.blocks.hello]
        type = "mesage"
        [flows.main.blocks.pay]
        type = "webview"
        url = "https://pay.example"
        text = "Pay"
        expiration = 0
        on_success = "done"
        on_error = "done"
        on_expired = "expird"
        [flows.main.blocks.expired]
        type = "end"
        [flows.main.blocks.done]
        type = "end"
        [flows.main.blocks.hook]
        type = "webhook"
        timeout = 301
        on_success = "done"
        on_failure = "done"
        map = { "a b" = "x" }
    """)
    assert "server.port: must be a whole number, not str 'eighty'" in errors
    assert "server.colour: unknown key" in errors
    assert ("flows.main.blocks.hello.type: must be one of message, input, buttons, condition, "
            "set, http, delay, jump, end, webview, webhook, not 'mesage' "
            "(did you mean 'message'?)") in errors
    assert "flows.main.blocks.pay.expiration: must be 1..86400, not 0" in errors
    assert ("flows.main.blocks.pay.on_expired: no block named 'expird' "
            "(did you mean 'expired'?)") in errors
    assert "flows.main.blocks.hook.timeout: must be 1..300, not 301" in errors
    assert "flows.main.blocks.hook.map.a b: is not a variable name (letters, digits, _)" in errors


@pytest.mark.parametrize(("block", "error"), [
    ('type = "message"', "flows.main.blocks.b.text: is required"),
    ('type = "message"\ntext = "x"\nnext = "nowhere"',
     "flows.main.blocks.b.next: no block named 'nowhere'"),
    ('type = "input"\ntext = "x"\nvariable = "conversation_key"',
     "flows.main.blocks.b.variable: 'conversation_key' is a built-in variable and cannot be set"),
    ('type = "input"\ntext = "x"\nvariable = "v"\nvalidation = "regex"\npattern = "("',
     "flows.main.blocks.b.pattern: is not a valid regular expression"),
    ('type = "buttons"\ntext = "x"\nchoices = []',
     "flows.main.blocks.b.choices: must be a non-empty list"),
    ('type = "buttons"\ntext = "x"\nchoices = [' + ", ".join(
        f'{{label = "c{i}"}}' for i in range(11)) + "]",
     "flows.main.blocks.b.choices: has 11 choices; at most 10"),
    ('type = "condition"\nrules = [{variable = "x", op = "bigger", value = "1"}]',
     "flows.main.blocks.b.rules.0.op: must be one of"),
    ('type = "condition"\nrules = [{variable = "x", op = "greater_than", value = "ten"}]',
     "flows.main.blocks.b.rules.0.value: must be a number for greater_than"),
    ('type = "http"\nurl = "ftp://x"', "flows.main.blocks.b.url: must start with http://"),
    ('type = "http"\nurl = "https://x"\nmethod = "BREW"', "flows.main.blocks.b.method: must be one of"),
    ('type = "http"\nurl = "https://x"\nmap = {' + ", ".join(
        f'v{i} = "a"' for i in range(51)) + "}",
     "flows.main.blocks.b.map: maps 51 fields; at most 50 are allowed"),
    ('type = "webhook"\ntimeout = 0\non_success = "a"\non_failure = "a"',
     "flows.main.blocks.b.timeout: must be 1..300, not 0"),
    ('type = "webhook"\ntimeout = 10\non_success = "a"',
     "flows.main.blocks.b.on_failure: is required"),
    ('type = "webview"\nurl = "https://x"\ntext = "t"\nexpiration = 10\non_success = "a"\n'
     'on_error = "a"', "flows.main.blocks.b.on_expired: is required"),
    ('type = "webview"\nurl = "https://x"\ntext = "t"\non_success = "a"\non_error = "a"\n'
     'on_expired = "a"', "flows.main.blocks.b.expiration: is required"),
    ('type = "webview"\nurl = "https://x"\ntext = "t"\nblocking = false\non_success = "a"',
     "flows.main.blocks.b.on_success: is only for blocking = true"),
    ('type = "jump"', "flows.main.blocks.b: needs exactly one of `block`"),
    ('type = "jump"\nflow = "other"', "flows.main.blocks.b.flow: no flow named 'other'"),
    ('type = "delay"\nseconds = -1', "flows.main.blocks.b.seconds: must be 0..2.592e+06"),
    ('type = "message"\ntext = "t"\nimage = "ftp://cdn/x.png"',
     "flows.main.blocks.b.image: must be an http:// or https:// URL"),
    ('type = "message"\nimage = "https://cdn/a b.png"',
     "flows.main.blocks.b.image: must be one URL, without spaces"),
    ('type = "message"\ntext = "t"\nimage = "https://"',
     "flows.main.blocks.b.image: needs a host after http(s)://"),
    ('type = "message"\ntext = "t"\nimage = "https:///x.png"',
     "flows.main.blocks.b.image: needs a host after http(s)://"),
    ('type = "input"\ntext = "t"\nvariable = "v"\ndocument = "cdn/terms.pdf"',
     "flows.main.blocks.b.document: must be an http:// or https:// URL"),
    ('type = "message"\nimage = "https://cdn/a.png"\ndocument = "https://cdn/a.pdf"',
     "flows.main.blocks.b.document: a block sends one file"),
    ('type = "message"', "flows.main.blocks.b.text: is required"),
])
def test_each_kind_of_block_error(tmp_path: Path, block: str, error: str) -> None:
    errors = errors_of(tmp_path, """
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "jump"
        block = "b"
        [flows.main.blocks.b]
    """ + block + "\n")
    assert any(e.startswith(error) for e in errors), errors


def test_literal_secrets_are_refused(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, """
        [channels.telegram]
        token = "123456789:AAHfiqksKZ8WmR2zSjiQ7_v4TMAKdiHm9T0"
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "message"
        text = "use 123456789:AAHfiqksKZ8WmR2zSjiQ7_v4TMAKdiHm9T0"
    """)
    assert any(e.startswith("channels.telegram.token: secrets are not written in the config")
               for e in errors)
    assert ("flows.main.blocks.a.text: looks like a bot token; keep secrets in environment "
            "variables") in errors


def test_start_flow_and_toml_syntax(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, """
        [bot]
        start_flow = "mian"
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "end"
    """)
    assert errors == ["bot.start_flow: no flow named 'mian' (did you mean 'main'?)"]
    (tmp_path / "broken.toml").write_text("[flows\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "broken.toml")
    assert "not valid TOML" in info.value.errors[0]


def test_check_exits_2_and_lists_problems_without_traceback(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    text = EXAMPLE.read_text().replace('on_expired = "payment_expired"',
                                       'on_expired = "payment_expird"')
    broken.write_text(text.replace('timeout = 300', 'timeout = 900'))
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "check", "--config", str(broken)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert ("error: flows.main.blocks.pay.on_expired: no block named 'payment_expird' "
            "(did you mean 'payment_expired'?)") in proc.stderr
    assert "error: flows.main.blocks.webhook_intro.timeout: must be 1..300, not 900" in proc.stderr
    # payment_expired is unreachable only because of the typo: no second message about it
    assert "no path from the start reaches it" not in proc.stderr
    assert proc.stderr.splitlines()[0].endswith(": 2 errors:")
    assert len(proc.stderr.splitlines()) == 3
    missing = subprocess.run([sys.executable, "-m", "bot.cli", "check", "--config", "nope.toml"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read it" in missing.stderr


def test_unreachable_blocks_are_warned_not_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent("""
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "end"
        [flows.main.blocks.orphan]
        type = "end"
    """))
    assert main(["check", "--config", str(path)]) == 0
    assert "warning: flows.main.blocks.orphan: no path from the start reaches it" in \
        capsys.readouterr().err


def _named(text: str) -> str:
    """A Mermaid or dot drawing with its node ids (n0, n1, …) replaced by their labels'
    first word (the block's name), so tests can read edges."""
    names = dict(re.findall(r'^    (n\d+)\s*[\[(]+"([^" ]*)', text, re.M)
                 + re.findall(r'^    (n\d+) \[shape=\w+, (?:color=red, fontcolor=red, )?'
                              r'label="([^" ]*)', text, re.M))
    return re.sub(r"\bn\d+\b", lambda m: names.get(m.group(), m.group()), text)


def test_graph_labels_every_edge(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "--config", str(EXAMPLE)]) == 0
    out = _named(capsys.readouterr().out)
    assert out.startswith("flowchart TD")
    for edge in ('pay -->|"success"| paid', 'pay -->|"error"| payment_failed',
                 'pay -->|"expired"| payment_expired', 'webhook_intro -->|"failure"| webhook_timeout',
                 'menu -->|"Pay with a web page"| price', 'bye["bye (end)"]'):
        assert edge in out
    assert main(["graph", "--config", str(EXAMPLE), "--format", "dot"]) == 0
    dot = _named(capsys.readouterr().out)
    assert 'pay -> payment_expired [label="expired"];' in dot


def test_graphviz_renders_the_dot_graph(capsys: pytest.CaptureFixture[str]) -> None:
    require(shutil.which("dot"), "graphviz's dot", "apt-get install graphviz; .ci/run does")
    assert main(["graph", "--config", str(EXAMPLE), "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, text=True, check=True, capture_output=True).stdout
    assert "<svg" in svg and "payment_expired" in svg


def test_graph_shows_condition_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent("""
        [flows.main]
        start = "c"
        [flows.main.blocks.c]
        type = "condition"
        rules = [{ variable = "age", op = "greater_than", value = "17", next = "adult" }]
        else = "child"
        [flows.main.blocks.adult]
        type = "end"
        [flows.main.blocks.child]
        type = "end"
    """))
    assert main(["graph", "--config", str(path)]) == 0
    out = _named(capsys.readouterr().out)
    assert 'c -->|"age greater_than 17"| adult' in out
    assert 'c -->|"else"| child' in out


def test_every_cli_command_has_help() -> None:
    for args in (["--help"], ["check", "--help"], ["graph", "--help"], ["serve", "--help"],
                 ["telegram", "webhook-info", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 0 and "usage: flowbot" in proc.stdout


# -- one problem, one message (issue 16) ------------------------------------------------

def _check(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    # the header counts exactly the lines below it
    errors = [x for x in lines[1:] if x.startswith("  error: ")]
    warnings = [x for x in lines[1:] if x.startswith("  warning: ")]
    assert len(errors) + len(warnings) == len(lines) - 1
    header = f"{path}: {len(errors)} error{'s' if len(errors) != 1 else ''}"
    if warnings:
        header += f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}"
    assert lines[0] == header + ":"
    return lines[1:]


@pytest.mark.parametrize(("before", "after", "expected"), [
    ('next = "ask_name"', 'next = "ask_nme"',
     "flows.main.blocks.hello.next: no block named 'ask_nme' (did you mean 'ask_name'?)"),
    ('type = "set"', 'type = "sett"',
     "flows.main.blocks.price.type: must be one of message, input, buttons, condition, set, "
     "http, delay, jump, end, webview, webhook, not 'sett' (did you mean 'set'?)"),
    ("timeout = 300", "timout = 300",
     "flows.main.blocks.webhook_intro.timout: unknown key (did you mean 'timeout'?)"),
    ('token_env = "TELEGRAM_BOT_TOKEN"', 'token_env = "123456789:AAEabcdefghijklmnopqrstuvwxyz012345"',
     "channels.telegram.token_env: holds what looks like a bot token; put the token in an "
     "environment variable and write that variable's name here"),
    ('token_env = "TELEGRAM_BOT_TOKEN"', 'token = "123456789:AAEabcdefghijklmnopqrstuvwxyz012345"',
     "channels.telegram.token: secrets are not written in the config; put it in an "
     "environment variable and name it with `token_env`"),
], ids=["typo-in-next", "type-sett", "timout", "token-in-token_env", "literal-token"])
def test_one_mistake_is_one_message(tmp_path: Path, before: str, after: str,
                                    expected: str) -> None:
    text = EXAMPLE.read_text()
    assert before in text
    assert _check(tmp_path, text.replace(before, after, 1)) == [f"  error: {expected}"]


def test_a_token_is_never_echoed(tmp_path: Path) -> None:
    token = "123456789:AAEabcdefghijklmnopqrstuvwxyz012345"
    lines = _check(tmp_path, EXAMPLE.read_text().replace('token_env = "TELEGRAM_BOT_TOKEN"',
                                                         f'token_env = "{token}"'))
    assert token not in "\n".join(lines)


def test_two_mistakes_are_two_messages(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('type = "set"', 'type = "sett"')
    text = text.replace("timeout = 300", "timout = 300")
    assert len(_check(tmp_path, text)) == 2


def test_warnings_still_come_for_a_flow_without_errors(tmp_path: Path) -> None:
    text = EXAMPLE.read_text() + '\n[flows.main.blocks.orphan]\ntype = "end"\n'
    text = text.replace('type = "set"', 'type = "sett"') + textwrap.dedent("""
        [flows.other]
        start = "a"
        [flows.other.blocks.a]
        type = "end"
        [flows.other.blocks.lost]
        type = "end"
    """)
    assert _check(tmp_path, text) == [
        "  error: flows.main.blocks.price.type: must be one of message, input, buttons, "
        "condition, set, http, delay, jump, end, webview, webhook, not 'sett' (did you mean "
        "'set'?)",
        "  warning: flows.other.blocks.lost: no path from the start reaches it"]


def test_graph_draws_a_broken_config_and_marks_what_is_broken(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    text = EXAMPLE.read_text().replace('next = "ask_name"', 'next = "ask_nme"')
    path.write_text(text.replace('type = "set"', 'type = "sett"'))
    assert main(["graph", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "no block named 'ask_nme'" in captured.err
    out = _named(captured.out)
    assert 'hello -.->|"next"| no' in out
    assert "no([\"no block 'ask_nme'\"]):::broken" in out
    assert 'price["price (cannot be read)"]:::broken' in out
    assert 'menu -->|"Pay with a web page"| price' in out  # not broken: price exists
    assert main(["graph", "--config", str(path), "--format", "dot"]) == 2
    dot = capsys.readouterr().out
    assert ('hello -> no [label="next", color=red, fontcolor=red, style=dashed];'
            in _named(dot))
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg"], input=dot, text=True, check=True, capture_output=True)


def test_graph_of_a_file_that_is_not_toml(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[flows\n")
    assert main(["graph", "--config", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


ODD_NAMES = {  # (config, whether `check` passes): names and labels that broke the drawings
    "backslash-label": ('''
        [flows.main]
        start = "menu"
        [flows.main.blocks.menu]
        type = "buttons"
        text = "Where?"
        choices = [{ label = "C:\\\\", next = "end" }, { label = "say \\"hi\\" #1 <b>", next = "end" },
                   { label = "line\\nbreak \\\\N \\\\G", next = "end" }]
        [flows.main.blocks.end]
        type = "end"
    ''', True),
    "reserved-ids": ('''
        [flows.main]
        start = "graph"
        [flows.main.blocks.graph]
        type = "message"
        text = "x"
        next = "__end__"
        [flows.main.blocks.__end__]
        type = "message"
        text = "x"
        next = "flow_x"
        [flows.main.blocks.flow_x]
        type = "end"
    ''', True),
    "broken-names": ('''
        [flows.main]
        start = "a b"
        [flows.main.blocks."a b"]
        type = "message"
        text = "x"
        next = "x y\\"z"
        [flows.main.blocks."q\\"uote\\\\"]
        type = "sett"
    ''', False),
}


@pytest.mark.parametrize("name", ODD_NAMES)
def test_graph_of_odd_names_parses_in_both_languages(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    require(shutil.which("dot"), "graphviz's dot", "apt-get install graphviz; .ci/run does")
    text, valid = ODD_NAMES[name]
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(text))
    if valid:
        assert main(["check", "--config", str(path)]) == 0
    else:
        with pytest.raises(SystemExit, match="2"):
            main(["check", "--config", str(path)])
    capsys.readouterr()
    assert main(["graph", "--config", str(path), "--format", "dot"]) == (0 if valid else 2)
    dot = capsys.readouterr().out
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, text=True, check=True,
                         capture_output=True).stdout
    assert main(["graph", "--config", str(path)]) == (0 if valid else 2)
    out = capsys.readouterr().out
    lines = out.splitlines()[1:]
    for line in lines:  # every node id is n<number>; every name sits inside a "label"
        outside = re.sub(r'"[^"]*"', "", line).split(":::")[0]
        assert re.fullmatch(r"\s*(n\d+(\[\]|\(\[\]\))?( -(-|\.-)>(\|\|)? n\d+)?"
                            r"|classDef broken .*)", outside), line
    if name == "backslash-label":
        assert "C:\\" in svg and 'say "hi" #1' in svg.replace("&quot;", '"')
        assert '"C:\\"' in out and "say #quot;hi#quot; #35;1 #lt;b#gt;" in out
        assert '"line break \\N \\G"' in out
    if name == "reserved-ids":  # the blocks are nodes of their own, not the end node
        assert '["__end__ (message)"]' in out and '(["end"])' not in out
        assert '["flow_x (end)"]' in out
    if name == "broken-names":
        assert "no block 'x y#quot;z'" in out and "a b (message)" in out
        assert "q#quot;uote\\ (cannot be read)" in out


@pytest.mark.parametrize(("bot", "error"), [
    ("regex_timeout = 0", "bot.regex_timeout: must be 0.001..1, not 0"),
    ("regex_timeout = 5", "bot.regex_timeout: must be 0.001..1, not 5"),
])
def test_bot_limits_are_validated(tmp_path: Path, bot: str, error: str) -> None:
    errors = errors_of(tmp_path, f"""
        [bot]
        {bot}
        [flows.main]
        start = "a"
        [flows.main.blocks.a]
        type = "end"
    """)
    assert any(e.startswith(error) for e in errors), errors
