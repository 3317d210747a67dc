"""WhatsApp through Twilio: signed form webhooks in, the Messages API out.
The only module that imports `twilio`."""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from aiohttp import web
from multidict import MultiDict
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from bot import jobs
from bot.body import read_body
from bot.channel_config import TWILIO_API, WHATSAPP_MAX_BODY_BYTES, WhatsAppConfig
from bot.errors import BadRequest, FlowbotError, Forbidden, TooLarge
from channels import vcard
from channels.base import (
    Button,
    Delivery,
    Inbound,
    Link,
    Message,
    RateLimit,
    Route,
    SendError,
    SentParts,
    media_variables,
    split_text,
)

if TYPE_CHECKING:
    from bot.config import Config, ServerConfig
    from bot.runtime import Runtime

log = logging.getLogger(__name__)
# twilio's HTTP client logs every request and its headers at INFO; keep only its warnings.
_http_log = logging.getLogger(__name__ + ".http")
_http_log.setLevel(logging.WARNING)

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
SEND_TIMEOUT = 15.0  # seconds for one Messages API call; the outbox retries after that
OUTSIDE_WINDOW = "63016"
INVALID_MEDIA_URL = "21620"  # Twilio refuses a MediaUrl it cannot use (400, at create time)
# Error codes of a status callback (failed / undelivered) that say Twilio accepted the
# message but could not fetch or pass on its file: 63019 "Media failed to download",
# 63021 "Channel invalid content" (a file type WhatsApp does not take), 11200 "HTTP
# retrieval failure" (fetching MediaUrl: a 4xx/5xx, a timeout, a wrong Content-Type). On
# a message with a file, its text goes again without it (see `_status`).
MEDIA_FAILED = frozenset({"63019", "63021", "11200"})
MAX_FORM_BYTES = WHATSAPP_MAX_BODY_BYTES  # default of [channels.whatsapp] max_body_bytes
# WhatsApp's limits for Content templates sent inside the 24-hour window.
TEMPLATE_BODY_MAX = 1024
BODY_MAX = 1600  # characters in one WhatsApp message (Twilio error 21617 beyond)
BUTTON_TITLE_MAX = 20
# A shared contact's vCard, fetched before the message is committed: Twilio waits 15 s for
# our answer (then logs error 11200), so the fetch gets a third of that; a card beyond the
# cap (a photo in it) is read up to the cap, where the name and numbers come first.
VCARD_TIMEOUT = 5.0
VCARD_MAX_BYTES = 64 * 1024
# Payloads the engine makes ("<8 hex>:<index>"); a template made elsewhere has its own.
_OUR_PAYLOAD = re.compile(r"[0-9a-f]{8}:\d{1,3}")

# The Retry-After of the last Twilio answer in this task: twilio's exceptions drop headers.
_retry_after: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "twilio_retry_after", default=None)


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (an HTTP date is rare from Twilio: left to the outbox backoff)."""
    try:
        return min(3600.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


class _TwilioHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # twilio has no type hints
    """twilio's aiohttp client (one pooled session) plus what it leaves out: a default timeout,
    the API base URL of our config (a local fake in tests), and the Retry-After header."""

    def __init__(self, api_base_url: str, timeout: float) -> None:
        super().__init__(timeout=timeout, logger=_http_log)
        self.api_base_url = api_base_url

    async def request(  # the signature of twilio's HttpClient.request
            self, method: str, url: str, params: Any = None, data: Any = None,
            headers: Any = None, auth: Any = None,
            timeout: float | None = None,  # noqa: ASYNC109
            allow_redirects: bool = False) -> Any:
        if self.api_base_url != TWILIO_API:
            parts = urlsplit(url)
            url = self.api_base_url + url[len(f"{parts.scheme}://{parts.netloc}"):]
        response = await super().request(
            method, url, params=params, data=data, headers=headers, auth=auth,
            timeout=timeout if timeout is not None else self.timeout,
            allow_redirects=allow_redirects)
        _retry_after.set(_seconds(response.headers.get("Retry-After"))
                         if response.status_code in (429, 503) else None)
        return response


def inbound_event(form: Mapping[str, str]) -> Inbound:
    """An incoming WhatsApp message (Twilio's form parameters) as an Inbound event.
    Parameters we do not know are ignored: Twilio adds new ones without notice."""
    sid = form.get("MessageSid", "")
    sender = form.get("From", "")
    if not sid:
        raise BadRequest("missing_message_sid", "The request has no MessageSid parameter.")
    if not sender.startswith("whatsapp:"):
        raise BadRequest("not_whatsapp", f"This route serves WhatsApp only; From is {sender!r}. "
                         "Point SMS numbers at another webhook.")
    text = form.get("ButtonText") or form.get("Body", "")  # a quick reply: its label
    payload = form.get("ButtonPayload") or None
    if payload is not None and not _OUR_PAYLOAD.fullmatch(payload):
        payload = None  # a button of a template made elsewhere: its text counts
    try:
        count = max(0, min(10, int(form.get("NumMedia", "0") or 0)))
    except ValueError:
        count = 0
    urls = [form.get(f"MediaUrl{i}", "") for i in range(count)]
    variables = {
        # always set, so a photo's URL does not linger into the next text message
        "media_count": str(count),
        "media_url": urls[0] if urls else "",
        "media_content_type": form.get("MediaContentType0", "") if count else "",
        "media_urls": " ".join(u for u in urls if u),
        "wa_id": form.get("WaId", ""),
        **_media(form, count),
    }
    return Inbound("whatsapp", sender, text, payload, user_name=form.get("ProfileName", ""),
                   event_id=f"twilio:{sid}", variables=variables)


def _media(form: Mapping[str, str], count: int) -> dict[str, str]:
    """The first attachment, a location or a shared contact as the flow's media variables,
    named as on Telegram (see MEDIA_VARIABLES)."""
    if form.get("Latitude") and form.get("Longitude"):
        return media_variables(media_type="location", latitude=form["Latitude"],
                               longitude=form["Longitude"])
    if not count:
        return media_variables()
    content_type = form.get("MediaContentType0", "")
    major = content_type.partition("/")[0]
    if "vcard" in content_type.lower():  # text/vcard, text/x-vcard
        # A shared contact arrives as a vCard file behind MediaUrl0; its name and number
        # are filled in by WhatsAppChannel.with_contact (the fetch needs the credentials).
        # No media_id: a contact is not a file (validation = "media" asks again), as on
        # Telegram.
        return media_variables(media_type="contact", media_content_type=content_type)
    if major == "image":
        kind = "photo"
    elif major == "audio":  # WhatsApp voice notes are Opus in Ogg
        kind = "voice" if "ogg" in content_type else "audio"
    elif major == "video":
        kind = "video"
    else:
        kind = "document"
    return media_variables(media_type=kind, media_id=form.get("MediaUrl0", ""),
                           media_content_type=content_type)


def numbered(text: str, buttons: Sequence[Button]) -> str:
    """Buttons as text: the engine takes the number or the label typed back."""
    numbers = [str(i) for i in range(1, len(buttons) + 1)]
    hint = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} or {numbers[-1]}"
    lines = "\n".join(f"{n}. {b.label}" for n, b in zip(numbers, buttons, strict=True))
    return f"{text}\n\n{lines}\n\nReply {hint}." if text else f"{lines}\n\nReply {hint}."


def plain_text(message: Message) -> str:
    parts = [message.text] if message.text else []
    if message.link is not None:
        parts.append(f"{message.link.label}: {message.link.url}")
    body = "\n".join(parts)
    return numbered(body, message.buttons) if message.buttons else body


class WhatsAppChannel:
    name = "whatsapp"
    # Twilio queues what we send (80 messages/s is a WhatsApp sender's default throughput).
    # One a second per chat after a burst of three keeps a flow's messages in order on the
    # phone, which Twilio does not promise for messages sent at the same instant.
    rate_limit = RateLimit(per_chat_per_second=1.0, global_per_second=80.0, burst=3)

    def __init__(self, config: WhatsAppConfig, server: ServerConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        base = (config.public_url or server.public_url).rstrip("/") + server.path_prefix
        self.inbound_url = f"{base}/twilio/whatsapp"  # exactly what Twilio signs
        self.status_url = f"{base}/twilio/status"
        self.webview_url_base = (config.webview_url_base or
                                 server.public_url.rstrip("/") + server.path_prefix) + "/"
        self.buttons_templates = dict(config.buttons_content_sid)
        self._validator: RequestValidator | None = None
        self._http: _TwilioHttpClient | None = None
        self._client: Client | None = None
        self._media: aiohttp.ClientSession | None = None  # vCards: not twilio's client
        self._token = ""
        self.vcard_timeout = VCARD_TIMEOUT
        self._parts = SentParts()

    @classmethod
    def create(cls, config: Config, runtime: Runtime) -> WhatsAppChannel:
        return cls(config.channels.whatsapp, config.server, runtime)

    def routes(self) -> Sequence[Route]:
        routes = [Route("POST", "/twilio/whatsapp", self._inbound)]
        if self.config.status_callback:
            routes.append(Route("POST", "/twilio/status", self._status))
        return routes

    async def start(self) -> None:
        env = self.config.auth_token_env
        token = os.environ.get(env, "")
        if not token:
            raise FlowbotError(
                f"channels.whatsapp is enabled but the environment variable {env} is not set: "
                f"export {env}=<the Auth Token shown under 'Account info' in the Twilio console>")
        self._validator = RequestValidator(token)
        self._token = token
        self._media = aiohttp.ClientSession()
        self._http = _TwilioHttpClient(self.config.api_base_url, SEND_TIMEOUT)
        self._client = Client(self.config.account_sid, token, http_client=self._http)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._media is not None:
            await self._media.close()
            self._media = None
        self._client = None

    # -- inbound ------------------------------------------------------------------------

    async def _signed_form(self, request: web.Request, url: str) -> MultiDict[str]:
        """The form parameters, once X-Twilio-Signature proves Twilio sent them to `url`.
        We check against the configured public URL, never the URL this server sees: behind
        a proxy or TLS terminator those differ."""
        limit = self.config.max_body_bytes
        try:
            body = await read_body(request, limit)
        except TooLarge:
            # unsigned as far as we know (the signature covers the whole form): refused
            raise TooLarge("too_large", f"The form is larger than {limit} bytes "
                           "([channels.whatsapp] max_body_bytes), more than Twilio posts."
                           ) from None
        form = MultiDict(parse_qsl(body.decode("latin-1"), keep_blank_values=True,
                                   encoding="utf-8", errors="replace"))
        signature = request.headers.get("X-Twilio-Signature")
        query = request.rel_url.raw_query_string
        signed_url = f"{url}?{query}" if query else url
        if self._validator is None or not signature or not self._validator.validate(
                signed_url, form, signature):
            self.runtime.metrics["whatsapp_bad_signature"] += 1
            log.warning("refused a POST to %s: X-Twilio-Signature %s", request.path,
                        "missing" if not signature else f"does not match {signed_url}")
            raise Forbidden(
                "bad_signature",
                "This endpoint only accepts requests signed by Twilio. The X-Twilio-Signature "
                f"header is {'missing' if not signature else 'wrong'}: it is checked against "
                f"{signed_url}, which must be exactly the URL set in the Twilio console, with "
                "the account's primary Auth Token.")
        return form

    async def _inbound(self, request: web.Request) -> web.Response:
        form = await self._signed_form(request, self.inbound_url)
        event = inbound_event(form)
        if not (event.text or event.payload or event.variables.get("media_type")
                or event.variables.get("media_count") != "0"):
            # nothing a flow can take (a message type Twilio passes on without content):
            # 200, so Twilio records no error; logged and counted
            log.warning("WhatsApp message %s has no text, button or media; ignored "
                        "(MessageType %r)", form.get("MessageSid"), form.get("MessageType", ""))
            self.runtime.stats.ignored_update("whatsapp", "unsupported")
            return web.Response(text=EMPTY_TWIML, content_type="text/xml")
        if event.variables.get("media_type") == "contact":
            event = await self.with_contact(event, form.get("MediaUrl0", ""))
        # A redelivered MessageSid returns False and changed nothing: same answer.
        await self.runtime.handle_inbound(event)
        return web.Response(text=EMPTY_TWIML, content_type="text/xml")

    async def with_contact(self, event: Inbound, url: str) -> Inbound:
        """`event` with `contact_name` and `contact_phone` read from the shared contact's
        vCard at `url` (Twilio's MediaUrl0). Twilio serves media only with HTTP Basic auth,
        Account SID and Auth Token (twilio.com/docs/messaging/api/media-resource), so the
        credentials go to Twilio's API host only. A card that cannot be read leaves both
        empty: the contact still reaches the flow, and the failure is logged."""
        try:
            contact = await self._fetch_contact(url)
        except _VCardUnavailable as exc:
            self.runtime.metrics["whatsapp_vcard_unread"] += 1
            log.warning("WhatsApp contact in %s: its vCard was not read (%s); the flow gets "
                        "the contact without name and phone", event.event_id, exc)
            return event
        variables = {**event.variables, "contact_name": contact.name,
                     "contact_phone": contact.phone}
        return dataclasses.replace(event, variables=variables)

    async def _fetch_contact(self, url: str) -> vcard.Contact:
        if self._media is None:
            raise _VCardUnavailable("the channel is not started")
        if not url.startswith(TWILIO_API + "/"):
            raise _VCardUnavailable(f"{url[:60]!r} is not a Twilio media URL; the Account "
                                    "credentials are sent to api.twilio.com only")
        fetch = self.config.api_base_url + url[len(TWILIO_API):]
        limit = VCARD_MAX_BYTES
        try:
            async with self._media.get(
                    fetch, auth=aiohttp.BasicAuth(self.config.account_sid, self._token),
                    timeout=aiohttp.ClientTimeout(total=self.vcard_timeout)) as resp:
                # a redirect to Twilio's file store drops the Authorization header (aiohttp
                # does so for another origin), as the presigned URL needs none
                if resp.status != 200:
                    raise _VCardUnavailable(f"Twilio answered {resp.status}" + (
                        " (check channels.whatsapp.account_sid and the Auth Token)"
                        if resp.status in (401, 403) else ""))
                body = b""
                async for chunk in resp.content.iter_chunked(8192):
                    body += chunk
                    if len(body) > limit:
                        break
                charset = resp.charset or ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _VCardUnavailable(f"fetching it failed: {type(exc).__name__}") from exc
        text = vcard.decode(body[:limit], charset)
        if len(body) > limit:  # the last line may be cut: drop it
            log.info("WhatsApp contact: vCard over %d bytes, read up to there", limit)
            text = text.rpartition("\n")[0]
        return vcard.parse(text)

    async def _status(self, request: web.Request) -> web.Response:
        form = await self._signed_form(request, self.status_url)
        sid = form.get("MessageSid", "")
        status = form.get("MessageStatus") or form.get("SmsStatus", "")
        if not sid or not status:
            raise BadRequest("missing_status", "A status callback needs MessageSid and "
                             "MessageStatus.")
        code, detail = form.get("ErrorCode", ""), form.get("ErrorMessage", "")
        error = (f"{code}: {detail}" if detail else code) if code else None
        now = self.runtime.clock.now()
        if status in ("failed", "undelivered") and code in MEDIA_FAILED:
            # the file could not go: the same status, and in the same transaction the text
            # as a new row without it, once (a repeated callback finds the row failed)
            resent = await self.runtime.worker.run(jobs.resend_without_media, sid, status,
                                                   error, now)
            found = resent is not None
            if resent:
                self.runtime.metrics["whatsapp_media_fallbacks"] += 1
                log.warning("WhatsApp message %s is %s: error %s; its text goes again "
                            "without the file, with the file's URL (outbox %d)", sid, status,
                            error, resent)
                self.runtime.on_messages()
                return web.Response(text="")
            if resent is None:
                log.warning("WhatsApp message %s is %s: error %s, before its SID is stored; "
                            "its text goes again without the file once it is", sid, status,
                            error)
                return web.Response(text="")
        else:
            found = await self.runtime.worker.run(jobs.set_platform_status, sid, status,
                                                  error, now)
        if error:
            log.warning("WhatsApp message %s is %s: error %s", sid, status, error)
        if not found:
            # 200 all the same: Twilio would only retry. Kept for the "sent" commit that may
            # still bring this SID (Twilio can call back before that commit).
            log.info("status %r for message %s, which is not in the outbox (yet)", status,
                     sid)
        return web.Response(text="")

    # -- outbound -----------------------------------------------------------------------

    def params(self, message: Message) -> dict[str, str]:
        """The Messages API parameters for one message: a Content template where one is
        configured and the message fits it, else plain text."""
        if message.buttons and message.link is None:
            template = self._buttons_template(message.text, message.buttons)
        elif message.link is not None and not message.buttons:
            template = self._webview_template(message.text, message.link)
        else:
            template = None
        return template or {"body": plain_text(message)}

    def _buttons_template(self, text: str, buttons: Sequence[Button]) -> dict[str, str] | None:
        """Quick-reply template with len(buttons) buttons. Variables: {{1}} the text, then
        per button i (1-based) {{2i}} its label and {{2i+1}} its id, our payload."""
        sid = self.buttons_templates.get(len(buttons))
        if (not sid or not text.strip() or len(text) > TEMPLATE_BODY_MAX
                or any(not 0 < len(b.label) <= BUTTON_TITLE_MAX for b in buttons)):
            return None
        variables = {"1": text}
        for i, button in enumerate(buttons, start=1):
            variables[str(2 * i)] = button.label
            variables[str(2 * i + 1)] = button.payload
        return {"content_sid": sid, "content_variables": json.dumps(variables, ensure_ascii=False)}

    def _webview_template(self, text: str, link: Link) -> dict[str, str] | None:
        """Call-to-action template with one URL button. Variables: {{1}} the text, {{2}} the
        URL after webview_url_base (the template's URL is `<webview_url_base>/{{2}}`),
        {{3}} the button label."""
        sid = self.config.webview_content_sid
        base = self.webview_url_base
        suffix = link.url[len(base):] if link.url.startswith(base) else ""
        if (not sid or not text.strip() or not suffix or len(text) > TEMPLATE_BODY_MAX
                or not 0 < len(link.label) <= BUTTON_TITLE_MAX):
            return None
        variables = {"1": text, "2": suffix, "3": link.label}
        return {"content_sid": sid, "content_variables": json.dumps(variables, ensure_ascii=False)}

    async def send(self, delivery: Delivery) -> str | None:
        if self._client is None:
            raise SendError("the WhatsApp channel is not started", permanent=False)
        media = delivery.message.media
        # a file goes as MediaUrl with the text as its body: no Content template
        params = self.params(delivery.message) if media is None \
            else {"body": plain_text(delivery.message)}
        body = params.pop("body", None)
        if body is not None and not body.strip() and media is None:
            log.debug("outbox %d: nothing to say (blank text)", delivery.id)
            return None
        if self.config.status_callback:
            params["status_callback"] = self.status_url
        # WhatsApp takes 1,600 characters per message: longer texts go in parts (the file
        # with the first), and a retry after a failed part sends only the parts not sent yet
        if body is None:
            parts = [params]  # a Content template: one message
        elif body.strip():
            parts = [{**params, "body": part} for part in split_text(body, BODY_MAX)]
        else:
            parts = [dict(params)]  # a file alone
        if media is not None:
            parts[0]["media_url"] = media.url  # Twilio fetches it (images, PDFs, …)
        sid = ""
        i = self._parts.first_unsent(delivery.id)
        while i < len(parts):
            try:
                sid = await self._create(delivery.user_id, parts[i])
            except SendError as exc:
                if media is None or "media_url" not in parts[i] or exc.code != INVALID_MEDIA_URL:
                    raise
                # Twilio refused the file's URL: the text still goes, with the URL in it (a
                # question whose buttons never arrive leaves the user stuck)
                log.warning("outbox %d: Twilio refused the media URL %s… (%s); sending it "
                            "as text", delivery.id, media.url[:40], exc)
                fallback = plain_text(delivery.message.without_media())
                parts = [{**params, "body": part} for part in split_text(fallback, BODY_MAX)]
                continue
            self._parts.sent(delivery.id, i + 1, sid)
            i += 1
        # The row keeps one SID, and status callbacks are matched by it. A file goes with
        # the first part, and only Twilio's fetch of that file fails later (63019): that
        # part's SID, so its failure finds the row and the text is sent again without the
        # file (`_status`). A text alone keeps the last part's, as before.
        if media is not None and "media_url" in parts[0]:
            sid = self._parts.first_id(delivery.id) or sid
        self._parts.done(delivery.id)
        return sid

    async def _create(self, to: str, params: dict[str, str]) -> str:
        assert self._client is not None
        _retry_after.set(None)
        try:
            sent = await self._client.messages.create_async(from_=self.config.from_, to=to,
                                                            **params)
        except (TwilioRestException, TwilioServiceException) as exc:
            raise _send_error(exc, _retry_after.get()) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SendError(f"Twilio API unreachable: {type(exc).__name__}",
                            permanent=False) from exc
        return str(sent.sid)


class _VCardUnavailable(Exception):
    """A shared contact's vCard could not be read; the message goes on without it."""


def _send_error(exc: TwilioRestException | TwilioServiceException,
                retry_after: float | None) -> SendError:
    """Twilio's answer as a SendError: 429 and 5xx are retried, other 4xx recorded."""
    status = int(exc.status or 0)
    code = str(exc.code) if exc.code else ""
    if isinstance(exc, TwilioServiceException):
        detail = exc.detail or exc.title
    else:
        detail = str(exc.msg).removeprefix("Unable to create record: ")
    if status == 429 or status >= 500:
        return SendError(f"Twilio answered {status}: {detail}", permanent=False, code=code,
                         retry_after=retry_after)
    if code == OUTSIDE_WINDOW:
        detail += (" (WhatsApp accepts free-form messages only within 24 hours of the "
                   "user's last message)")
    elif status in (401, 403):
        detail += " (check channels.whatsapp.account_sid and the Auth Token)"
    return SendError(f"Twilio refused the message ({status}): {detail}", permanent=True,
                     code=code)
