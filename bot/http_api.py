"""The public wait endpoints: `POST /webview/callback` and `POST /webhook`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bot.errors import BadRequest, TooLarge, Unauthorized
from bot.flow import WebhookBlock
from bot.runtime import Runtime

MAX_DEPTH = 32


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes whatever Content-Length claims."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise _too_large(limit)
    return body


def _too_large(limit: int) -> TooLarge:
    return TooLarge("too_large", f"The body is larger than the {limit // 1024} KiB this "
                    "server accepts; send less data or raise server.max_body_bytes.")


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        nxt: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        level = nxt
    return depth


def parse_json(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadRequest("too_deep", f"The JSON is nested more than {MAX_DEPTH} levels deep.")\
            from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("bad_json", "The body is not valid JSON. Send an object like "
                         '{"executionId": "…", "success": true, "data": {}}.') from None
    # a body with fewer brackets than MAX_DEPTH cannot nest deeper: skip the walk (hot path)
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise BadRequest("too_deep", f"The JSON is nested more than {MAX_DEPTH} levels deep.")
    return value


def parse_callback(body: bytes) -> tuple[str, bool, dict[str, Any] | None, dict[str, Any]]:
    """Validate a callback body: (executionId, success, data, the whole object)."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise BadRequest("not_an_object", "The body must be a JSON object with executionId "
                         "and success.")
    eid = doc.get("executionId")
    if "executionId" not in doc:
        raise BadRequest("missing_field", "executionId is missing; copy it from the page's "
                         "URL query parameter executionId.", field="executionId")
    if not isinstance(eid, str) or not eid:
        raise BadRequest("wrong_type", "executionId must be a non-empty string.",
                         field="executionId")
    if "success" not in doc:
        raise BadRequest("missing_field", "success is missing; send true or false.",
                         field="success")
    success = doc["success"]
    if not isinstance(success, bool):
        raise BadRequest("wrong_type", f"success must be a JSON boolean (true or false), not "
                         f"{json.dumps(success)}.", field="success")
    data = doc.get("data")
    if data is not None and not isinstance(data, dict):
        raise BadRequest("wrong_type", "data must be a JSON object when given.", field="data")
    return eid, success, data, doc


async def webview_callback(request: web.Request, runtime: Runtime) -> web.Response:
    body = await read_body(request, runtime.config.server.max_body_bytes)
    eid, success, data, doc = parse_callback(body)
    # what a verified WebView proves itself with (telegramInitData), without the payload
    proof = {k: v for k, v in doc.items() if k not in _CALLBACK_FIELDS} or None
    outcome = await runtime.webview_callback(eid, success, data, proof=proof)
    return _ok(_CALLBACK_OK.get(outcome)
               or json.dumps({"status": "ok", "outcome": outcome}).encode())


_CALLBACK_FIELDS = ("executionId", "success", "data")
_CALLBACK_OK = {o: json.dumps({"status": "ok", "outcome": o}).encode() for o in ("success", "error")}


def _ok(body: bytes) -> web.Response:
    """A 200 JSON answer from ready bytes (the hot path: no encoder per request)."""
    return web.Response(body=body, content_type="application/json")


def _webhook_payload(body: bytes, content_type: str) -> Any:
    if not body.strip():
        return {}
    if content_type == "application/x-www-form-urlencoded":
        try:
            return dict(parse_qsl(body.decode(), keep_blank_values=True))
        except UnicodeDecodeError:
            raise BadRequest("bad_body", "The form body is not valid UTF-8.") from None
    return parse_json(body)


@dataclass(frozen=True)
class SignedBody:
    """A webhook's body and Standard Webhooks headers, checked inside the database job once
    the block (and so its secret) is known. Plain data: it may cross to the database process."""

    body: bytes
    headers: Mapping[str, str]

    @classmethod
    def of(cls, body: bytes, headers: Mapping[str, str]) -> SignedBody:
        return cls(body, {k.lower(): v for k, v in headers.items()
                          if k.lower() in ("webhook-id", "webhook-timestamp", "webhook-signature")})

    def verify(self, block: WebhookBlock) -> str | None:
        """The webhook-id (None: the block takes unsigned calls). Raises 401."""
        return verify_signature(block, self.body, self.headers) if block.secret_env else None


def verify_signature(block: WebhookBlock, body: bytes, headers: Mapping[str, str]) -> str:
    """Check a Standard Webhooks signature; returns the webhook-id. Raises 401."""
    secret = os.environ.get(block.secret_env, "")
    if not secret:
        raise Unauthorized("secret_unset", "This Webhook block requires a signature, but its "
                           f"secret variable {block.secret_env} is not set on the server.")
    hdrs = {k.lower(): v for k, v in headers.items()}
    try:
        Webhook(secret).verify(body, hdrs, json_parse=False)
    except (WebhookVerificationError, ValueError) as exc:
        raise Unauthorized("bad_signature", f"The webhook signature is missing or wrong "
                           f"({exc}). Sign with the block's secret as Standard Webhooks "
                           "describes (webhook-id, webhook-timestamp, webhook-signature).")\
            from None
    return hdrs["webhook-id"]


async def webhook(request: web.Request, runtime: Runtime) -> web.Response:
    body = await read_body(request, runtime.config.server.max_body_bytes)
    payload = _webhook_payload(body, request.content_type)
    key = request.query.get("conversation_key")
    if key is None and isinstance(payload, dict):
        key = payload.get("conversation_key")
    if not isinstance(key, str) or not key:
        raise BadRequest("missing_conversation_key", "conversation_key is missing: put it in "
                         "the body or in the URL as ?conversation_key=….")

    fresh = await runtime.webhook(key, payload, SignedBody.of(body, request.headers))
    return _ok(b'{"status": "ok"}' if fresh else b'{"status": "ok", "duplicate": true}')
