"""The http block is safe to template: what a user types can't change where the request goes
or what it carries, and a request that can't be sent takes on_failure at once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from aiohttp import web

from bot.errors import ConfigError
from bot.state import Wait
from bot.template import render_request_url
from tests.support import Harness, eventually, harness, write_config


@dataclass
class ThirdParty:
    """A third-party API on 127.0.0.1 that records every request it gets."""

    url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [raw_path for _, raw_path, _ in self.requests]


@pytest.fixture
async def third_party() -> AsyncIterator[ThirdParty]:
    async def record(request: web.Request) -> web.Response:
        site.requests.append((request.method, request.raw_path, dict(request.headers)))
        return web.json_response({"ok": True, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = runner.addresses[0][1]
    site = ThirdParty(f"http://127.0.0.1:{port}")
    yield site
    await runner.cleanup()


def flows(base: str) -> str:
    return f"""
        [flows.main]
        start = "ask"
        [flows.main.blocks.ask]
        type = "input"
        text = "Order id?"
        variable = "oid"
        next = "note"
        [flows.main.blocks.note]
        type = "input"
        text = "Note?"
        variable = "note"
        next = "call"
        [flows.main.blocks.call]
        type = "http"
        method = "POST"
        url = "{base}/api/orders/{{{{oid}}}}/cancel?note={{{{note}}}}"
        headers = {{ X-Note = "{{{{note}}}}", Authorization = "Bearer t0ken" }}
        timeout = 5
        status_variable = "code"
        on_success = "ok"
        on_failure = "bad"
        [flows.main.blocks.ok]
        type = "end"
        text = "cancelled ({{{{code}}}})"
        [flows.main.blocks.bad]
        type = "end"
        text = "could not cancel ({{{{code}}}})"
    """


async def order(h: Harness, oid: str, note: str) -> list[str]:
    """The user names an order and a note; returns what they are told once the call is done."""
    assert await h.texts("hi") == ["Order id?"]
    assert await h.texts(oid) == ["Note?"]
    said = await h.texts(note)
    await eventually(lambda: not h.runtime._tasks)
    await h.flush()
    return said + [m.text for m in h.new_messages("u1")]


@pytest.mark.parametrize(("oid", "path"), [
    ("..", "/api/orders/%2E%2E/cancel"),  # the issue: was POST /api/cancel… (and `/` with more)
    (".", "/api/orders/%2E/cancel"),
    ("../../admin", "/api/orders/..%2F..%2Fadmin/cancel"),
    ("%2e%2e", "/api/orders/%252e%252e/cancel"),
    ("7?x=1#f", "/api/orders/7%3Fx%3D1%23f/cancel"),
    ("A-1001", "/api/orders/A-1001/cancel"),
])
async def test_values_cannot_change_the_request_path(
        tmp_path: Path, third_party: ThirdParty, oid: str, path: str) -> None:
    async with harness(write_config(tmp_path, flows(third_party.url))) as h:
        assert await order(h, oid, "x&admin=1") == ["cancelled (200)"]
    assert third_party.paths() == [f"{path}?note=x%26admin%3D1"]
    method, _, headers = third_party.requests[0]
    assert method == "POST" and headers["X-Note"] == "x&admin=1"


async def test_the_issue_case_goes_to_the_order_not_to_root(
        tmp_path: Path, third_party: ThirdParty) -> None:
    """`url = ".../orders/{{oid}}"` with oid `..` went to `POST /`."""
    text = flows(third_party.url).replace("/api/orders/{{oid}}/cancel?note={{note}}",
                                          "/orders/{{oid}}")
    async with harness(write_config(tmp_path, text)) as h:
        assert await order(h, "..", "n") == ["cancelled (200)"]
    assert third_party.paths() == ["/orders/%2E%2E"]


async def test_header_with_a_line_break_takes_on_failure_at_once(
        tmp_path: Path, third_party: ThirdParty, caplog: pytest.LogCaptureFixture) -> None:
    """Was: an uncaught ValueError ("Task exception was never retrieved") and the user
    waiting for the backstop. Now: on_failure in the same step, nothing sent, a log line."""
    async with harness(write_config(tmp_path, flows(third_party.url))) as h:
        with caplog.at_level(logging.WARNING):
            assert await h.texts("hi") == ["Order id?"]
            assert await h.texts("7") == ["Note?"]
            said = await h.texts("late\r\nX-Admin: yes")
        assert said == ["could not cancel (0)"]  # no time passed: not the backstop
        assert not h.runtime._tasks
        assert await h.texts("hi") == ["Order id?"]  # the conversation goes on
    assert third_party.requests == []
    assert ("http block main/call: header 'X-Note' can't be sent: a variable put a line break "
            "or control character in it; took on_failure") in caplog.text
    assert "X-Admin" not in caplog.text  # the value itself is not logged


async def test_a_request_that_fails_to_send_takes_on_failure_without_the_backstop(
        tmp_path: Path, third_party: ThirdParty, caplog: pytest.LogCaptureFixture) -> None:
    """Any error while sending (here: a header value aiohttp refuses, as a wait written by
    an older version could hold) resolves the wait as failure, logged with its reason."""
    async with harness(write_config(tmp_path, flows(third_party.url))) as h:
        engine_step = h.runtime._http_request

        async def tampered(wait: Wait) -> None:
            request = {**(wait.request or {}), "headers": {"X-Note": "a\nb"}}
            await engine_step(replace(wait, request=request))

        h.runtime._http_request = tampered  # type: ignore[method-assign,assignment]
        with caplog.at_level(logging.WARNING):
            assert await order(h, "7", "fine") == ["could not cancel (0)"]
    assert third_party.requests == []
    assert "http block main/call: POST" in caplog.text and "could not be sent (ValueError" in (
        caplog.text)


@pytest.mark.parametrize(("url", "error"), [
    ("{{base}}/x", "takes its scheme or host from a template"),
    ("https://{{host}}/x", "takes its scheme or host from a template"),
    ("https://api.example:{{port}}/x", "takes its scheme or host from a template"),
    ("{{scheme}}://api.example/x", "takes its scheme or host from a template"),
    ("ftp://api.example/x", "must start with http:// or https://"),
    ("https:///x", "needs a host"),
])
def test_check_refuses_a_templated_scheme_or_host(tmp_path: Path, url: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, f"""
            [flows.main]
            start = "call"
            [flows.main.blocks.call]
            type = "http"
            url = "{url}"
        """)
    assert [e for e in info.value.errors if e.startswith(
        f"flows.main.blocks.call.url: {error}")], info.value.errors


@pytest.mark.parametrize(("headers", "error"), [
    ('{ "X Bad" = "1" }', 'flows.main.blocks.call.headers.X Bad: is not a header name'),
    ('{ X-Note = "a\\r\\nb" }', "flows.main.blocks.call.headers.X-Note: holds a line break"),
])
def test_check_refuses_headers_that_cannot_be_sent(tmp_path: Path, headers: str,
                                                   error: str) -> None:
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, f"""
            [flows.main]
            start = "call"
            [flows.main.blocks.call]
            type = "http"
            url = "https://api.example/x"
            headers = {headers}
        """)
    assert [e for e in info.value.errors if e.startswith(error)], info.value.errors


def test_literal_parts_are_kept_and_only_values_are_encoded() -> None:
    variables = {"u": "Ann Lee/2", "n": 5, "e": ""}
    assert render_request_url("https://bücher.example/städte/%7Eme/{{u}}?a=b c&n={{n}}#{{u}}",
                              variables) == (
        "https://xn--bcher-kva.example/st%C3%A4dte/%7Eme/Ann%20Lee%2F2?a=b%20c&n=5#Ann%20Lee%2F2")
    assert render_request_url("https://api.example/a/{{e}}.{{e}}/./{{e}}", variables) == (
        "https://api.example/a/%2E/./")  # a dot-segment a value made is escaped, not the admin's
    with pytest.raises(ValueError, match="scheme or host"):
        render_request_url("{{u}}/x", variables)
