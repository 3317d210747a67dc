"""The documentation matches the code: every config key and block type is documented, every
TOML snippet parses, every full config in the docs passes `check`, and the commands the
README tells a new user to type do what it says they do."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bot import channel_config, config
from bot.cli import parser
from bot.config import load_config
from bot.errors import ConfigError
from bot.flow import BLOCK_TYPES

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
README = (ROOT / "README.md").read_text()
ALL_DOCS = "\n".join(p.read_text() for p in PAGES)
# dataclass field → the TOML key an admin writes
RENAMED = {"from_": "from", "else_": "else", "target": "block"}
# ```lang … ``` with the <!-- test: name --> marker that may precede it
FENCE = re.compile(r"(?:<!-- test: (?P<mark>[\w-]+) -->\n)?^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```",
                   re.M | re.S)


@dataclasses.dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    lang: str
    body: str
    mark: str | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def snippets(lang: str) -> list[Snippet]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group("lang") == lang:
                line = text.count("\n", 0, m.start("body"))
                found.append(Snippet(str(page.relative_to(ROOT)), line, lang, m.group("body"),
                                     m.group("mark")))
    return found


def keys_of(cls: type) -> list[str]:
    return [RENAMED.get(f.name, f.name) for f in dataclasses.fields(cls) if f.name != "id"]


@pytest.mark.parametrize("cls", [
    config.ServerConfig, config.StorageConfig, config.BotConfig, config.RetentionConfig,
    channel_config.WebChannelConfig, channel_config.FileChannelConfig,
    channel_config.TelegramConfig, channel_config.WhatsAppConfig,
])
def test_every_settings_key_is_documented(cls: type) -> None:
    reference = (ROOT / "docs" / "config.md").read_text() + ALL_DOCS
    missing = [k for k in keys_of(cls) if f"`{k}`" not in reference]
    assert missing == [], f"docs lack {cls.__name__} keys {missing}"


@pytest.mark.parametrize(("name", "cls"), sorted(BLOCK_TYPES.items()))
def test_every_block_type_and_key_is_documented(name: str, cls: type) -> None:
    reference = (ROOT / "docs" / "config.md").read_text()
    assert f"`{name}`" in reference
    missing = [k for k in keys_of(cls) if f"`{k}`" not in reference]
    assert missing == [], f"docs/config.md lacks {name} keys {missing}"


def test_readme_commands_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    install = "pip install -e '.[test]' -c .ci/constraints.txt"
    assert f"python3 -m venv .venv && .venv/bin/{install} && .venv/bin/python -m pytest" in README
    assert f".venv/bin/{install.replace('-e', '-q -e')}\n" in ci
    assert "-m pytest " in ci and ".venv/bin/ruff check .\n" in ci and ".venv/bin/mypy\n" in ci


def test_readme_stays_short_and_links_resolve() -> None:
    assert len(README.splitlines()) <= 300
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("snippet", snippets("toml"), ids=str)
def test_every_toml_snippet_parses(snippet: Snippet) -> None:
    tomllib.loads(snippet.body)


FULL_CONFIGS = [s for s in snippets("toml") if "flows" in tomllib.loads(s.body)
                and any("start" in f for f in tomllib.loads(s.body)["flows"].values())]


def test_the_docs_have_full_configs() -> None:
    assert len(FULL_CONFIGS) >= 3


@pytest.mark.parametrize("snippet", FULL_CONFIGS, ids=str)
def test_every_full_config_passes_check(snippet: Snippet, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(snippet.body)
    try:
        load_config(path)
    except ConfigError as exc:
        pytest.fail(f"{snippet}: {exc.errors}")


def _flowbot_commands() -> list[tuple[Snippet, list[str]]]:
    """Every `flowbot …` command in a shell snippet, as the argv after `flowbot`."""
    found = []
    for snippet in snippets("sh"):
        for line in snippet.body.replace("\\\n", " ").splitlines():
            if not re.search(r"(^|[\s/])flowbot\s", line):
                continue
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            command: list[str] = []
            for word in [*lex, ";"]:
                if word in ("&&", "||", "|", ";", ">", ">>", "<"):
                    if command and Path(command[0]).name == "flowbot":
                        found.append((snippet, command[1:]))
                    command = [] if word != ">" else ["redirect"]
                else:
                    command.append(word)
    return found


@pytest.mark.parametrize(("snippet", "argv"), _flowbot_commands(),
                         ids=[f"{s}:{' '.join(a[:1])}" for s, a in _flowbot_commands()])
def test_every_flowbot_command_in_the_docs_is_valid(snippet: Snippet, argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "config", None) == "config.example.toml":  # migrate-storage has none
        load_config(ROOT / args.config)


def test_write_your_first_flow_as_the_readme_says(tmp_path: Path) -> None:
    """Follow "Write your first flow" literally: copy, edit, check, graph."""
    steps = [s for s in snippets("sh") if s.mark == "first-flow"]
    edit = next(s for s in snippets("toml") if s.mark == "first-flow-edit")
    assert len(steps) == 3
    shutil.copy(ROOT / "config.example.toml", tmp_path)
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "flowbot").symlink_to(Path(sys.executable).parent / "flowbot")

    def run(snippet: Snippet) -> str:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet.body], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{snippet} failed: {done.stderr}"
        return done.stdout

    run(steps[0])
    mine = tmp_path / "mybot.toml"
    # "Replace the hello block with these two blocks"
    text = mine.read_text()
    hello = re.search(r"^\[flows\.main\.blocks\.hello\]\n.*?(?=^\[)", text, re.M | re.S)
    assert hello is not None
    mine.write_text(text[:hello.start()] + edit.body + "\n" + text[hello.end():])
    shown = README.split(str(steps[1].body), 1)[1]
    expected_ok = re.search(r"```\n(mybot\.toml: ok[^\n]*)\n```", shown)
    assert expected_ok is not None
    assert run(steps[1]).splitlines()[0] == expected_ok.group(1)

    # the typo example prints what the README shows, line for line
    expected_typo = re.search(r"```\n(mybot\.toml: \d+ error.*?)```", shown, re.S)
    assert expected_typo is not None
    mine.write_text(mine.read_text().replace('next = "ask_color"', 'next = "ask_colour"'))
    typo = subprocess.run([str(venv_bin / "flowbot"), "check", "--config", "mybot.toml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2
    assert typo.stderr == expected_typo.group(1)
    mine.write_text(mine.read_text().replace('next = "ask_colour"', 'next = "ask_color"'))

    run(steps[2])
    assert (tmp_path / "mybot.mmd").read_text().startswith(("flowchart", "graph"))
    assert "ask_color" in (tmp_path / "mybot.mmd").read_text()
    assert (tmp_path / "mybot.dot").read_text().startswith("digraph")
