"""Checks a Telegram Mini App's `initData` (the signed query string Telegram hands the page).

Pure functions, no I/O and no `telegram` import, so the check can run in the database
job (in the database process).
The algorithm is Telegram's ("Validating data received via the Mini App"):

    data_check_string = every field except `hash`, sorted by key, as "key=value" lines
    secret_key        = HMAC_SHA256(key="WebAppData", msg=bot_token)
    hash              = hex(HMAC_SHA256(key=secret_key, msg=data_check_string))
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from bot.errors import Unauthorized
from bot.flow import WebViewBlock
from bot.state import Conversation

FUTURE_SKEW = 60.0  # seconds an auth_date may lie ahead of our clock (clock drift)


class InitDataError(ValueError):
    """initData that does not prove what it claims; the message says why, for a person."""


def init_data_hash(fields: dict[str, str], bot_token: str) -> str:
    """The hex hash Telegram puts in `hash` for these (decoded) fields."""
    check = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()) if k != "hash")
    secret = hmac.new(b"WebAppData", bot_token.encode(), hashlib.sha256).digest()
    return hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()


def verify_init_data(init_data: str, bot_token: str, *, now: float, max_age: float) -> dict[str, str]:
    """The decoded fields of genuine, fresh initData; raises `InitDataError` otherwise."""
    try:
        pairs = parse_qsl(init_data, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InitDataError("telegramInitData is not a query string; send "
                            "window.Telegram.WebApp.initData unchanged.") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise InitDataError("telegramInitData repeats a field, which Telegram never does.")
    received = fields.pop("hash", "")
    if not received:
        raise InitDataError("telegramInitData has no hash; send window.Telegram.WebApp.initData "
                            "unchanged (it is empty when the page is not opened as a Mini App).")
    expected = init_data_hash(fields, bot_token)
    if not hmac.compare_digest(expected.encode(), received.encode()):
        raise InitDataError("telegramInitData is not signed by Telegram for this bot (its hash "
                            "does not match); it was changed or comes from another bot.")
    try:
        auth_date = int(fields.get("auth_date", ""))
    except ValueError:
        raise InitDataError("telegramInitData has no valid auth_date.") from None
    age = now - auth_date
    if age > max_age:
        raise InitDataError(f"telegramInitData is {age:.0f} s old, more than the {max_age:.0f} s "
                            "allowed; reopen the page from the chat and try again.")
    if age < -FUTURE_SKEW:
        raise InitDataError("telegramInitData has an auth_date in the future; check the "
                            "server's clock.")
    return fields


def init_data_user_id(fields: dict[str, str]) -> int:
    """The Telegram user id in verified fields (the `user` JSON object)."""
    try:
        user = json.loads(fields["user"])
        user_id = user["id"]
    except (KeyError, TypeError, ValueError):
        raise InitDataError("telegramInitData has no user; open the page from the bot's "
                            "button in a private chat.") from None
    if not isinstance(user_id, int) or isinstance(user_id, bool):
        raise InitDataError("telegramInitData's user has no numeric id.")
    return user_id


@dataclass(frozen=True)
class InitDataCheck:
    """`verify = "telegram"` on a WebView block: the callback must carry the Mini App's
    initData, signed for this bot, fresh, and of the user the conversation belongs to.
    Raises 401. Plain data, so the database process can run it."""

    bot_token: str = field(repr=False)
    max_age: float

    def __call__(self, block: WebViewBlock, conv: Conversation, proof: Mapping[str, Any],
                 now: float) -> None:
        if conv.channel != "telegram":
            raise Unauthorized("telegram_only", "This WebView is verified with Telegram, but "
                               f"the conversation is on {conv.channel}; it can only be "
                               "completed from the Telegram Mini App.")
        raw = proof.get("telegramInitData")
        if not isinstance(raw, str) or not raw:
            raise Unauthorized("missing_init_data", "telegramInitData is missing: this WebView "
                               "is verified with Telegram, so send "
                               "window.Telegram.WebApp.initData as telegramInitData.")
        try:
            fields = verify_init_data(raw, self.bot_token, now=now, max_age=self.max_age)
            user_id = init_data_user_id(fields)
        except InitDataError as exc:
            raise Unauthorized("bad_init_data", str(exc)) from None
        if str(user_id) != conv.user_id:
            raise Unauthorized("wrong_user", "telegramInitData belongs to another Telegram "
                               "user than the one this WebView was sent to.")
