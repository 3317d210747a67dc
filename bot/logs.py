"""The operator's log: one line per thing that happened to a conversation, text or JSON.

Lines about a conversation carry `conv=<id>` (the database row id, short and not secret)
and its channel; never a token, a secret, a conversation_key or a whole executionId
(`short()` keeps its first 6 characters, enough to match a page's report to a line). The
hot path pays one `isEnabledFor` test per line when INFO is off, and one formatted write
when it is on. Repeated warnings and errors are rate-limited per message template.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

EVENTS = "flowbot.events"  # the per-conversation lines
events = logging.getLogger(EVENTS)

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


def short(token: str | None) -> str:
    """The first 6 characters of an executionId or other token, for matching, not use."""
    return f"{token[:6]}…" if token else "-"


def event(what: str, conv: int, channel: str, text: str, *args: Any) -> None:
    """One conversation line: `conv=42 web <what>: <text % args>`."""
    if events.isEnabledFor(logging.INFO):
        events.info(f"conv=%s %s {what}: {text}", conv or "-", channel, *args,
                    extra={"conv": conv, "channel": channel, "event": what})


class RateLimit(logging.Filter):
    """Lets a warning or error with the same template through `burst` times per `period`
    seconds, then drops it and says how many were dropped when the period ends."""

    def __init__(self, burst: int = 5, period: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._seen: dict[tuple[str, Any], list[float]] = {}  # key → [window start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.period:
            dropped = 0 if entry is None else int(entry[1]) - self.burst
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = [now, 1]
            if dropped > 0:
                record.msg = f"{record.msg} (and {dropped} more like it in the last " \
                             f"{self.period:.0f} s, not shown)"
            return True
        entry[1] += 1
        return entry[1] <= self.burst


class Redact(logging.Filter):
    """Replaces the values of the secrets this server holds in warnings and errors (library
    errors can quote a request URL, and a Telegram URL holds the bot token)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets or record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in self.secrets:
            text = text.replace(secret, "[secret]")
            if record.exc_text:
                record.exc_text = record.exc_text.replace(secret, "[secret]")
        record.msg, record.args = text, None
        return True


class TextFormatter(logging.Formatter):
    """`2026-11-29 15:46:59,515 INFO flowbot.events: conv=1 web …`; the date is formatted
    once a second, not once a line (strftime was a third of a line's cost)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = (f"{self._stamp},{int(record.msecs):03d} {record.levelname} {record.name}: "
                f"{record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and conv/channel/event if given."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("conv", "channel", "event"):
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _running_loop() -> Any:
    # imported here: `flowbot check` and friends load this module and need no asyncio
    import asyncio

    return asyncio.get_running_loop()


class LoopHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that, on an event loop's thread, writes the lines of one loop
    iteration in one write at its end instead of a write and a flush per line. Elsewhere
    (threads, before the loop starts, at exit) it writes at once."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        if self._scheduled:
            return
        try:
            loop = _running_loop()
        except RuntimeError:
            self._write()
            return
        self._scheduled = True
        loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            self._write()

    def _write(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        with contextlib.suppress(Exception):  # a closed stderr must not break the server
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            self._write()


def setup(level: str = "info", fmt: str = "text", secrets: Iterable[str] = (),
          stream: Any = None) -> None:
    """Configure the root logger for `flowbot serve` (and the database process)."""
    # the logging HOWTO's "Optimization": no stack walk for the caller's file and line, no
    # thread or process names — none of it is in our lines, and it is most of their cost
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LoopHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RateLimit())
    handler.addFilter(Redact(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # request URLs of these libraries hold the Telegram bot token
    for noisy in ("httpx", "httpcore", "telegram", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
