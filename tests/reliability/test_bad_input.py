"""Bad input on both wait endpoints: schemathesis against the shipped OpenAPI document (its
strings plus lone surrogates, every request through the segmenting proxy),
oversized and deeply nested bodies, and 100,000 random executionIds. Never a 5xx, and a
rejected request changes nothing (a digest of every table before and after)."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import secrets
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

import bot
from bot.errors import NotFound
from tests.proxy import segmenting_proxy
from tests.reliability.common import App, Server, load, seed_waits, snapshot, write_config
from tests.seed import RUN_SEED

LONG = "--long" in sys.argv  # the option is read at import: schemathesis decorates at import
RANDOM_IDS = 100_000

SCHEMA = schemathesis.openapi.from_path(Path(bot.__file__).parent / "openapi.json").include(
    path_regex=r"^/(webview/callback|webhook|webhook/\{conversation_key\})$")
SCHEMA.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=1000 if LONG else 150)
SCHEMA.config.seed = RUN_SEED  # printed by the run: FLOWBOT_TEST_SEED=… replays it
LONE_SURROGATES = st.characters(categories=["Cs"])


def _inject(value: Any, char: str, rnd: random.Random) -> Any:
    """`value` with `char` put into one of its strings (or keys), chosen by `rnd`."""
    if isinstance(value, str):
        at = rnd.randint(0, len(value))
        return value[:at] + char + value[at:]
    if isinstance(value, dict) and value:
        key = rnd.choice(list(value))
        if rnd.random() < 0.25:
            return {(_inject(k, char, rnd) if k == key else k): v for k, v in value.items()}
        return {**value, key: _inject(value[key], char, rnd)}
    if isinstance(value, list) and value:
        i = rnd.randrange(len(value))
        return [*value[:i], _inject(value[i], char, rnd), *value[i + 1:]]
    return value


@SCHEMA.hook
def flatmap_case(ctx: Any, case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
    """Schemathesis leaves lone surrogates out ("they cannot be encoded for the wire"), but
    JSON carries them as \\ud800 escapes: half the JSON bodies get one in a string or key."""
    if case.media_type != "application/json" or not isinstance(case.body, dict | list | str):
        return st.just(case)

    def with_surrogate(char: str, rnd: random.Random) -> schemathesis.Case:
        # as bytes: schemathesis would validate and encode a str body itself, and fail
        case.body = json.dumps(_inject(case.body, char, rnd)).encode()
        return case

    return st.one_of(st.just(case), st.builds(with_surrogate, LONE_SURROGATES,
                                              st.randoms(use_true_random=False)))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`flowbot serve` with some waits of each kind pending, so there is state to protect."""
    server = Server(tmp_path_factory.mktemp("bad-input"))
    seed_waits(server.db, 20, deadline=time.time() + 3600, prefix="u")
    server.start()
    # the check for stranded conversations (in the background after start-up) has written
    # what it checked: from here on only a request can change the database
    server.until(lambda: server.sql("SELECT count(*) FROM settings") == [(1,)],
                 "the stranded check finished")
    with segmenting_proxy(server.port, pause=0.01) as proxy:
        server.base = proxy.base  # every case goes through small delayed TCP segments
        yield server
    server.stop()


@SCHEMA.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_no_5xx_and_rejections_change_nothing(case: schemathesis.Case,
                                                           live: Server) -> None:
    before = snapshot(live.db)
    response = case.call(base_url=live.base, timeout=10)
    assert response.status_code < 500, (response.status_code, response.text)
    assert snapshot(live.db) == before
    if case.method.upper() != case.operation.method.upper():  # a method the document lacks
        assert response.status_code == 405
        assert response.headers["allow"]
    elif case.method.upper() == "OPTIONS":  # the CORS preflight
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == ["*"]
        return
    # no generated request can name a real executionId or conversation_key
    assert response.status_code >= 400, (case.body, response.text)
    assert response.headers["content-type"][0].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error", "message"} and body["message"], body
    # the answer matches the document (status listed, schema of the error body)
    case.validate_response(response, excluded_checks=[
        schemathesis.checks.positive_data_acceptance,  # a well-formed call with an id that
        # exists nowhere is answered 404, by design
    ])


# -- hand-made bad bodies -----------------------------------------------------------------


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = await App(load(write_config(tmp_path))).start()
    for user in ("a", "b"):  # a WebView and a Webhook wait to protect
        await app.say(user, "hi")
        await app.say(user, "pay" if user == "a" else "hook")
    await app.flush()
    yield app
    await app.close()


def _db(app: App) -> Path:
    return Path(app.config.storage.path)


async def _raw(app: App, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    assert app.client is not None
    resp = await app.client.post(path, data=body, headers={"Content-Type": "application/json"})
    return resp.status, await resp.json()


@pytest.mark.parametrize("path", ["/webview/callback", "/webhook"])
async def test_oversized_bodies_are_413_and_change_nothing(app: App, path: str) -> None:
    before = snapshot(_db(app))
    limit = app.config.server.max_body_bytes
    big = b'{"executionId": "' + b"x" * limit + b'", "success": true}'
    assert (await _raw(app, path, big))[0] == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    assert app.client is not None
    resp = await app.client.post(path, data=chunks(),
                                 headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"] == "too_large"
    assert snapshot(_db(app)) == before


@pytest.mark.parametrize("path", ["/webview/callback", "/webhook"])
@pytest.mark.parametrize("depth", [33, 1000, 10_000])
async def test_deeply_nested_bodies_are_400_and_change_nothing(app: App, path: str,
                                                              depth: int) -> None:
    before = snapshot(_db(app))
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        inner = opener * depth + b"1" + closer * depth
        body = b'{"executionId": "x", "success": true, "conversation_key": "k", "data": ' \
            + inner + b"}"
        status, doc = await _raw(app, path, body)
        assert (status, doc["error"]) == (400, "too_deep"), (depth, doc)
    assert snapshot(_db(app)) == before


@pytest.mark.parametrize("body", [
    b"\xff\xfe not utf-8", b"", b"null", b"[]", b'"a string"', b"1e999999", b"NaN",
    b'{"executionId": null, "success": true}', b'{"executionId": "", "success": true}',
    b'{"executionId": "x", "success": "true"}', b'{"executionId": "x", "success": 1}',
    b'{"executionId": "x", "success": true, "data": []}',
    b'{"executionId": ["x"], "success": true}', b'{"executionId": "x"}',
    b'{"executionId": "\\u0000", "success": true}', b'{"success": true}',
])
async def test_malformed_callbacks_are_4xx_and_change_nothing(app: App, body: bytes) -> None:
    before = snapshot(_db(app))
    status, doc = await _raw(app, "/webview/callback", body)
    assert status in (400, 404), (status, doc)
    assert doc["message"]
    assert snapshot(_db(app)) == before


async def test_100000_random_execution_ids_are_all_404(app: App) -> None:
    before = snapshot(_db(app))
    ids = [secrets.token_urlsafe(18) for _ in range(RANDOM_IDS)]
    # the bulk through the runtime (the same job the endpoint runs), a thousand at a time
    for i in range(0, RANDOM_IDS - 300, 1000):
        results = await asyncio.gather(
            *(app.runtime.webview_callback(eid, True, {}) for eid in ids[i:i + 1000]),
            return_exceptions=True)
        assert all(isinstance(r, NotFound) for r in results), \
            [r for r in results if not isinstance(r, NotFound)][:3]
    # the last few hundred over HTTP
    answers = await asyncio.gather(*(
        app.post("/webview/callback", {"executionId": eid, "success": True})
        for eid in ids[-300:]))
    assert {(status, body["error"]) for status, body in answers} == {(404, "unknown_execution")}
    assert snapshot(_db(app)) == before


async def test_unknown_conversation_keys_are_404(app: App) -> None:
    before = snapshot(_db(app))
    answers = await asyncio.gather(*(
        app.post("/webhook", {"conversation_key": secrets.token_urlsafe(18), "x": i})
        for i in range(300)))
    assert {(status, body["error"]) for status, body in answers} == \
        {(404, "unknown_conversation")}
    assert snapshot(_db(app)) == before


# -- Content-Encoding (issue 12) ----------------------------------------------------------

ENCODED_PATHS = ["/webview/callback", "/webhook", "/webhook/some-key"]


@pytest.fixture(params=[False, True], ids=["flowbot-decodes", "aiohttp-decodes"])
async def coded_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    """The app as production runs it (bodies decoded by flowbot), and with aiohttp's own
    decoder on (as a bare TestServer or another runner would): the answers must agree."""
    app = App(load(write_config(tmp_path)), server_options={"auto_decompress": request.param})
    await app.start()
    yield app
    await app.close()


async def _coded(app: App, path: str, body: bytes, coding: str) -> tuple[int, dict[str, Any]]:
    assert app.client is not None
    # a connection each: aiohttp's own decoder drops a connection whose body it failed on
    resp = await app.client.post(path, data=body, headers={
        "Content-Type": "application/json", "Content-Encoding": coding, "Connection": "close"})
    assert resp.content_type == "application/json", (resp.status, await resp.text())
    return resp.status, await resp.json()


@pytest.mark.parametrize("path", ENCODED_PATHS)
async def test_undecodable_bodies_are_400_bad_encoding(coded_app: App, path: str) -> None:
    before = snapshot(_db(coded_app))
    gz = gzip.compress(b'{"conversation_key": "nobody", "executionId": "x", "success": true}')
    cases = [(b"garbage", "gzip"), (b"garbage", "deflate"), (b"\x78\x9c garbage", "deflate")]
    if not coded_app.server_options["auto_decompress"]:  # aiohttp's decoder lets these by
        cases += [(gz[:-9], "gzip"), (gz + b"trailing", "gzip")]
    for body, coding in cases:
        status, doc = await _coded(coded_app, path, body, coding)
        assert (status, doc["error"]) == (400, "bad_encoding"), (body, coding, doc)
        assert "gzip" in doc["message"] and "deflate" in doc["message"]
    assert snapshot(_db(coded_app)) == before


@pytest.mark.parametrize("path", ENCODED_PATHS)
async def test_unsupported_encodings_are_400_json(coded_app: App, path: str) -> None:
    before = snapshot(_db(coded_app))
    codings = ["compress", "gzip, gzip", "x-unknown"]
    if not coded_app.server_options["auto_decompress"]:
        codings += ["br", "zstd"]  # aiohttp's decoder answers these itself (docs/http-api.md)
    for coding in codings:
        status, doc = await _coded(coded_app, path, b"{}", coding)
        assert (status, doc["error"]) == (400, "bad_encoding"), (coding, doc)
        assert "Content-Encoding" in doc["message"]
    assert snapshot(_db(coded_app)) == before


@pytest.mark.parametrize("path", ENCODED_PATHS)
async def test_gzip_bombs_are_413(coded_app: App, path: str) -> None:
    before = snapshot(_db(coded_app))
    bomb = gzip.compress(b"0" * 50_000_000)  # 50 MB of zeros, about 48 KB sent
    assert len(bomb) < coded_app.config.server.max_body_bytes
    status, doc = await _coded(coded_app, path, bomb, "gzip")
    assert (status, doc["error"]) == (413, "too_large"), doc
    # just past the limit once decoded is refused too; just under it is read
    limit = coded_app.config.server.max_body_bytes
    status, doc = await _coded(coded_app, path, zlib.compress(b" " * (limit + 1)), "deflate")
    assert (status, doc["error"]) == (413, "too_large"), doc
    assert snapshot(_db(coded_app)) == before


async def test_encoded_bodies_are_read(coded_app: App) -> None:
    doc = {"conversation_key": "nobody-has-this", "note": "é 🙂"}
    raw = json.dumps(doc).encode()
    squeezed = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, as some clients send
    bodies = {"gzip": gzip.compress(raw), "x-gzip": gzip.compress(raw),
              "deflate": zlib.compress(raw), "identity": raw}
    for coding, body in [*bodies.items(),
                         ("deflate", squeezed.compress(raw) + squeezed.flush())]:
        status, answer = await _coded(coded_app, "/webhook", body, coding)
        # decoded and parsed: the key is looked up (and unknown), not a 400
        assert (status, answer["error"]) == (404, "unknown_conversation"), (coding, answer)
