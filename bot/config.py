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
from bot.webhook_config import WebhooksConfig, check_providers, parse_webhooks

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
    # seconds a connection may take to send a request's headers (also how long an idle
    # keep-alive connection is kept), and a request's whole body: slow clients are dropped
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # web chat sockets: in total, from one client address, for one chat session
    max_websockets: int = 2000
    max_websockets_per_address: int = 50
    max_websockets_per_session: int = 8

    def url(self, path: str) -> str:
        """The public URL of one of our routes."""
        return f"{self.public_url.rstrip('/')}{self.path_prefix}{path}"


@dataclass(frozen=True)
class StorageConfig:
    """`[storage]`: a SQLite file (`path`, the default) or a PostgreSQL database (`url`, or
    `url_env` naming the environment variable that holds it: URLs carry passwords)."""

    path: Path = Path("flowbot.db")
    # "process": the store and the transitions in a process of their own (a second core);
    # "thread": a thread of the server's process (tests; a one-core machine)
    worker: str = "process"
    url: str = ""  # postgresql://… without a password (libpq's PGPASSWORD / .pgpass work)
    url_env: str = ""
    pool_size: int = 16  # PostgreSQL connections, one per transition running at once
    prepared_statements: bool = True  # false behind PgBouncer < 1.21 in transaction mode

    @property
    def backend(self) -> str:
        """"postgresql" or "sqlite"."""
        return "postgresql" if self.url or self.url_env else "sqlite"


WORKERS = ("process", "thread")


@dataclass(frozen=True)
class BotConfig:
    start_flow: str = "main"
    restart_words: tuple[str, ...] = ("/start",)
    max_steps: int = 100  # blocks run for one event before we call it a loop
    regex_timeout: float = 0.05  # s one `pattern`/`matches` may run on a text (bot/patterns.py)
    max_variable_bytes: int = 65536  # one variable, as compact UTF-8 JSON
    max_conversation_bytes: int = 1048576  # all of a conversation's variables together
    error_message: str = ("Sorry, that was more than I can keep, so I could not go on. "
                          "Please try again with something shorter.")
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
class RetentionConfig:
    """How long finished data is kept before the background pruning deletes it; 0 keeps it
    forever. See docs/operations.md for why each default is what it is."""

    events_hours: int = 72  # ids of processed platform events (redelivery dedupe)
    delivered_days: int = 30  # outbox rows sent to Telegram / WhatsApp / file
    web_history_days: int = 30  # web chat messages sent (what a reloaded page gets back)
    failed_days: int = 90  # outbox rows that failed for good (and why)
    ended_waits_days: int = 30  # waits that ended (success, expired, cancelled, removed…)
    idle_conversations_days: int = 180  # conversations, variables included, idle that long
    every_seconds: int = 60  # how often a pruning round starts
    batch: int = 500  # rows one pruning job deletes at most (one short transaction)

    def cutoffs(self, now: float) -> dict[str, float]:
        """What a pruning round deletes: category → rows older than this time (s since the
        epoch). Categories kept forever are left out."""
        ages = {"events": self.events_hours * 3600.0,
                "delivered": self.delivered_days * 86400.0,
                "web_history": self.web_history_days * 86400.0,
                "failed": self.failed_days * 86400.0,
                "ended_waits": self.ended_waits_days * 86400.0,
                "idle_conversations": self.idle_conversations_days * 86400.0,
                # a moved chat's old address: late updates come within a day; kept as long
                # as an idle conversation, pruned with them
                "chat_aliases": self.idle_conversations_days * 86400.0}
        ages["early_statuses"] = 86400.0  # Twilio statuses for unknown ids: not a setting
        return {name: now - age for name, age in ages.items() if age > 0}


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    storage: StorageConfig
    bot: BotConfig
    channels: ChannelsConfig
    flows: Mapping[str, Flow]
    warnings: tuple[str, ...] = field(default=())
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)


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
        header_timeout=r.number("header_timeout", 10.0, lo=1, hi=600),
        body_timeout=r.number("body_timeout", 30.0, lo=1, hi=3600),
        max_websockets=r.integer("max_websockets", 2000, lo=1, hi=1_000_000),
        max_websockets_per_address=r.integer("max_websockets_per_address", 50, lo=1,
                                             hi=1_000_000),
        max_websockets_per_session=r.integer("max_websockets_per_session", 8, lo=1,
                                             hi=1000),
    )
    r.done()
    if cfg.max_websockets_per_address > cfg.max_websockets:
        r.problems.error(r.at("max_websockets_per_address"),
                         f"must not exceed server.max_websockets ({cfg.max_websockets})")
    if cfg.max_websockets_per_session > cfg.max_websockets_per_address:
        r.problems.error(r.at("max_websockets_per_session"), "must not exceed "
                         f"server.max_websockets_per_address ({cfg.max_websockets_per_address})")
    return cfg


def _storage(r: Reader, base: Path) -> StorageConfig:
    has_path = r.has("path")
    path = Path(r.text("path", "flowbot.db"))
    worker = r.text("worker", "process", choices=WORKERS)
    url: str = r.text("url", "")
    url_env: str = r.text("url_env", "")
    pool_size = r.integer("pool_size", 16, lo=1, hi=256)
    prepared = r.flag("prepared_statements", True)
    if url and url_env:
        r.problems.error(r.at("url_env"), "give either url or url_env, not both")
    if url and not url.startswith(POSTGRES_SCHEMES):
        r.problems.error(r.at("url"), "must start with postgresql:// (only PostgreSQL is "
                         "reached by URL; a SQLite file is given with `path`)")
    elif url and _has_password(url):
        r.problems.error(r.at("url"), "has a password: secrets are not written in the config; "
                         "put the URL in an environment variable and name it with `url_env` "
                         "(or use PGPASSWORD / ~/.pgpass)")
    if url_env and not url_env.replace("_", "").isalnum():
        r.problems.error(r.at("url_env"), f"must name an environment variable, not {url_env!r}")
    if has_path and (url or url_env):
        r.problems.error(r.at("path"), "is the SQLite file; with url/url_env the data is in "
                         "PostgreSQL: remove one of them")
    r.done()
    return StorageConfig(path if path.is_absolute() else base / path, worker, url, url_env,
                         pool_size, prepared)


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _has_password(url: str) -> bool:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        return bool(parts.password) or "password" in parse_qs(parts.query)
    except ValueError:
        return False


# Telegram keeps an undelivered update 24 h and redelivers it; Standard Webhooks senders
# retry for about a day too. An event id forgotten sooner could be handled twice.
MIN_EVENTS_HOURS = 25
# a pending wait lasts at most 30 days (delay, non-blocking WebView): an idle conversation
# deleted sooner could still be owed a callback
MIN_IDLE_DAYS = 31


def _retention(r: Reader) -> RetentionConfig:
    d = RetentionConfig()
    cfg = RetentionConfig(
        events_hours=r.integer("events_hours", d.events_hours, lo=0, hi=24 * 3650),
        delivered_days=r.integer("delivered_days", d.delivered_days, lo=0, hi=3650),
        web_history_days=r.integer("web_history_days", d.web_history_days, lo=0, hi=3650),
        failed_days=r.integer("failed_days", d.failed_days, lo=0, hi=3650),
        ended_waits_days=r.integer("ended_waits_days", d.ended_waits_days, lo=0, hi=3650),
        idle_conversations_days=r.integer("idle_conversations_days",
                                          d.idle_conversations_days, lo=0, hi=3650),
        every_seconds=r.integer("every_seconds", d.every_seconds, lo=1, hi=86400),
        batch=r.integer("batch", d.batch, lo=10, hi=10000),
    )
    if 0 < cfg.events_hours < MIN_EVENTS_HOURS:
        r.problems.error(r.at("events_hours"), f"must be 0 (keep) or at least "
                         f"{MIN_EVENTS_HOURS}: Telegram redelivers an update for 24 hours")
    if 0 < cfg.idle_conversations_days < MIN_IDLE_DAYS:
        r.problems.error(r.at("idle_conversations_days"), f"must be 0 (keep) or at least "
                         f"{MIN_IDLE_DAYS}: a wait can stay open 30 days")
    r.done()
    return cfg


def _bot(r: Reader) -> BotConfig:
    cfg = BotConfig(
        start_flow=r.text("start_flow", "main"),
        restart_words=r.str_list("restart_words", ("/start",)),
        max_steps=r.integer("max_steps", 100, lo=10, hi=10000),
        regex_timeout=r.number("regex_timeout", BotConfig.regex_timeout, lo=0.001, hi=1.0),
        max_variable_bytes=r.integer("max_variable_bytes", BotConfig.max_variable_bytes,
                                     lo=1024, hi=16 * 1024 * 1024),
        max_conversation_bytes=r.integer("max_conversation_bytes",
                                         BotConfig.max_conversation_bytes,
                                         lo=1024, hi=64 * 1024 * 1024),
        error_message=r.text("error_message", BotConfig.error_message),
        default_pending_message=r.text("default_pending_message", BotConfig.default_pending_message),
        stranded_flow=r.text("stranded_flow", ""),
        stranded_message=r.text("stranded_message", BotConfig.stranded_message),
    )
    if cfg.max_conversation_bytes < cfg.max_variable_bytes:
        r.problems.error(r.at("max_conversation_bytes"),
                         f"must be at least max_variable_bytes ({cfg.max_variable_bytes}), "
                         f"not {cfg.max_conversation_bytes}")
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
    retention = _retention(Reader(r.table_("retention"), "retention", problems))
    bot = _bot(Reader(r.table_("bot"), "bot", problems))
    channels = parse_channels(r.table_("channels"), problems, base)
    webhooks = parse_webhooks(r.table_("webhooks"), problems)
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
    check_providers(webhooks, flows, problems)
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
    return Config(server, storage, bot, channels, flows, tuple(problems.warnings), retention,
                  webhooks)


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
