"""The whole TOML config, parsed once into frozen dataclasses; every problem reported at once."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.channel_config import ChannelsConfig, check_telegram_webviews, parse_channels
from bot.errors import ConfigError
from bot.flow import Flow
from bot.flow_parse import check_references, parse_flow
from bot.toml_reader import Problems, Reader, did_you_mean

# A Telegram bot token (123456:ABC…) or a Twilio auth token pasted where it must not be.
_LITERAL_SECRET = re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}\b")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    path_prefix: str = ""
    max_body_bytes: int = 65536
    cors_allow_origin: str = "*"

    def url(self, path: str) -> str:
        """The public URL of one of our routes."""
        return f"{self.public_url.rstrip('/')}{self.path_prefix}{path}"


@dataclass(frozen=True)
class StorageConfig:
    path: Path = Path("flowbot.db")
    # "process": SQLite and the transitions in a process of their own (a second core);
    # "thread": a thread of the server's process (tests; a one-core machine)
    worker: str = "process"


WORKERS = ("process", "thread")


@dataclass(frozen=True)
class BotConfig:
    start_flow: str = "main"
    restart_words: tuple[str, ...] = ("/start",)
    max_steps: int = 100  # blocks run for one event before we call it a loop
    default_pending_message: str = "Please finish the step above first — I'm still waiting for it."
    # where a conversation goes when the block it stood or waited at is gone from the config
    stranded_flow: str = ""  # "" = start_flow
    stranded_message: str = ("Sorry, this conversation was changed while you were in it, "
                             "so we are starting over.")

    @property
    def stranded_target(self) -> str:
        """The flow a stranded conversation is moved to the start of."""
        return self.stranded_flow or self.start_flow


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    storage: StorageConfig
    bot: BotConfig
    channels: ChannelsConfig
    flows: Mapping[str, Flow]
    warnings: tuple[str, ...] = field(default=())


def default_public_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _server(r: Reader) -> ServerConfig:
    prefix = r.text("path_prefix", "")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        r.problems.error(r.at("path_prefix"), "must start with '/' and not end with one, e.g. '/bot'")
    port = r.integer("port", 8080, lo=0, hi=65535)
    public_url = r.text("public_url", default_public_url(port))
    if not public_url.startswith(("http://", "https://")):
        r.problems.error(r.at("public_url"), "must start with http:// or https://")
    cfg = ServerConfig(
        host=r.text("host", "127.0.0.1"),
        port=port,
        public_url=public_url.rstrip("/"),
        path_prefix=prefix,
        max_body_bytes=r.integer("max_body_bytes", 65536, lo=1024, hi=16 * 1024 * 1024),
        cors_allow_origin=r.text("cors_allow_origin", "*"),
    )
    r.done()
    return cfg


def _storage(r: Reader, base: Path) -> StorageConfig:
    path = Path(r.text("path", "flowbot.db"))
    worker = r.text("worker", "process", choices=WORKERS)
    r.done()
    return StorageConfig(path if path.is_absolute() else base / path, worker)


def _bot(r: Reader) -> BotConfig:
    cfg = BotConfig(
        start_flow=r.text("start_flow", "main"),
        restart_words=r.str_list("restart_words", ("/start",)),
        max_steps=r.integer("max_steps", 100, lo=10, hi=10000),
        default_pending_message=r.text("default_pending_message", BotConfig.default_pending_message),
        stranded_flow=r.text("stranded_flow", ""),
        stranded_message=r.text("stranded_message", BotConfig.stranded_message),
    )
    r.done()
    return cfg


def _find_literal_secrets(value: Any, place: str, found: list[str]) -> list[str]:
    """The places of strings that look like a bot token."""
    if isinstance(value, dict):
        for k, v in value.items():
            _find_literal_secrets(v, f"{place}.{k}" if place else k, found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _find_literal_secrets(v, f"{place}.{i}", found)
    elif isinstance(value, str) and _LITERAL_SECRET.search(value):
        found.append(place)
    return found


def _report_literal_secrets(doc: dict[str, Any], problems: Problems) -> None:
    """One message per line holding a token: `token = "…"` already says where it goes;
    a token in `token_env` is told to move (without echoing it); any other place gets
    the generic message."""
    for place in _find_literal_secrets(doc, "", []):
        if any("secrets are not written in the config" in e for e in problems.at_place(place)):
            continue
        if place.endswith("_env"):
            problems.only(place, "holds what looks like a bot token; put the token in an "
                                 "environment variable and write that variable's name here")
        else:
            problems.only(place, "looks like a bot token; keep secrets in environment "
                                 "variables")


def parse_config(doc: dict[str, Any], base: Path, problems: Problems) -> Config:
    r = Reader(doc, "", problems)
    server = _server(Reader(r.table_("server"), "server", problems))
    storage = _storage(Reader(r.table_("storage"), "storage", problems), base)
    bot = _bot(Reader(r.table_("bot"), "bot", problems))
    channels = parse_channels(r.table_("channels"), problems, base)
    raw_flows = r.table_("flows")
    r.done()
    _report_literal_secrets(doc, problems)

    flows: dict[str, Flow] = {}
    for name, table in raw_flows.items():
        flow = parse_flow(name, table, problems)
        if flow is not None:
            flows[name] = flow
    for flow in flows.values():
        check_references(flow, flows, problems)
    check_telegram_webviews(channels.telegram, server.public_url + server.path_prefix, flows,
                            problems)
    if not raw_flows:
        problems.error("flows", "define at least one flow, e.g. [flows.main]")
    elif bot.start_flow not in raw_flows:
        problems.error(
            "bot.start_flow",
            f"no flow named {bot.start_flow!r}{did_you_mean(bot.start_flow, raw_flows)}",
        )
    if raw_flows and bot.stranded_flow and bot.stranded_flow not in raw_flows:
        problems.error(
            "bot.stranded_flow",
            f"no flow named {bot.stranded_flow!r}{did_you_mean(bot.stranded_flow, raw_flows)}",
        )
    return Config(server, storage, bot, channels, flows, tuple(problems.warnings))


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise `ConfigError` listing every problem."""
    config, problems = read_config(path)
    if config is None or problems.errors:
        raise ConfigError(problems.errors, problems.warnings)
    return config


def read_config(path: str | Path) -> tuple[Config | None, Problems]:
    """Read a config file as far as it goes, errors or not (`graph` draws a broken one).
    None when the file cannot be read or is not TOML; the problems say why."""
    path = Path(path)
    problems = Problems()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.errors.append(f"{path}: cannot read it ({exc.strerror})")
        return None, problems
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.errors.append(f"{path}: not valid TOML: {exc}")
        return None, problems
    return parse_config(doc, path.resolve().parent, problems), problems
