"""What every endpoint does with a request's bytes before deciding anything: read the body
whole (however the network cut it into segments), bounded by a size limit and a deadline,
and parse it strictly (UTF-8, JSON per RFC 8259 with no NaN/Infinity/out-of-range numbers,
no lone surrogates, bounded nesting). Call `read_body` and `parse_json`; never
`request.content.read(n)`, which returns whatever happens to be buffered."""

from __future__ import annotations

import asyncio
import json
import math
import re
import zlib
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    ContentEncodingError,
    DecompressSizeError,
    HttpProcessingError,
)
from aiohttp.web_protocol import RequestPayloadError

from bot.errors import BadRequest, RequestTimeout, TooLarge

MAX_DEPTH = 32  # nesting of JSON arrays/objects we accept; real payloads use a handful
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a whole body, when the app does not say

# The seconds a body may take to arrive (server.body_timeout); set by the server.
BODY_TIMEOUT = web.AppKey("body_timeout", float)


# Content-Encoding values a body may carry (RFC 9110 8.4.1); "x-gzip" is gzip's old alias
ENCODINGS = ("gzip", "deflate")
_ACCEPTED = 'Send the body as is, or with "Content-Encoding: gzip" or "deflate".'


def _encoding(request: web.Request) -> str | None:
    """The body's one content coding (None for none/identity), or 400 bad_encoding for a
    coding we do not decode (br, zstd, compress, anything unknown, or several stacked)."""
    header = request.headers.get("Content-Encoding", "")
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [("gzip" if c == "x-gzip" else c) for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in ENCODINGS:
        raise BadRequest("bad_encoding", f"Content-Encoding {header.strip()[:60]!r} is not "
                         f"accepted. {_ACCEPTED}")
    return codings[0]


def _bad_encoding(coding: str) -> BadRequest:
    return BadRequest("bad_encoding", f"The body is not valid {coding} data, as its "
                      f"Content-Encoding says. {_ACCEPTED}")


def _decode(raw: bytes, coding: str, limit: int) -> bytes:
    """`raw` decompressed: at most `limit` bytes (413 past it, however well it compresses),
    400 bad_encoding when it is not a whole `coding` stream."""
    if coding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    else:  # deflate is zlib-wrapped (RFC 9110), but some clients send raw deflate
        wbits = zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(raw, limit + 1)
    except zlib.error:
        raise _bad_encoding(coding) from None
    if len(out) > limit:
        raise _too_large(limit)
    if not decoder.eof or decoder.unused_data:
        raise _bad_encoding(coding)
    return out


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole raw body of `request`: every byte up to EOF (Content-Length or chunked),
    however it is segmented or delayed, decompressed when its Content-Encoding is gzip or
    deflate. More than `limit` bytes, sent or decompressed, is 413 (refused from the
    Content-Length header when it says so, else as soon as the count passes it); a body
    that takes longer than the app's `BODY_TIMEOUT` seconds is 408; a body cut short or
    with broken chunked framing is 400 incomplete_body; any other coding, or data that is
    not what its coding says, is 400 bad_encoding. Raises `ApiError`s, which the server
    answers as JSON. (The server runs aiohttp with `auto_decompress=False`, see
    `bot.server.RUNNER_OPTIONS`, so that every coding reaches this function; when aiohttp
    did decompress, its errors are answered the same way.)"""
    coding = _encoding(request)
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    # aiohttp sets total_compressed_bytes when it decompresses the stream itself
    decoded = getattr(request.content, "total_compressed_bytes", None) is not None
    timeout = request.config_dict.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout("body_timeout", f"The body did not arrive within {timeout:g} "
                             "seconds; send it at once.") from None
    except RequestPayloadError as exc:  # aiohttp's wrapper around the parser's error
        cause = exc.__cause__
        if isinstance(cause, DecompressSizeError):
            raise _too_large(limit) from None
        if coding is not None and isinstance(cause, ContentEncodingError):
            raise _bad_encoding(coding) from None
        raise BadRequest("incomplete_body", "The body was cut short or its chunked "
                         f"framing is broken ({type(cause or exc).__name__}).") from None
    except (HttpProcessingError, ConnectionError) as exc:
        raise BadRequest("incomplete_body", "The body was cut short or its chunked "
                         f"framing is broken ({type(exc).__name__}).") from None
    body = b"".join(chunks)
    if coding is not None and not decoded:
        body = _decode(body, coding, limit)
    return body


def _too_large(limit: int) -> TooLarge:
    return TooLarge("too_large", f"The body is larger than the {limit // 1024} KiB this "
                    "server accepts; send less data or raise server.max_body_bytes.")


def _no_constant(name: str) -> Any:
    raise BadRequest("bad_number", f"{name} is not a JSON number (RFC 8259); send a finite "
                     "number or a string.")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest("bad_number", f"The number {text[:40]} is out of range; send a "
                         "finite number (or the value as a string).")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _walk(value: Any, check_text: bool) -> int:
    """The nesting depth of `value`; with `check_text`, refuses strings (and keys) holding
    a lone surrogate, which JSON's \\uD800 escapes can produce but UTF-8 cannot carry."""
    depth, level = 0, [value]
    while level:
        depth += 1
        nxt: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                if check_text:
                    nxt.extend(v.keys())
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
            elif check_text and isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadRequest("bad_text", "A string holds a lone UTF-16 surrogate "
                                     "(like \\ud800), which is not text; send valid "
                                     "Unicode.") from None
        level = nxt
    return depth


def without_lone_surrogates(value: Any) -> Any:
    """Parsed JSON with each lone UTF-16 surrogate in its strings and keys replaced by U+FFFD:
    JSON's \\uD800 escapes can write one, but UTF-8, and so neither database, can't hold it."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    return value


def parse_answer(text: str) -> Any:
    """A third party's JSON answer (an http block's): as leniently as `json.loads` reads it
    (not ours to refuse), but with lone surrogates replaced (`without_lone_surrogates`), so
    that what a flow maps from it can be stored. Raises ValueError when it is not JSON."""
    value = json.loads(text)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None:
        value = without_lone_surrogates(value)
    return value


def _too_deep() -> BadRequest:
    return BadRequest("too_deep", f"The JSON is nested more than {MAX_DEPTH} levels deep.")


CALLBACK_EXAMPLE = 'Send an object like {"executionId": "…", "success": true, "data": {}}.'


def parse_json_text(text: str, example: str = CALLBACK_EXAMPLE) -> Any:
    """Parse JSON text strictly: RFC 8259 (no NaN, Infinity or numbers that overflow to
    them), no lone surrogates, nesting of at most `MAX_DEPTH`. Raises `BadRequest`
    (codes bad_json — its position, then `example` —, bad_number, bad_text, too_deep)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _too_deep() from None
    except json.JSONDecodeError as exc:
        raise BadRequest("bad_json", f"The body is not valid JSON (line {exc.lineno} column "
                         f"{exc.colno}: {exc.msg}). {example}") from None
    # a text with fewer brackets than MAX_DEPTH cannot nest deeper, and one without a
    # \uD8xx-\uDFxx escape cannot hold a surrogate: skip the walk (the hot path)
    deep = text.count("{") + text.count("[") > MAX_DEPTH
    escaped = "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    if (deep or escaped) and _walk(value, escaped) > MAX_DEPTH:
        raise _too_deep()
    return value


def parse_json(body: bytes, example: str = CALLBACK_EXAMPLE) -> Any:
    """Parse a JSON body: strict UTF-8 (no BOM, no encoded surrogates), then as
    `parse_json_text`. Raises `BadRequest`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("bad_text", "The body is not valid UTF-8; send JSON encoded as "
                         "UTF-8.") from None
    return parse_json_text(text, example)

