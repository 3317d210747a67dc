"""The Telegram channel through python-telegram-bot: updates in (webhook or polling), Bot API
calls out. The only module that imports `telegram`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import os
import re
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any

from aiohttp import web
from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Update,
    WebAppInfo,
)
from telegram import Message as TgMessage
from telegram.constants import ParseMode
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.request import HTTPXRequest
from telegram.warnings import PTBDeprecationWarning

from bot import errors
from bot.body import parse_json, read_body
from bot.channel_config import TELEGRAM_MAX_UPDATE_BYTES, TelegramConfig
from bot.clock import Clock
from bot.config import Config
from bot.runtime import Runtime
from channels.base import (
    Delivery,
    Inbound,
    InboundHandler,
    Media,
    Message,
    RateLimit,
    Route,
    SendError,
    SentParts,
    cut_text,
    media_variables,
    split_text,
    utf16_len,
)
from channels.telegram_auth import InitDataCheck

log = logging.getLogger(__name__)

ChatMover = Callable[[str, str, str], Awaitable[bool]]
"""Moves a channel's conversation from one chat id to another (Runtime.move_chat)."""

# httpx logs every request URL at INFO and PTB logs its base URL at DEBUG; both contain the
# bot token, which must never reach a log.
for _name in ("httpx", "httpcore", "telegram"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# PTB 22 warns on every RetryAfter that `retry_after` will become a timedelta; `_seconds`
# reads both forms.
warnings.filterwarnings("ignore", message=r".*attribute `retry_after`", category=PTBDeprecationWarning)

ALLOWED_UPDATES = ("message", "callback_query")
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_UPDATE_BYTES = TELEGRAM_MAX_UPDATE_BYTES  # default of [channels.telegram] max_update_bytes
CALLBACK_DATA_BYTES = 64  # Telegram's limit for callback_data
# A message's text and a caption, in UTF-16 code units after entities parsing (Bot API,
# sendMessage "1-4096 characters", sendPhoto "0-1024 characters"; core.telegram.org/api/entities
# counts in UTF-16): the plain text we escape is what is counted.
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
POLL_TIMEOUT = 30  # seconds a getUpdates long poll is held by Telegram
POLL_MAX_BACKOFF = 60.0
POISON_ATTEMPTS = 5  # an update that fails to commit this often (polling) is skipped
SECRET_CHARS = re.compile(r"[A-Za-z0-9_-]{1,256}")  # what setWebhook accepts as secret_token
_UNPARSABLE = frozenset({"bad_json", "bad_number", "bad_text", "too_deep"})  # bot/body.py
# a bot command with the bot's username: "/start@some_bot", then a space, a line or the end
_MENTION = re.compile(r"(?P<command>/[A-Za-z0-9_]{1,64})@(?P<bot>[A-Za-z0-9_]{1,64})(?=\s|$)")
# what PTB's lax de_json lets through and using the fields then raises
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, OverflowError)
_LINK_REFUSED = re.compile(r"url|button_type_invalid|web_?app", re.IGNORECASE)


class TelegramSetupError(errors.FlowbotError):
    """Telegram cannot be used as configured: missing token or secret, rejected webhook."""


def _require_env(name: str, what: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise TelegramSetupError(f"Telegram is configured but the environment variable {name} is "
                                 f"empty; put {what} in it.")
    return value


def _make_bot(cfg: TelegramConfig, token: str) -> Bot:
    # PTB appends the token to base_url ("https://api.telegram.org/bot" + token + "/method").
    return Bot(
        token,
        base_url=cfg.api_base_url,
        request=HTTPXRequest(connection_pool_size=32, read_timeout=15.0, write_timeout=15.0),
        get_updates_request=HTTPXRequest(connection_pool_size=1, read_timeout=10.0),
    )


async def _initialize(bot: Bot, cfg: TelegramConfig) -> None:
    """getMe: proves the token works. PTB's own InvalidToken message quotes the token."""
    try:
        await bot.initialize()
    except TelegramError as exc:
        await bot.shutdown()
        error = exc
    else:
        return
    if isinstance(error, InvalidToken):
        raise TelegramSetupError(f"Telegram rejected the bot token in {cfg.token_env}; copy it "
                                 "again from @BotFather (/mybots → API Token).")
    raise TelegramSetupError(f"cannot reach the Telegram Bot API at {cfg.api_base_url}: "
                             f"{_redact(error.message, bot.token)}")


def _redact(text: str, token: str) -> str:
    return text.replace(token, "<token>") if token else text


def _seconds(exc: RetryAfter) -> float:
    value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def send_error(exc: TelegramError, token: str = "") -> SendError:
    """What the outbox should do about a failed Bot API call."""
    text = _redact(exc.message, token)
    low = text.lower()
    if isinstance(exc, RetryAfter):
        return SendError(text, permanent=False, code="rate_limited", retry_after=_seconds(exc))
    if isinstance(exc, Forbidden):  # blocked by the user, kicked from the group, user deleted
        return SendError(text, permanent=True, code="bot_blocked" if "blocked" in low else "forbidden")
    if isinstance(exc, ChatMigrated):
        return SendError(f"{text} (new chat id {exc.new_chat_id})", permanent=True,
                         code="chat_migrated")
    if isinstance(exc, BadRequest):  # before NetworkError: PTB derives it from NetworkError
        return SendError(text, permanent=True,
                         code="chat_not_found" if "chat not found" in low else "bad_request")
    if isinstance(exc, InvalidToken):  # retried: the operator may fix the token and restart
        return SendError(text, permanent=False, code="invalid_token")
    if isinstance(exc, TimedOut):
        return SendError(text, permanent=False, code="timed_out")
    if isinstance(exc, NetworkError):
        return SendError(text, permanent=False, code="network")
    return SendError(text, permanent=False, code="telegram_error")


def _pressed_label(update: Update) -> str:
    """The label of the inline button that was pressed, found in the message it belongs to."""
    query = update.callback_query
    if query is None or not isinstance(query.message, TgMessage) or not query.message.reply_markup:
        return ""
    for row in query.message.reply_markup.inline_keyboard:
        for button in row:
            if button.callback_data == query.data:
                return button.text
    return ""


# Telegram's field → media_type; `animation` before `document`: a GIF carries both
_FILE_KINDS = {"animation": "video", "video_note": "video", "video": "video", "voice": "voice",
               "audio": "audio", "document": "document"}


def _media(message: TgMessage) -> dict[str, str]:
    """The attachment of a message as the flow's media variables (see MEDIA_VARIABLES)."""
    if message.photo:
        largest = message.photo[-1]  # Telegram lists the sizes smallest first
        return media_variables(media_type="photo", media_id=largest.file_id,
                               media_content_type="image/jpeg")
    for field, kind in _FILE_KINDS.items():
        file = getattr(message, field)
        if file is not None:
            return media_variables(media_type=kind, media_id=file.file_id,
                                   media_content_type=getattr(file, "mime_type", None) or "",
                                   media_file_name=getattr(file, "file_name", None) or "")
    location = message.location or (message.venue.location if message.venue else None)
    if location is not None:
        return media_variables(media_type="location", latitude=str(location.latitude),
                               longitude=str(location.longitude))
    if message.contact is not None:
        contact = message.contact
        full = " ".join(p for p in (contact.first_name, contact.last_name) if p)
        return media_variables(media_type="contact", contact_phone=contact.phone_number,
                               contact_name=full)
    return media_variables()


class TelegramChannel:
    name = "telegram"
    rate_limit = RateLimit(per_chat_per_second=1, global_per_second=30)

    def __init__(self, cfg: TelegramConfig, token: str, secret: str, *, webhook_url: str,
                 inbound: InboundHandler, clock: Clock,
                 max_update_bytes: int = MAX_UPDATE_BYTES,
                 move_chat: ChatMover | None = None,
                 on_ignored: Callable[[str], None] = lambda _reason: None) -> None:
        self.cfg = cfg
        self.bot = _make_bot(cfg, token)
        self.webhook_url = webhook_url
        self.poll_backoff = 1.0  # first delay after a failed getUpdates; doubles up to a minute
        self._token = token
        self._secret = secret
        self._inbound = inbound
        self._clock = clock
        self._max_update = max_update_bytes
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._parts = SentParts()
        self._move_chat = move_chat
        self._on_ignored = on_ignored  # counts an update not used, by reason
        self._moved: dict[str, str] = {}  # old chat id → new (a group upgraded to a supergroup)
        self._albums: dict[tuple[str, str], int] = {}  # (chat, media_group_id) → first update

    @classmethod
    def create(cls, config: Config, runtime: Runtime) -> TelegramChannel:
        cfg = config.channels.telegram
        token = _require_env(cfg.token_env, "the bot token from @BotFather")
        secret = os.environ.get(cfg.secret_env, "")
        if cfg.mode == "webhook":
            _require_env(cfg.secret_env, "a random secret for the webhook, e.g. the output of "
                         "`openssl rand -hex 32`")
            if not SECRET_CHARS.fullmatch(secret):
                raise TelegramSetupError(f"the webhook secret in {cfg.secret_env} may only hold "
                                         "1-256 letters, digits, _ and - (Telegram's rule); "
                                         "e.g. use `openssl rand -hex 32`.")
        channel = cls(cfg, token, secret, webhook_url=config.server.url("/telegram"),
                      inbound=runtime.handle_inbound, clock=runtime.clock,
                      max_update_bytes=cfg.max_update_bytes, move_chat=runtime.move_chat,
                      on_ignored=lambda reason: runtime.stats.ignored_update("telegram",
                                                                             reason))
        runtime.webview_checks["telegram"] = InitDataCheck(token, cfg.init_data_max_age)
        return channel

    def routes(self) -> Sequence[Route]:
        return [Route("POST", "/telegram", self._on_webhook)] if self.cfg.mode == "webhook" else []

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await _initialize(self.bot, self.cfg)
        try:
            if self.cfg.mode == "polling":
                await self.bot.delete_webhook()  # getUpdates is refused while a webhook is set
                self._poller = asyncio.create_task(self._poll(), name="telegram-polling")
            elif self.cfg.register_webhook:
                await self._set_webhook()
        except BaseException:
            await self.bot.shutdown()
            raise
        log.info("telegram: bot @%s ready (%s mode)", self.bot.username, self.cfg.mode)

    async def _set_webhook(self) -> None:
        try:
            await self.bot.set_webhook(self.webhook_url, secret_token=self._secret,
                                       allowed_updates=list(ALLOWED_UPDATES))
        except TelegramError as exc:
            raise TelegramSetupError(
                f"Telegram refused the webhook {self.webhook_url}: "
                f"{_redact(exc.message, self._token)}. Telegram needs a public https:// "
                "server.public_url (ports 443, 80, 88 or 8443) and a secret of letters, digits, "
                "_ and -; for local development use mode = \"polling\".") from None

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._tasks:  # pending answerCallbackQuery calls: short, let them finish
            await asyncio.wait(list(self._tasks), timeout=5)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bot.shutdown()

    # -- inbound --------------------------------------------------------------------------

    async def _on_webhook(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self._secret.encode()):
            raise errors.Forbidden("bad_secret", f"The {SECRET_HEADER} header is missing or "
                                   "wrong; only Telegram, told our secret by setWebhook, may "
                                   "post here.")
        # Past the secret, the sender is Telegram: whatever we answer but 2xx, it sends
        # the same update again for a day. An update we cannot use is logged and dropped.
        try:
            update = self._parse(await read_body(request, self._max_update))
            self._to_inbound(update)  # a field of the wrong shape: found before any commit
        except errors.TooLarge:
            return self._ignored("too_large", f"The update is larger than {self._max_update} "
                            "bytes ([channels.telegram] max_update_bytes), more than Telegram "
                            "sends.")
        except errors.BadRequest as exc:
            return self._ignored(exc.code, exc.message)
        await self.handle_update(update)
        return web.Response(status=200)  # only after the commit: else Telegram redelivers

    def _ignored(self, code: str, message: str) -> web.Response:
        """200 for an update we cannot use, so Telegram does not send it again (it retries
        anything else for a day, core.telegram.org/bots/api#setwebhook); logged, counted."""
        log.warning("telegram: ignored an update (%s): %s", code, message)
        self._on_ignored("bad_json" if code in _UNPARSABLE else code)
        return web.json_response({"status": "ignored", "reason": code, "message": message})

    def _parse(self, body: bytes) -> Update:
        data = parse_json(body)
        if not isinstance(data, dict) or type(data.get("update_id")) is not int:
            raise errors.BadRequest("not_an_update", "The body is not a Telegram Update (it "
                                    "has no integer update_id).")
        try:
            return Update.de_json(data, self.bot)
        except _SHAPE_ERRORS as exc:
            raise errors.BadRequest("not_an_update", "The body is not a Telegram Update "
                                    f"({type(exc).__name__}).") from None

    async def handle_update(self, update: Update) -> None:
        """Commit what the update says (once per update_id); then stop a button's spinner."""
        message = update.message
        if message is not None and message.migrate_to_chat_id:  # said in the old group
            await self._chat_moved(str(message.chat.id), str(message.migrate_to_chat_id))
            return
        if message is not None and message.migrate_from_chat_id:  # said in the supergroup
            await self._chat_moved(str(message.migrate_from_chat_id), str(message.chat.id))
            return
        query = update.callback_query
        try:
            event = self._to_inbound(update)
        except errors.BadRequest as exc:  # polling: the webhook checked before
            log.warning("telegram: ignored update %d (%s): %s", update.update_id, exc.code,
                        exc.message)
            self._on_ignored(exc.code)
            return
        if event is None:  # a sticker, a service message, a game button, another bot's command
            log.debug("telegram: update %d has nothing for a flow", update.update_id)
            self._on_ignored("unsupported")
        elif message is not None and message.media_group_id and self._album_seen(
                event.user_id, message.media_group_id, update.update_id):
            log.info("telegram: update %d is one more item of an album the flow has; ignored",
                     update.update_id)
            self._on_ignored("unsupported")
            return
        fresh = await self._inbound(event) if event is not None else False
        if query is not None and (fresh or event is None):
            self._spawn(self._answer(query.id))

    def _to_inbound(self, update: Update) -> Inbound | None:
        """The update as an event for the flow; None when it has nothing for one. Raises
        BadRequest (not_an_update) for an update whose fields have the wrong shape (PTB's
        de_json does not check types): answered 200 and logged, as one Telegram would
        otherwise send again for a day, failing each time."""
        try:
            event = self._event(update)
        except _SHAPE_ERRORS as exc:
            raise errors.BadRequest("not_an_update", "The update has a field of the wrong "
                                    f"shape ({type(exc).__name__}).") from None
        if event is not None and not (
                isinstance(event.text, str) and isinstance(event.payload, str | None)
                and all(isinstance(v, str) for v in event.variables.values())):
            raise errors.BadRequest("not_an_update", "The update has a text, a button or a "
                                    "file field that is not a string.")
        return event

    def _event(self, update: Update) -> Inbound | None:
        event_id = f"telegram:{update.update_id}"
        query = update.callback_query
        if query is not None:
            if query.data is None:  # a game button: nothing for a flow to do
                return None
            chat = query.message.chat.id if query.message is not None else query.from_user.id
            return Inbound(self.name, self._current(chat), text=_pressed_label(update), payload=query.data,
                           user_name=query.from_user.full_name, event_id=event_id,
                           variables=media_variables())  # no earlier photo lingers
        message = update.message
        if message is None:
            return None
        name = message.from_user.full_name if message.from_user else ""
        if message.web_app_data is not None:
            data = message.web_app_data.data
            return Inbound(self.name, self._current(message.chat.id), text=data, user_name=name,
                           event_id=event_id,
                           variables={"web_app_data": data, **media_variables()})
        media = _media(message)
        if message.text is None and not media["media_type"]:  # stickers, service messages
            return None
        text = self._without_mention(message.text) if message.text is not None \
            else message.caption or ""
        if text is None:  # another bot's command
            return None
        return Inbound(self.name, self._current(message.chat.id), text=text, user_name=name,
                       event_id=event_id, variables=media)

    def _current(self, chat_id: int) -> str:
        """The chat's id now: an update from a group that became a supergroup, delivered
        late (webhooks reorder), belongs to the conversation that moved to the new id; else
        it would start a second conversation at the old id, which the other migration
        notice would then move over the real one. This map is this process's shortcut; the
        store keeps the alias with the move and follows it too (after a restart, on
        another node)."""
        return self._moved.get(str(chat_id), str(chat_id))

    def _without_mention(self, text: str) -> str | None:
        """"/start@our_bot …" (commands in groups) → "/start …", so restart words match;
        None for a command addressed to another bot ("/start@other_bot ref"): in a group
        with several bots (or privacy mode off) it is not an answer to our question."""
        mention = _MENTION.match(text)
        if mention is None:
            return text
        try:
            ours = self.bot.username  # known after getMe
        except RuntimeError:
            return text
        if mention["bot"].casefold() != ours.casefold():
            return None
        return mention["command"] + text[mention.end():]

    async def _answer(self, query_id: str) -> None:
        try:
            await self.bot.answer_callback_query(query_id)
        except TelegramError as exc:  # e.g. "query is too old": the update itself is committed
            log.warning("telegram: answerCallbackQuery failed: %s", _redact(exc.message, self._token))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        """getUpdates in a loop; an update's offset is confirmed only after its commit."""
        offset: int | None = None
        failures = 0
        attempts: dict[int, int] = {}
        while True:
            try:
                updates = await self.bot.get_updates(offset=offset, timeout=POLL_TIMEOUT,
                                                     allowed_updates=list(ALLOWED_UPDATES))
            except TelegramError as exc:
                failures += 1
                delay = (_seconds(exc) if isinstance(exc, RetryAfter)
                         else min(POLL_MAX_BACKOFF, self.poll_backoff * 2 ** (failures - 1)))
                log.warning("telegram: getUpdates failed (%s); trying again in %.0f s",
                            _redact(exc.message, self._token), delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            for update in updates:
                try:
                    await self.handle_update(update)
                except Exception:
                    n = attempts[update.update_id] = attempts.get(update.update_id, 0) + 1
                    if n < POISON_ATTEMPTS:
                        log.exception("telegram: update %d not committed; it will be fetched "
                                      "again", update.update_id)
                        await asyncio.sleep(min(POLL_MAX_BACKOFF, self.poll_backoff * 2 ** n))
                        break
                    log.exception("telegram: update %d failed %d times; skipping it",
                                  update.update_id, n)
                attempts.pop(update.update_id, None)
                offset = update.update_id + 1

    # -- outbound -------------------------------------------------------------------------

    async def send(self, delivery: Delivery) -> str | None:
        user_id = self._moved.get(delivery.user_id, delivery.user_id)
        try:
            return await self._send_or_link_text(delivery, user_id)
        except ChatMigrated as exc:
            # the group became a supergroup: Telegram names its new id; the conversation
            # moves there and this message goes to it
            new_id = str(exc.new_chat_id)
            await self._chat_moved(user_id, new_id)
        try:
            return await self._send_or_link_text(delivery, new_id)
        except TelegramError as exc:
            raise send_error(exc, self._token) from None

    def _album_seen(self, chat: str, group: str, update_id: int) -> bool:
        """Whether another item of album `group` reached this chat's flow already. Several
        photos sent at once come as one update each with one media_group_id: the first to
        arrive answers the open question, the others would answer the next ones. Marked
        before the commit (the items arrive together); the same update redelivered is
        not "another"."""
        first = self._albums.setdefault((chat, group), update_id)
        if len(self._albums) > 10_000:
            self._albums.clear()
            self._albums[(chat, group)] = first
        return first != update_id

    async def _chat_moved(self, old_id: str, new_id: str) -> None:
        """Remember the new id for rows already read, and move the conversation."""
        if len(self._moved) >= 10_000:
            self._moved.clear()
        self._moved[old_id] = new_id
        if self._move_chat is not None:
            await self._move_chat(self.name, old_id, new_id)

    async def _send_or_link_text(self, delivery: Delivery, user_id: str) -> str | None:
        """Send; a refused link button is sent again as text. Raises SendError, or
        ChatMigrated for the caller to follow."""
        m = delivery.message
        chat_id: int | str = int(user_id) if user_id.lstrip("-").isdigit() else user_id
        try:
            return await self._send(delivery.id, chat_id, m, link_button=True)
        except ChatMigrated:
            raise
        except BadRequest as exc:
            if m.link is None or not _LINK_REFUSED.search(exc.message):
                raise send_error(exc, self._token) from None
            # Telegram refuses button URLs it cannot open (localhost, plain IPs) and Mini App
            # buttons outside private chats: put the link into the text instead, so the user
            # can still reach the page.
            log.warning("telegram: button URL refused (%s); sending the link as text", exc.message)
        except TelegramError as exc:
            raise send_error(exc, self._token) from None
        try:
            return await self._send(delivery.id, chat_id, m, link_button=False)
        except ChatMigrated:
            raise
        except TelegramError as exc:
            raise send_error(exc, self._token) from None

    async def _send(self, delivery_id: int, chat_id: int | str, m: Message, *,
                    link_button: bool) -> str:
        """Long texts go in parts, the keyboard on the last; a retry after a failed part
        sends only the parts not sent yet (the link fallback changes only the last part)."""
        text = m.text
        if m.link is not None and not link_button:
            text = f"{text}\n\n{m.link.label}: {m.link.url}"
        markup = self.keyboard(m, link_button=link_button)
        caption = ""
        if m.media is not None:  # the file first, the text as its caption, the rest after
            caption, text = cut_text(text, CAPTION_LIMIT, utf16_len)
        parts: list[str | None] = [None] if m.media is not None else []
        if text.strip() or m.media is None:
            # Telegram refuses, for good, a message of only spaces and line breaks
            # ("message text is empty"): a blank text, or a blank part of a long one
            parts += [part for part in split_text(text, TEXT_LIMIT, utf16_len)
                      if part.strip()] or [m.link.label if m.link else "…"]
        message_id = ""
        for i in range(min(self._parts.first_unsent(delivery_id), len(parts) - 1), len(parts)):
            part, keys = parts[i], markup if i == len(parts) - 1 else None
            if part is None:
                assert m.media is not None
                sent = await self._send_media_or_link(chat_id, m.media, caption, keys)
            else:
                sent = await self.bot.send_message(
                    chat_id, html.escape(part, quote=False), parse_mode=ParseMode.HTML,
                    reply_markup=keys)
            self._parts.sent(delivery_id, i + 1)
            message_id = str(sent.message_id)
        self._parts.done(delivery_id)
        return message_id

    async def _send_media_or_link(self, chat_id: int | str, media: Media, caption: str,
                                  markup: InlineKeyboardMarkup | None) -> TgMessage:
        """The file; when Telegram cannot take it (it downloads the URL itself: a host that
        is down, an HTML page, an image too large, a bad URL), the caption with the URL as
        text instead, so the text and its buttons still reach the user."""
        try:
            return await self._send_media(chat_id, media, caption, markup)
        except ChatMigrated:
            raise
        except BadRequest as exc:
            log.warning("telegram: %s %s… refused (%s); sending its link as text",
                        media.kind, media.url[:40], exc.message)
        parts = split_text(f"{caption}\n\n{media.url}" if caption else media.url or "…",
                           TEXT_LIMIT, utf16_len)
        sent: TgMessage | None = None
        for i, part in enumerate(parts):
            sent = await self.bot.send_message(
                chat_id, html.escape(part, quote=False), parse_mode=ParseMode.HTML,
                reply_markup=markup if i == len(parts) - 1 else None)
        assert sent is not None
        return sent

    async def _send_media(self, chat_id: int | str, media: Media, caption: str,
                          markup: InlineKeyboardMarkup | None) -> TgMessage:
        """sendPhoto or sendDocument by URL: Telegram fetches the file itself."""
        send = self.bot.send_photo if media.kind == "image" else self.bot.send_document
        return await send(chat_id, media.url,
                          caption=html.escape(caption, quote=False) if caption.strip() else None,
                          parse_mode=ParseMode.HTML, reply_markup=markup)

    def keyboard(self, m: Message, *, link_button: bool = True) -> InlineKeyboardMarkup | None:
        """Buttons as callback buttons, one per row; the WebView link as a url or web_app button."""
        rows: list[list[InlineKeyboardButton]] = []
        for b in m.buttons:
            if len(b.payload.encode()) > CALLBACK_DATA_BYTES:
                raise SendError(f"button payload {b.payload[:16]!r}… is longer than Telegram's "
                                f"{CALLBACK_DATA_BYTES} bytes", permanent=True,
                                code="callback_data_too_long")
            rows.append([InlineKeyboardButton(b.label, callback_data=b.payload)])
        link = m.link
        if link is not None and link_button:
            web_app = link.web_app or self.cfg.webview_button == "web_app"
            if web_app and not link.url.startswith("https://"):
                log.warning("telegram: Mini Apps need https:// URLs; sending %s… as a plain "
                            "link button", link.url[:40])
                web_app = False
            rows.append([InlineKeyboardButton(link.label, web_app=WebAppInfo(link.url))
                         if web_app else InlineKeyboardButton(link.label, url=link.url)])
        return InlineKeyboardMarkup(rows) if rows else None


async def webhook_info(config: Config) -> str:
    """What Telegram has as our webhook (getWebhookInfo), next to what the config expects."""
    cfg = config.channels.telegram
    bot = _make_bot(cfg, _require_env(cfg.token_env, "the bot token from @BotFather"))
    await _initialize(bot, cfg)
    try:
        info = await bot.get_webhook_info()
    except TelegramError as exc:
        raise TelegramSetupError(f"getWebhookInfo failed: {_redact(exc.message, bot.token)}")\
            from None
    finally:
        await bot.shutdown()
    expected = config.server.url("/telegram")
    rows = [
        ("bot", f"@{bot.username}"),
        ("webhook url", info.url or "(none: updates wait for getUpdates, i.e. polling)"),
        ("pending updates", str(info.pending_update_count)),
        ("allowed updates", ", ".join(info.allowed_updates or ()) or "(Telegram's default)"),
        ("max connections", str(info.max_connections or "")),
        ("ip address", info.ip_address or ""),
        ("last error", f"{info.last_error_date:%Y-%m-%d %H:%M:%S} UTC: {info.last_error_message}"
         if info.last_error_date else "none"),
    ]
    lines = [f"{k + ':':<17}{v}" for k, v in rows]
    if cfg.mode == "polling":
        lines.append("config: mode = \"polling\"; flowbot serve deletes the webhook at start.")
    elif info.url == expected:
        lines.append(f"config: ok, Telegram delivers to {expected}")
    else:
        lines.append(f"config: expects {expected}; `flowbot serve` sets it at start when "
                     "register_webhook = true.")
    return "\n".join(lines)
