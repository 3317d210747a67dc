"""The demo as a person uses it: Debian's Chromium, through Playwright, against the real app
from config.example.toml (real timer and outbox loops) on 127.0.0.1.

Screenshots of the key moments land in tests/screenshots/ for a person to look at."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright, expect

from bot.config import load_config
from bot.flow import WebViewBlock
from bot.server import OUTBOX, build_app, enabled_channels
from channels.web import demo_webview_page, static_file
from tests.prereq import requires

CHROMIUM = os.environ.get("FLOWBOT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SHOTS = Path(__file__).resolve().parent / "screenshots"
README_SHOT = Path(__file__).resolve().parent.parent / "docs" / "chat.png"

pytestmark = [
    pytest.mark.browser,
    requires(Path(CHROMIUM).exists(), f"the browser {CHROMIUM}", "apt-get install chromium; .ci/run does"),
]

HELLO = "Hi! I'm the flowbot demo. I can wait for a web page and for a webhook without losing my place."
MENU = "Nice to meet you, {}. What would you like to try?"
PAY_TEXT = "Press the button to open the payment page. You have 2 minutes."


def _bound_socket() -> socket.socket:
    """A listening-ready socket on a free port: the port is known before the app is built
    (public_url must name it) and nobody can take it in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Served:
    url: str  # the chat page, e.g. http://127.0.0.1:40123/
    app: web.Application
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of requests
    # cleared: a page's WebSocket handshake waits (the page stays offline, without errors)
    sockets_open: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.sockets_open.set()


@asynccontextmanager
async def run_app(app: web.Application, sock: socket.socket) -> AsyncIterator[None]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve_example(tmp_path: Path, webview_url: str | None = None,
                        sock: socket.socket | None = None, prefix: str = "",
                        public_url: str | None = None,
                        hello: dict[str, str] | None = None) -> AsyncIterator[Served]:
    """config.example.toml as shipped, on a free port, its database in tmp_path.
    `public_url`: what links say (the chat page itself talks to its own address);
    `hello`: fields changed on the first block (e.g. a document it sends)."""
    sock = sock or _bound_socket()
    port = sock.getsockname()[1]
    config = load_config(EXAMPLE)
    config = replace(
        config,
        server=replace(config.server, port=port,
                       public_url=public_url or f"http://127.0.0.1:{port}", path_prefix=prefix),
        storage=replace(config.storage, path=tmp_path / "browser.db"))
    if webview_url is not None:
        main = config.flows["main"]
        pay = main.blocks["pay"]
        assert isinstance(pay, WebViewBlock)
        blocks = {**main.blocks, "pay": replace(pay, url=webview_url)}
        config = replace(config, flows={**config.flows, "main": replace(main, blocks=blocks)})
    if hello is not None:
        main = config.flows["main"]
        blocks = {**main.blocks, "hello": replace(main.blocks["hello"], **hello)}
        config = replace(config, flows={**config.flows, "main": replace(main, blocks=blocks)})
    app = build_app(config, channel_factories=enabled_channels(config))
    served = Served(f"http://127.0.0.1:{port}{prefix}/", app)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        served.seen.append((request.method, request.path))
        if request.path.endswith("/ws"):
            await served.sockets_open.wait()
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(record)
    async with run_app(app, sock):
        yield served


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    SHOTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        await chromium.close()


@asynccontextmanager
async def chat_tab(browser: Browser, url: str) -> AsyncIterator[Page]:
    """A fresh browser profile with the chat open; fails the test on any page error (a CSP
    violation, a script error)."""
    context = await browser.new_context(viewport={"width": 900, "height": 760})
    context.set_default_timeout(10_000)
    errors: list[str] = []

    def watch(page: Page) -> None:
        page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
        page.on("console", lambda msg: errors.append(f"{page.url}: {msg.text}")
                if msg.type == "error" and "status of 409" not in msg.text else None)

    context.on("page", watch)
    page = await context.new_page()
    await page.goto(url)
    await expect(page.locator("#status")).to_have_text("online")
    try:
        yield page
    finally:
        await context.close()
    assert errors == []


def bot_bubbles(page: Page) -> Any:
    return page.locator(".msg.bot .bubble")


async def say(page: Page, text: str) -> None:
    box = page.get_by_placeholder("Type a message…")
    await box.fill(text)
    await box.press("Enter")


async def write_while_waiting(page: Page, name: str) -> None:
    """Chat to the WebView wait and write meanwhile: the pending message comes back."""
    await say(page, "hi")
    await say(page, name)
    await expect(bot_bubbles(page).last).to_have_text(MENU.format(name))
    await page.get_by_role("button", name="Pay with a web page", exact=True).click()
    await expect(bot_bubbles(page).last).to_have_text(PAY_TEXT)
    await say(page, "are you there?")
    await expect(bot_bubbles(page).last).to_contain_text("I'm waiting for the payment page")


async def open_payment_page(page: Page, name: str, shot: str) -> Page:
    """Chat from "hi" to the WebView button, press it; returns the payment page's tab."""
    await expect(page.get_by_text("Say hi to start")).to_be_visible()
    await page.screenshot(path=SHOTS / f"{shot}-0-empty.png", animations="disabled")
    await say(page, "hi")
    await expect(bot_bubbles(page)).to_have_text([HELLO, "What's your name?"])
    await say(page, name)
    await expect(bot_bubbles(page).last).to_have_text(MENU.format(name))
    await page.get_by_role("button", name="Pay with a web page", exact=True).click()
    await expect(bot_bubbles(page).last).to_have_text(PAY_TEXT)
    # the used choice stays visible but greyed; the other one too
    await expect(page.get_by_role("button", name="Wait for a webhook")).to_be_disabled()
    await expect(page.locator(".msg.me .bubble")).to_have_text(["hi", name, "Pay with a web page"])
    await page.screenshot(path=SHOTS / f"{shot}-1-chat.png", animations="disabled")

    link = page.get_by_role("link", name="Pay 9.99 EUR")
    assert await link.get_attribute("target") == "_blank"
    assert "noopener" in (await link.get_attribute("rel") or "")
    async with page.context.expect_page() as opened:
        await link.click()
    webview = await opened.value
    await webview.wait_for_load_state()
    await expect(webview.get_by_role("heading")).to_have_text("Pay 9.99 EUR")
    await expect(webview.get_by_label("Name on card")).to_have_value(name)
    await expect(webview.locator("#params")).to_contain_text("executionId")
    await webview.screenshot(path=SHOTS / f"{shot}-2-webview.png", animations="disabled")
    return webview


@pytest.mark.parametrize(("url", "label"), [
    ("https://cdn.example/Terms%20of%20sale.pdf", "Terms of sale.pdf"),
    ("https://cdn.example/report%ZZ.pdf?x=1", "report%ZZ.pdf"),  # not a valid %-escape
    ("https://cdn.example/", "https://cdn.example/"),
])
async def test_a_document_is_a_link_whatever_its_url_holds(
        browser: Browser, tmp_path: Path, url: str, label: str) -> None:
    """The link's label is the file name, %-decoded where that is valid; a URL a flow sends
    (check lets a literal % through) must not stop the page from showing the message."""
    async with serve_example(tmp_path, hello={"document": url}) as served, \
            chat_tab(browser, served.url) as page:
        await say(page, "hi")
        await expect(bot_bubbles(page)).to_have_text([HELLO, "What's your name?"])
        link = page.locator(".msg.bot a.media")
        await expect(link).to_have_text(label)
        assert await link.get_attribute("href") == url


async def test_pay_on_the_demo_page_then_the_chat_goes_on(browser: Browser,
                                                          tmp_path: Path) -> None:
    async with serve_example(tmp_path) as served, chat_tab(browser, served.url) as page:
        webview = await open_payment_page(page, "Ada", "pay")
        await webview.get_by_role("button", name="Pay", exact=True).click()
        result = webview.get_by_role("status")
        await expect(result).to_contain_text("Payment done (reference PAY-")
        reference = re.search(r"PAY-\d{6}", await result.inner_text())
        assert reference is not None

        await expect(bot_bubbles(page).nth(-2)).to_have_text(
            f"Payment received, thank you Ada! Reference: {reference.group()}")
        await expect(bot_bubbles(page).last).to_have_text("Anything else?")
        await page.bring_to_front()
        await page.screenshot(path=SHOTS / "pay-3-chat-paid.png", animations="disabled")

        # a final answer: the page offers no second try (a second tab of it gets 409,
        # see test_chat_polish), and the chat's link says the page is done
        await expect(webview.get_by_role("button", name="Pay", exact=True)).to_be_disabled()
        await expect(webview.get_by_role("button", name="Fail", exact=True)).to_be_disabled()
        await expect(page.locator("a.open.closed")).to_have_text("Pay 9.99 EUR · done")
        await expect(bot_bubbles(page)).to_have_count(6)


async def test_fail_on_the_demo_page_takes_the_error_branch(browser: Browser,
                                                            tmp_path: Path) -> None:
    # under a path prefix, opened without its trailing slash: every URL the pages use is relative
    async with serve_example(tmp_path, prefix="/bot") as served, \
            chat_tab(browser, served.url.rstrip("/")) as page:
        assert page.url == served.url
        webview = await open_payment_page(page, "Bob", "fail")
        assert webview.url.startswith(served.url + "demo/webview?executionId=")
        await webview.get_by_role("button", name="Fail", exact=True).click()
        await expect(webview.get_by_role("status")).to_contain_text("Payment failure reported")
        await expect(bot_bubbles(page).nth(-2)).to_have_text(
            "The payment failed (card declined). No money was taken.")
        await expect(bot_bubbles(page).last).to_have_text("Anything else?")
        await page.screenshot(path=SHOTS / "fail-3-chat.png", animations="disabled")
        assert ("POST", "/bot/webview/callback") in served.seen


async def test_webview_page_on_another_origin_passes_the_cors_preflight(
        browser: Browser, tmp_path: Path) -> None:
    bot_sock = _bound_socket()
    bot_port = bot_sock.getsockname()[1]
    demo_sock = _bound_socket()
    demo_port = demo_sock.getsockname()[1]
    demo = web.Application()  # another origin: only the demo page and its files
    demo.router.add_get("/demo/webview", demo_webview_page)
    demo.router.add_get("/static/{name}", static_file)
    url = (f"http://127.0.0.1:{demo_port}/demo/webview"
           f"?callback=http://127.0.0.1:{bot_port}/webview/callback")

    async with run_app(demo, demo_sock), serve_example(tmp_path, url, bot_sock) as served, \
            chat_tab(browser, served.url) as page:
        webview = await open_payment_page(page, "Cy", "cors")
        assert webview.url.startswith(f"http://127.0.0.1:{demo_port}/demo/webview?")
        await webview.get_by_role("button", name="Pay", exact=True).click()
        await expect(webview.get_by_role("status")).to_contain_text("Payment done")
        await expect(bot_bubbles(page).nth(-2)).to_contain_text("Payment received, thank you Cy!")
        await webview.screenshot(path=SHOTS / "cors-3-webview-paid.png", animations="disabled")
        calls = [m for m, path in served.seen if path == "/webview/callback"]
        assert calls == ["OPTIONS", "POST"]  # Chromium asked first, then posted


async def test_reload_keeps_the_conversation_and_reconnects(browser: Browser,
                                                           tmp_path: Path) -> None:
    async with serve_example(tmp_path) as served, chat_tab(browser, served.url) as page:
        await write_while_waiting(page, "<b>Dee</b>")  # text, never markup
        log = page.locator("#log > li")
        before = await log.all_text_contents()
        assert len(before) == 9

        await page.reload()
        await expect(page.locator("#status")).to_have_text("online")
        await expect(log).to_have_text(before)  # bot and user bubbles, in order
        await expect(page.get_by_role("button", name="Wait for a webhook")).to_be_disabled()
        await expect(page.get_by_text("Say hi to start")).to_be_hidden()
        await page.screenshot(path=SHOTS / "reload-1-after-reload.png", animations="disabled")

        # the server drops the socket; the payment completes while the page is away
        href = await page.get_by_role("link", name="Pay 9.99 EUR").get_attribute("href")
        assert href is not None
        execution_id = re.search(r"executionId=([^&]+)", href)
        assert execution_id is not None
        await served.app[OUTBOX].channels["web"].close_connections()  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as http:
            resp = await http.post(served.url + "webview/callback", json={
                "executionId": execution_id.group(1), "success": True,
                "data": {"reference": "PAY-424242"}})
            assert resp.status == 200
        await expect(bot_bubbles(page).nth(-2)).to_have_text(
            "Payment received, thank you <b>Dee</b>! Reference: PAY-424242")
        assert await page.locator("#log b").count() == 0
        await expect(page.locator("#status")).to_have_text("online")
        await expect(log).to_have_count(11)  # each message once

        # another tab is another conversation
        other = await page.context.new_page()
        await other.goto(served.url)
        await expect(other.locator("#status")).to_have_text("online")
        await expect(other.get_by_text("Say hi to start")).to_be_visible()
        await expect(other.locator("#log > li")).to_have_count(0)


async def test_a_link_whose_wait_ended_while_the_page_was_offline_closes_on_reconnect(
        browser: Browser, tmp_path: Path) -> None:
    """The page was offline when its payment completed (its live `wait_ended` went to no
    one): on reconnect it asks, and the link goes inactive instead of staying live until
    pressed (then showing the WebView's 410)."""
    async with serve_example(tmp_path) as served, chat_tab(browser, served.url) as page:
        await write_while_waiting(page, "Eve")
        link = page.get_by_role("link", name="Pay 9.99 EUR")
        href = await link.get_attribute("href")
        execution_id = re.search(r"executionId=([^&]+)", href or "")
        assert execution_id is not None
        served.sockets_open.clear()  # its reconnection hangs until the test lets it through
        await served.app[OUTBOX].channels["web"].close_connections()  # type: ignore[attr-defined]
        await expect(page.locator("#status")).not_to_have_text("online")
        async with aiohttp.ClientSession() as http:
            resp = await http.post(served.url + "webview/callback", json={
                "executionId": execution_id.group(1), "success": True,
                "data": {"reference": "PAY-515151"}})
            assert resp.status == 200
        await expect(page.locator("a.open.closed")).to_have_count(0)  # it heard nothing
        served.sockets_open.set()
        await expect(page.locator("#status")).to_have_text("online", timeout=20_000)
        await expect(bot_bubbles(page).nth(-2)).to_have_text(
            "Payment received, thank you Eve! Reference: PAY-515151")
        await expect(page.locator("a.open.closed")).to_have_text("Pay 9.99 EUR · done")
        assert await page.locator("a.open.closed").get_attribute("href") is None
        await page.screenshot(path=SHOTS / "reconnect-1-link-closed.png", animations="disabled")
        await page.reload()  # and it stays closed
        await expect(page.locator("#status")).to_have_text("online")
        await expect(page.locator("a.open.closed")).to_have_text("Pay 9.99 EUR · done")


async def test_a_reload_shows_the_newest_messages_of_a_long_conversation(
        browser: Browser, tmp_path: Path) -> None:
    async with serve_example(tmp_path) as served, chat_tab(browser, served.url) as page:
        await write_while_waiting(page, "Dee")
        log = page.locator("#log > li")
        before = await log.all_text_contents()
        is_bot = await log.evaluate_all("items => items.map(li => li.classList.contains('bot'))")

        served.app[OUTBOX].channels["web"].reload_messages = 2  # type: ignore[attr-defined]
        await page.reload()
        await expect(page.locator("#status")).to_have_text("online")
        # the newest two bot messages, and the user's bubbles since the one before them
        since = [i for i, bot in enumerate(is_bot) if bot][-3] + 1
        await expect(log).to_have_text(["Earlier messages are not shown.", *before[since:]])
        await expect(page.get_by_role("link", name="Pay 9.99 EUR")).to_be_visible()
        await page.screenshot(path=SHOTS / "reload-3-newest-only.png", animations="disabled")


async def test_a_refused_message_is_shown_struck_through_and_never_sent_again(
        browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the server refuses one message (as it refuses a lone surrogate or a NaN); it used to
    # close the socket and the page sent the frame again on every reconnect, forever
    from channels.web import WebChannel

    check = WebChannel._check
    frames: list[str] = []

    def refuse_forbidden(doc: dict[str, Any], kind: object) -> str | None:
        frames.append(str(doc.get("text")))
        return "That word is refused." if doc.get("text") == "forbidden" else check(doc, kind)

    monkeypatch.setattr(WebChannel, "_check", staticmethod(refuse_forbidden))
    async with serve_example(tmp_path) as served, chat_tab(browser, served.url) as page:
        await say(page, "hi")
        await expect(bot_bubbles(page)).to_have_text([HELLO, "What's your name?"])
        await say(page, "forbidden")
        await expect(page.get_by_text("That word is refused.")).to_be_visible()
        await expect(page.locator(".msg.me.refused .bubble")).to_have_text(["forbidden"])
        for _ in range(3):  # reconnects: the refused frame stays unsent
            await served.app[OUTBOX].channels["web"].close_connections()  # type: ignore[attr-defined]
            await expect(page.locator("#status")).not_to_have_text("online")
            await expect(page.locator("#status")).to_have_text("online", timeout=15_000)
        await say(page, "Dee")
        await expect(bot_bubbles(page).last).to_have_text(MENU.format("Dee"))
        assert frames.count("forbidden") == 1, frames
        await page.reload()  # and not after a reload either
        await expect(page.locator("#status")).to_have_text("online")
        await expect(page.locator(".msg.me.refused .bubble")).to_have_text(["forbidden"])
        assert frames.count("forbidden") == 1, frames


async def test_the_readme_screenshot_shows_the_demo_as_it_is(browser: Browser,
                                                              tmp_path: Path) -> None:
    """docs/chat.png, the README's picture of the web chat: the demo waiting for a webhook,
    with the command it prints for this conversation, at the address `flowbot serve`
    prints. Taken into tests/screenshots/readme-chat.png on every run;
    FLOWBOT_UPDATE_README_SHOT=1 also writes it to docs/chat.png."""
    async with serve_example(tmp_path, public_url="http://127.0.0.1:8080") as served, \
            chat_tab(browser, served.url) as page:
        await say(page, "hi")
        await say(page, "Ada")
        await expect(bot_bubbles(page).last).to_have_text(MENU.format("Ada"))
        await page.get_by_role("button", name="Wait for a webhook", exact=True).click()
        await expect(page.locator(".msg.bot .code pre").last).to_have_text(re.compile(
            r"curl -X POST http://127\.0\.0\.1:8080/webhook/[A-Za-z0-9_-]{24} "
            r"-d '\{\"order\": \{\"id\": \"A-1001\", \"status\": \"shipped\"\}\}'"))
        shot = SHOTS / "readme-chat.png"
        await page.screenshot(path=shot, animations="disabled")
    if os.environ.get("FLOWBOT_UPDATE_README_SHOT") == "1":
        shutil.copyfile(shot, README_SHOT)
