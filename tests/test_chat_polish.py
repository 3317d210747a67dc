"""The chat page's details, in Debian's Chromium at desktop width and at 390 px (a phone):
commands in monospace with a Copy button, rows answered by typing, WebView links that go
inactive when their wait ends, messages typed while offline, and the demo payment page's
buttons after a final answer. Screenshots land in tests/screenshots/."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from tests.test_browser import (
    MENU,
    PAY_TEXT,
    SHOTS,
    bot_bubbles,
    browser,  # noqa: F401 - the fixture
    pytestmark,  # noqa: F401 - skipped without Chromium
    say,
    serve_example,
)

SIZES = {"desktop": {"width": 900, "height": 760}, "phone": {"width": 390, "height": 844}}


@pytest.fixture(params=sorted(SIZES))
def size(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def chat(browser: Browser, url: str, size: str) -> AsyncIterator[Page]:  # noqa: F811
    context = await browser.new_context(viewport=SIZES[size])  # type: ignore[arg-type]
    await context.grant_permissions(["clipboard-read", "clipboard-write"],
                                    origin=url.split("/", 3)[0] + "//" + url.split("/", 3)[2])
    context.set_default_timeout(10_000)
    errors: list[str] = []
    context.on("page", lambda p: p.on("pageerror", lambda exc: errors.append(str(exc))))
    page = await context.new_page()
    await page.goto(url)
    await expect(page.locator("#status")).to_have_text("online")
    try:
        yield page
    finally:
        await context.close()
    assert errors == []


async def to_menu(page: Page, name: str) -> None:
    await say(page, "hi")
    await say(page, name)
    await expect(bot_bubbles(page).last).to_have_text(MENU.format(name))


async def test_a_command_is_monospace_unwrapped_and_copyable(browser: Browser,  # noqa: F811
                                                             tmp_path: Path, size: str) -> None:
    async with serve_example(tmp_path) as served, chat(browser, served.url, size) as page:
        await to_menu(page, "Ada")
        await page.get_by_role("button", name="Wait for a webhook", exact=True).click()
        code = page.locator(".msg.bot .code pre").last
        await expect(code).to_contain_text("curl -X POST http://127.0.0.1:")
        style = await code.evaluate(
            "e => [getComputedStyle(e).fontFamily, getComputedStyle(e).whiteSpace,"
            " getComputedStyle(e).overflowX]")
        assert "mono" in style[0].lower()
        assert style[1:] == ["pre", "auto"]
        # the command stays one line: it scrolls inside its box instead of wrapping
        lines = (await code.inner_text()).splitlines()
        assert len(lines) == 1 and lines[0].startswith("curl -X POST")
        if size == "phone":
            assert await code.evaluate("e => e.scrollWidth > e.clientWidth")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= SIZES[size]["width"]
        # the sentence before it stays ordinary text
        plain = page.locator(".msg.bot .bubble.has-code .plain").last
        await expect(plain).to_contain_text("I'm now waiting up to 5 minutes for a webhook")
        assert "mono" not in (await plain.evaluate("e => getComputedStyle(e).fontFamily")).lower()

        copy = page.locator(".msg.bot .code .copy").last
        await copy.click()
        await expect(copy).to_have_text("Copied")
        copied = await page.evaluate("navigator.clipboard.readText()")
        assert copied == lines[0]
        assert re.fullmatch(r"curl -X POST http://127\.0\.0\.1:\d+/webhook/\S+ -d '.*'", copied)
        await page.screenshot(path=SHOTS / f"polish-code-{size}.png", animations="disabled")


async def test_a_button_row_answered_by_typing_goes_inactive(browser: Browser,  # noqa: F811
                                                             tmp_path: Path, size: str) -> None:
    async with serve_example(tmp_path) as served, chat(browser, served.url, size) as page:
        await to_menu(page, "Bo")
        await say(page, "1")  # the number of "Pay with a web page"
        await expect(bot_bubbles(page).last).to_have_text(PAY_TEXT)
        menu = page.locator(".msg.bot").filter(has_text=MENU.format("Bo")).locator(".choices")
        await expect(menu).to_have_class(re.compile(r"\bused\b"))
        for label in ("Pay with a web page", "Wait for a webhook"):
            await expect(page.get_by_role("button", name=label, exact=True)).to_be_disabled()
        await expect(menu.locator(".chosen")).to_have_count(0)
        await page.screenshot(path=SHOTS / f"polish-typed-{size}.png", animations="disabled")
        await page.reload()  # still inactive after a reload
        await expect(page.locator("#status")).to_have_text("online")
        await expect(page.get_by_role("button", name="Wait for a webhook",
                                      exact=True)).to_be_disabled()


async def test_a_webview_link_goes_inactive_when_its_wait_ends(browser: Browser,  # noqa: F811
                                                               tmp_path: Path, size: str) -> None:
    async with serve_example(tmp_path) as served, chat(browser, served.url, size) as page:
        await to_menu(page, "Cy")
        await page.get_by_role("button", name="Pay with a web page", exact=True).click()
        link = page.get_by_role("link", name="Pay 9.99 EUR")
        async with page.context.expect_page() as opened:
            await link.click()
        webview = await opened.value
        await webview.wait_for_load_state()
        await webview.get_by_role("button", name="Fail", exact=True).click()
        await expect(webview.get_by_role("status")).to_contain_text("Payment failure reported")
        # the demo page keeps both buttons disabled after a final answer
        await expect(webview.get_by_role("button", name="Pay", exact=True)).to_be_disabled()
        await expect(webview.get_by_role("button", name="Fail", exact=True)).to_be_disabled()
        await webview.screenshot(path=SHOTS / f"polish-webview-final-{size}.png",
                                 animations="disabled")

        closed = page.locator("a.open.closed")
        await expect(closed).to_have_text("Pay 9.99 EUR · failed")
        assert await closed.get_attribute("href") is None
        await expect(page.get_by_role("link", name="Pay 9.99 EUR")).to_have_count(0)
        await page.bring_to_front()
        await page.screenshot(path=SHOTS / f"polish-link-closed-{size}.png",
                              animations="disabled")
        await page.reload()
        await expect(page.locator("#status")).to_have_text("online")
        await expect(page.locator("a.open.closed")).to_have_text("Pay 9.99 EUR · failed")


async def test_the_demo_page_answered_elsewhere_stays_disabled(browser: Browser,  # noqa: F811
                                                               tmp_path: Path, size: str) -> None:
    """A second tab of the same payment page gets 409 and does not offer to try again."""
    async with serve_example(tmp_path) as served, chat(browser, served.url, size) as page:
        await to_menu(page, "Di")
        await page.get_by_role("button", name="Pay with a web page", exact=True).click()
        href = await page.get_by_role("link", name="Pay 9.99 EUR").get_attribute("href")
        assert href is not None
        first = await page.context.new_page()
        second = await page.context.new_page()
        for tab in (first, second):
            await tab.goto(href)
        await first.get_by_role("button", name="Pay", exact=True).click()
        await expect(first.get_by_role("status")).to_contain_text("Payment done")
        await second.get_by_role("button", name="Pay", exact=True).click()
        await expect(second.get_by_role("status")).to_contain_text("Already done.")
        await expect(second.get_by_role("status")).to_contain_text("(HTTP 409)")
        for tab in (first, second):
            await expect(tab.get_by_role("button", name="Pay", exact=True)).to_be_disabled()
            await expect(tab.get_by_role("button", name="Fail", exact=True)).to_be_disabled()
        await expect(page.locator("a.open.closed")).to_have_text("Pay 9.99 EUR · done")


async def test_a_message_typed_offline_says_not_sent_then_goes(browser: Browser,  # noqa: F811
                                                               tmp_path: Path, size: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with serve_example(tmp_path, sock=sock) as served:
        url = served.url
        context_page = chat(browser, url, size)
        page = await context_page.__aenter__()
    sock.close()
    try:
        # the server is gone (a restart, a laptop that slept): the page says so
        await expect(page.locator("#status")).to_contain_text("offline")
        await say(page, "hi")
        mine = page.locator(".msg.me").last
        await expect(mine).to_have_class(re.compile(r"\bunsent\b"))
        await expect(mine.locator(".note")).to_have_text("not sent — will retry")
        await page.screenshot(path=SHOTS / f"polish-unsent-{size}.png", animations="disabled")

        again = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        async with serve_example(tmp_path, sock=again):
            await page.evaluate("dispatchEvent(new Event('online'))")  # retry now
            await expect(page.locator("#status")).to_have_text("online", timeout=20_000)
            await expect(mine.locator(".note")).to_have_count(0)
            await expect(mine).not_to_have_class(re.compile(r"\bunsent\b"))
            await expect(bot_bubbles(page).first).to_contain_text("Hi! I'm the flowbot demo.")
            await expect(page.locator(".msg.me .bubble")).to_have_text(["hi"])  # sent once
    finally:
        await context_page.__aexit__(None, None, None)
