"""The public wait endpoints: `POST /webview/callback`, `POST /webhook` and
`POST /webhook/{conversation_key}`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from bot.body import MAX_DEPTH, parse_json, read_body
from bot.errors import BadRequest
from bot.runtime import Runtime
from bot.signatures import SignedBody
from bot.template import lookup

# Every endpoint reads and parses its body with these (bot/body.py): whole, bounded, strict.
__all__ = ["MAX_DEPTH", "parse_json", "read_body", "webhook", "webview_callback"]


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


_JSON_TYPES = ("application/json", "text/json")


def _is_json_type(content_type: str) -> bool:
    return content_type in _JSON_TYPES or content_type.endswith("+json")


def webhook_payload(body: bytes, content_type: str, header: str = "") -> dict[str, Any]:
    """A webhook body by what it holds, not by its label: empty → {}; a JSON object
    whatever the Content-Type says (`curl -d '{…}'` labels JSON as a form); a
    `multipart/form-data` form's text fields (`curl -F`; `header`: the whole Content-Type
    header, for its boundary); else a form (name=value&…). 400 when it is neither, saying
    what arrived."""
    if not body.strip():
        return {}
    if _is_json_type(content_type):
        doc = parse_json(body, _WEBHOOK_EXAMPLE)
        if not isinstance(doc, dict):
            raise BadRequest("not_an_object", f"The body is JSON but a {_json_kind(doc)}, "
                             "not an object; send an object like {\"order\": {…}}.")
        return doc
    stripped = body.lstrip()
    if stripped[:1] in (b"{", b"["):
        doc = parse_json(body, _WEBHOOK_EXAMPLE)  # it looks like JSON: say what is wrong
        if isinstance(doc, dict):
            return doc
        raise BadRequest("not_an_object", f"The body is JSON but a {_json_kind(doc)}, not an "
                         "object; send an object, or a form (name=value&…).")
    if content_type == "multipart/form-data":
        return _multipart(body, header)
    form = _form(body)
    if form is None:
        shown = content_type or "no Content-Type"
        raise BadRequest("bad_body", f"Received {len(body)} bytes ({shown}) that are neither "
                         "a JSON object nor a form (name=value&…); send one of those, or "
                         "an empty body.")
    return form


_WEBHOOK_EXAMPLE = "Send a JSON object, a form (name=value&…) or an empty body."


def _json_kind(doc: Any) -> str:
    return {list: "list", str: "string", bool: "boolean"}.get(type(doc), "number") \
        if doc is not None else "null"


def _multipart(body: bytes, header: str) -> dict[str, Any]:
    """The text fields of a `multipart/form-data` body (RFC 7578), parsed by the stdlib
    email parser from the bytes already read. A file part, a missing boundary or a broken
    body is 400 `bad_body`: a wait is never completed with part of its data thrown away."""
    def bad(why: str) -> BadRequest:
        return BadRequest("bad_body", f"Received a multipart/form-data body {why}. Send text "
                          "fields only (curl -F 'name=value'), a JSON object or a form "
                          "(name=value&…).")
    try:
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + header.encode("latin-1") + b"\r\n\r\n" + body)
    except (UnicodeError, ValueError):
        raise bad("whose Content-Type header cannot be read") from None
    if not msg.is_multipart() or not msg.get_boundary() or msg.defects:
        raise bad("that is not well formed (its boundary is missing or not closed)")
    form: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_content_disposition() != "form-data" or not isinstance(name, str):
            raise bad("with a part that is not a named form field")
        if part.get_filename() is not None:
            raise bad(f"with a file in field '{name}' (files are not taken)")
        if part.defects or part.is_multipart():
            raise bad(f"whose field '{name}' is not well formed")
        raw = part.get_payload(decode=True)
        try:
            value = raw.decode(part.get_content_charset() or "utf-8") \
                if isinstance(raw, bytes) else ""
        except (LookupError, UnicodeDecodeError):
            raise bad(f"whose field '{name}' is not text in its charset (UTF-8 by "
                      "default)") from None
        form[name] = value
    return form


def _form(body: bytes) -> dict[str, Any] | None:
    """name=value pairs (UTF-8, percent-encoded), or None when the body is not a form."""
    try:
        text = body.decode()
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                          errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    if any(c < " " and c not in "\t\r\n" for c in text):
        return None
    return dict(pairs)


def find_key(payload: Mapping[str, Any], query: Mapping[str, str],
             key_paths: tuple[str, ...]) -> str:
    """The conversation key of a `POST /webhook`: the query string, then a top-level
    `conversation_key`, then each configured `webhooks.key_paths` in order."""
    key: Any = query.get("conversation_key")
    if isinstance(key, str) and key:
        return key
    for path in ("conversation_key", *key_paths):
        key = lookup(payload, path)
        if isinstance(key, str) and key:
            return key
    where = ", ".join(("the query (?conversation_key=…)", "the body's conversation_key",
                       *key_paths))
    raise BadRequest("missing_conversation_key", f"No conversation key found (looked in: "
                     f"{where}). Post to the conversation's own URL {{{{webhook_url}}}} "
                     "instead, or put {{conversation_key}} in one of those places.")


async def webhook(request: web.Request, runtime: Runtime, headers: frozenset[str]) -> web.Response:
    """`POST /webhook` (the key in the query or the body) and `POST /webhook/{key}` (the
    conversation's own URL: whatever arrives completes its wait). `headers`: the ones a
    signature scheme may read (bot.signatures.signature_headers)."""
    body = await read_body(request, runtime.config.server.max_body_bytes)
    payload = webhook_payload(body, request.content_type,
                              request.headers.get("Content-Type", ""))
    key = request.match_info.get("conversation_key")
    if key is None:
        key = find_key(payload, request.query, runtime.config.webhooks.key_paths)
    status = await runtime.webhook(key, payload, SignedBody.of(body, request.headers, headers))
    if status == "accepted":
        return web.Response(body=_ACCEPTED, status=202, content_type="application/json")
    return _ok(_DUPLICATE if status == "duplicate" else _APPLIED)


_APPLIED = b'{"status": "ok"}'
_DUPLICATE = b'{"status": "ok", "duplicate": true}'
_ACCEPTED = b'{"status": "accepted"}'
