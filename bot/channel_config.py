"""Settings of the `[channels.*]` tables. Secrets are only ever named by environment variable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.flow import Flow, WebViewBlock
from bot.toml_reader import Problems, Reader

TELEGRAM_API = "https://api.telegram.org/bot"
TWILIO_API = "https://api.twilio.com"
# Platform bodies have limits of their own, fit to the platform, not server.max_body_bytes
# (64 KiB, meant for callbacks). An update's JSON, far above the largest Telegram sends: a
# 4,096-character emoji message replying to another is ~100 KB once non-ASCII is
# \u-escaped, and an update may carry a quote, an external reply and entities besides.
TELEGRAM_MAX_UPDATE_BYTES = 1024 * 1024
# A Twilio webhook's form, far above what Twilio posts (a 1,600-character Body of emoji is
# ~20 KB percent-encoded, ten MediaUrls ~2 KB).
WHATSAPP_MAX_BODY_BYTES = 256 * 1024
# Lower bounds `check` accepts: below, real updates would be dropped (Telegram) or refused.
MIN_TELEGRAM_UPDATE_BYTES = 128 * 1024
MIN_WHATSAPP_BODY_BYTES = 32 * 1024
MAX_PLATFORM_BYTES = 16 * 1024 * 1024


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
    max_update_bytes: int = TELEGRAM_MAX_UPDATE_BYTES  # larger: answered 200 and ignored


@dataclass(frozen=True)
class WhatsAppConfig:
    enabled: bool = False
    account_sid: str = ""
    auth_token_env: str = "TWILIO_AUTH_TOKEN"
    from_: str = ""
    public_url: str = ""  # the URL Twilio signs; defaults to server.public_url
    api_base_url: str = TWILIO_API
    # quick-reply Content templates by their number of buttons: ((2, "HX…"), (3, "HX…"))
    buttons_content_sid: tuple[tuple[int, str], ...] = ()
    webview_content_sid: str = ""
    webview_url_base: str = ""  # the fixed start of the template's URL; default <public_url>/
    status_callback: bool = False
    max_body_bytes: int = WHATSAPP_MAX_BODY_BYTES  # larger: 413


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
        api_base_url=_bot_api_url(r),
        webview_button=r.text("webview_button", "url", choices=("url", "web_app")),
        init_data_max_age=r.number("init_data_max_age", 3600.0, lo=1, hi=7 * 86400),
        max_update_bytes=r.integer("max_update_bytes", TELEGRAM_MAX_UPDATE_BYTES,
                                   lo=MIN_TELEGRAM_UPDATE_BYTES, hi=MAX_PLATFORM_BYTES),
    )
    r.done()
    return cfg


def _bot_api_url(r: Reader) -> str:
    """PTB appends the token to it ("…/bot" + token), or fills a `{token}` placeholder."""
    url: str = r.text("api_base_url", TELEGRAM_API)
    if not url.startswith(("http://", "https://")):
        r.problems.error(r.at("api_base_url"), f"must start with http:// or https://, e.g. "
                         f"{TELEGRAM_API!r} (the bot token is appended to it)")
    return url


def check_telegram_webviews(telegram: TelegramConfig, public_url: str,
                            flows: Mapping[str, Flow], problems: Problems) -> None:
    """Telegram opens Mini Apps only from https:// pages: refuse WebView blocks it would open
    as one (`webview_button = "web_app"`, or `verify = "telegram"`) whose URL is not https.
    `public_url` is server.public_url + path_prefix, which relative block URLs start with."""
    for flow in flows.values():
        for block in flow.blocks.values():
            if not isinstance(block, WebViewBlock):
                continue
            place = f"flows.{flow.name}.blocks.{block.id}"
            if block.verify == "telegram" and not telegram.enabled:
                problems.warn(f"{place}.verify", "needs [channels.telegram] enabled; until then "
                              "its callbacks are refused")
            if not telegram.enabled or not (telegram.webview_button == "web_app"
                                            or block.verify == "telegram"):
                continue
            url = public_url + block.url if block.url.startswith("/") else block.url
            if url.startswith(("https://", "{{")):
                continue
            why = ('verify = "telegram"' if block.verify == "telegram"
                   else '[channels.telegram] webview_button = "web_app"')
            hint = " (server.public_url is not https)" if block.url.startswith("/") else ""
            problems.error(f"{place}.url", f"Telegram opens Mini Apps ({why}) only from https:// "
                           f"URLs, but this one is {url}{hint}")


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
    urls = {key: r.text(key, default).rstrip("/") for key, default in
            (("public_url", ""), ("api_base_url", TWILIO_API), ("webview_url_base", ""))}
    for key, url in urls.items():
        if url and not url.startswith(("http://", "https://")):
            problems.error(r.at(key), "must start with http:// or https://")
    webview_sid = r.text("webview_content_sid", "")
    if webview_sid and not webview_sid.startswith("HX"):
        problems.error(r.at("webview_content_sid"), "must be a Content SID (starts with HX)")
    cfg = WhatsAppConfig(
        enabled=enabled,
        account_sid=sid,
        auth_token_env=_env_name(r, "auth_token_env", "TWILIO_AUTH_TOKEN"),
        from_=sender,
        public_url=urls["public_url"],
        api_base_url=urls["api_base_url"],
        buttons_content_sid=_content_sids_by_count(r, "buttons_content_sid"),
        webview_content_sid=webview_sid,
        webview_url_base=urls["webview_url_base"],
        status_callback=r.flag("status_callback", False),
        max_body_bytes=r.integer("max_body_bytes", WHATSAPP_MAX_BODY_BYTES,
                                 lo=MIN_WHATSAPP_BODY_BYTES, hi=MAX_PLATFORM_BYTES),
    )
    r.done()
    return cfg


def _content_sids_by_count(r: Reader, key: str) -> tuple[tuple[int, str], ...]:
    """`{ 2 = "HX…", 3 = "HX…" }`: a quick-reply template has a fixed number of buttons."""
    if not r.has(key):
        return ()
    if isinstance(r.table.get(key), str):
        r.raw(key)
        r.problems.error(r.at(key), 'must be a table from the number of buttons to a Content '
                         'SID, e.g. { 2 = "HX…", 3 = "HX…" }')
        return ()
    out: list[tuple[int, str]] = []
    for count, sid in r.str_table(key).items():
        if not count.isdigit() or not 1 <= int(count) <= 10:
            r.problems.error(f"{r.at(key)}.{count}", "must be a number of buttons, 1..10")
        elif not sid.startswith("HX"):
            r.problems.error(f"{r.at(key)}.{count}", "must be a Content SID (starts with HX)")
        else:
            out.append((int(count), sid))
    return tuple(sorted(out))


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
