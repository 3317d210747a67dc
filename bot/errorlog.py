"""Repeated identical errors logged once per interval with a count, not as a traceback each
(a full disk once wrote 11 MB of tracebacks in 40 s)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Seen:
    last_logged: float
    suppressed: int = 0


class ErrorLog:
    """`error(key, message, exc)`: the first error of a kind (`key`, e.g. the exception's
    type and message) is logged with its traceback; the same kind again within `interval`
    seconds is only counted, and the next one logged after the interval says how many
    were left out. `clock` is monotonic seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 1000) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_kinds = max_kinds
        self._seen: dict[str, _Seen] = {}

    def error(self, key: str, message: str, exc: BaseException | None = None) -> bool:
        """Log (or count) one error; returns whether it was written."""
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.last_logged < self.interval:
            seen.suppressed += 1
            return False
        if seen is not None and seen.suppressed:
            message += (f" (and {seen.suppressed} more like it in the last "
                        f"{now - seen.last_logged:.0f} s)")
        if len(self._seen) >= self.max_kinds and key not in self._seen:
            self._seen.clear()  # bounded memory; at worst a kind is logged again early
        self._seen[key] = _Seen(now)
        # a traceback for the first of its kind only: the repeats say the same
        self.logger.error(message, exc_info=exc if seen is None else None)
        return True


def kind(exc: BaseException) -> str:
    """The key of an exception's kind: its type and message (not its traceback)."""
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {str(exc)[:200]}"
