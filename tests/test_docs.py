"""The documentation matches the code: every config key and block type is in the README."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot import channel_config, config
from bot.flow import BLOCK_TYPES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# dataclass field → the TOML key an admin writes
RENAMED = {"from_": "from", "else_": "else", "target": "block"}


def keys_of(cls: type) -> list[str]:
    return [RENAMED.get(f.name, f.name) for f in dataclasses.fields(cls) if f.name != "id"]


@pytest.mark.parametrize("cls", [
    config.ServerConfig, config.StorageConfig, config.BotConfig,
    channel_config.WebChannelConfig, channel_config.FileChannelConfig,
    channel_config.TelegramConfig, channel_config.WhatsAppConfig,
])
def test_every_settings_key_is_documented(cls: type) -> None:
    missing = [k for k in keys_of(cls) if f"`{k}`" not in README]
    assert missing == [], f"README lacks {cls.__name__} keys {missing}"


@pytest.mark.parametrize(("name", "cls"), sorted(BLOCK_TYPES.items()))
def test_every_block_type_and_key_is_documented(name: str, cls: type) -> None:
    assert f"`{name}`" in README
    missing = [k for k in keys_of(cls) if f"`{k}`" not in README]
    assert missing == [], f"README lacks {name} keys {missing}"


def test_readme_commands_are_what_ci_runs() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    test_command = ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
                    ".venv/bin/python -m pytest")
    assert test_command in README
    assert test_command.replace("pip install -e", "pip install -q -e") in ci
