"""Settings of the `[channels.*]` tables. Secrets are only ever named by environment variable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.toml_reader import Problems, Reader

TELEGRAM_API = "https://api.telegram.org/bot"
TWILIO_API = "https://api.twilio.com"


@dataclass(frozen=True)
class WebChannelConfig:
    enabled: bool = True
    title: str = "flowbot"


@dataclass(frozen=True)
class TelegramConfig:
    enabled: bool = False
    token_env: str = "TELEGRAM_BOT_TOKEN"
    mode: str = "webhook"  # webhook | polling
    secret_env: str = "TELEGRAM_WEBHOOK_SECRET"
    register_webhook: bool = True
    api_base_url: str = TELEGRAM_API
    webview_button: str = "url"  # url | web_app
    init_data_max_age: float = 3600.0


@dataclass(frozen=True)
class WhatsAppConfig:
    enabled: bool = False
    account_sid: str = ""
    auth_token_env: str = "TWILIO_AUTH_TOKEN"
    from_: str = ""
    public_url: str = ""  # the URL Twilio signs; defaults to server.public_url
    api_base_url: str = TWILIO_API
    buttons_content_sid: str = ""
    webview_content_sid: str = ""
    status_callback: bool = False


@dataclass(frozen=True)
class FileChannelConfig:
    enabled: bool = False
    path: Path = Path("flowbot-outbox.jsonl")


@dataclass(frozen=True)
class ChannelsConfig:
    web: WebChannelConfig = WebChannelConfig()
    file: FileChannelConfig = FileChannelConfig()
    telegram: TelegramConfig = TelegramConfig()
    whatsapp: WhatsAppConfig = WhatsAppConfig()


def _env_name(r: Reader, key: str, default: str) -> str:
    name: str = r.text(key, default)
    if name and not name.replace("_", "").isalnum():
        r.problems.error(r.at(key), f"must name an environment variable, not {name!r}")
    return name


def _refuse_literal_secrets(r: Reader, keys: tuple[str, ...]) -> None:
    for key in keys:
        if r.has(key):
            r.raw(key)
            r.problems.error(
                r.at(key),
                f"secrets are not written in the config; put it in an environment variable "
                f"and name it with `{key}_env`",
            )


def _web(table: dict[str, Any], problems: Problems) -> WebChannelConfig:
    r = Reader(table, "channels.web", problems)
    cfg = WebChannelConfig(enabled=r.flag("enabled", True), title=r.text("title", "flowbot"))
    r.done()
    return cfg


def _telegram(table: dict[str, Any], problems: Problems) -> TelegramConfig:
    r = Reader(table, "channels.telegram", problems)
    _refuse_literal_secrets(r, ("token", "secret"))
    cfg = TelegramConfig(
        enabled=r.flag("enabled", False),
        token_env=_env_name(r, "token_env", "TELEGRAM_BOT_TOKEN"),
        mode=r.text("mode", "webhook", choices=("webhook", "polling")),
        secret_env=_env_name(r, "secret_env", "TELEGRAM_WEBHOOK_SECRET"),
        register_webhook=r.flag("register_webhook", True),
        api_base_url=r.text("api_base_url", TELEGRAM_API),
        webview_button=r.text("webview_button", "url", choices=("url", "web_app")),
        init_data_max_age=r.number("init_data_max_age", 3600.0, lo=1, hi=7 * 86400),
    )
    r.done()
    return cfg


def _whatsapp(table: dict[str, Any], problems: Problems) -> WhatsAppConfig:
    r = Reader(table, "channels.whatsapp", problems)
    _refuse_literal_secrets(r, ("auth_token",))
    enabled = r.flag("enabled", False)
    sender = r.text("from", "")
    if enabled and not sender.startswith("whatsapp:+"):
        problems.error(r.at("from"), "must look like 'whatsapp:+14155238886'")
    sid = r.text("account_sid", "")
    if enabled and not sid.startswith("AC"):
        problems.error(r.at("account_sid"), "must be your Twilio Account SID (starts with AC)")
    cfg = WhatsAppConfig(
        enabled=enabled,
        account_sid=sid,
        auth_token_env=_env_name(r, "auth_token_env", "TWILIO_AUTH_TOKEN"),
        from_=sender,
        public_url=r.text("public_url", ""),
        api_base_url=r.text("api_base_url", TWILIO_API),
        buttons_content_sid=r.text("buttons_content_sid", ""),
        webview_content_sid=r.text("webview_content_sid", ""),
        status_callback=r.flag("status_callback", False),
    )
    r.done()
    return cfg


def _file(table: dict[str, Any], problems: Problems, base: Path) -> FileChannelConfig:
    r = Reader(table, "channels.file", problems)
    path = Path(r.text("path", "flowbot-outbox.jsonl"))
    cfg = FileChannelConfig(enabled=r.flag("enabled", False),
                            path=path if path.is_absolute() else base / path)
    r.done()
    return cfg


def parse_channels(table: dict[str, Any], problems: Problems, base: Path) -> ChannelsConfig:
    r = Reader(table, "channels", problems)
    cfg = ChannelsConfig(
        web=_web(r.table_("web"), problems),
        file=_file(r.table_("file"), problems, base),
        telegram=_telegram(r.table_("telegram"), problems),
        whatsapp=_whatsapp(r.table_("whatsapp"), problems),
    )
    r.done()
    return cfg
