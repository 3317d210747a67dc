"""Admin-written regular expressions (input `pattern`, condition `matches`), run with a time
limit so that one user's text can't stall the database worker that runs every chat.

The `regex` library, not `re`: it reads the same syntax and means the same thing (`\\w` and
`\\d` are Unicode-aware, lookarounds and backreferences work), its matcher already avoids
most catastrophic backtracking (`([A-Za-z]+\\s?)*`, `(a+)+$` answer in microseconds), and
for the rest it takes a `timeout`. A linear-time engine (google-re2) would need no timeout
but refuses backreferences and lookarounds and reads `\\w`, `\\d` and `\\b` as ASCII, so
patterns admins test in Python would silently change meaning on our users' text.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import regex

log = logging.getLogger(__name__)

LOG_INTERVAL = 60.0  # s between two log lines about the same slow pattern


def problem(pattern: str) -> str | None:
    """Why `pattern` can't be used (a sentence for `flowbot check`), or None if it can."""
    try:
        _compiled(pattern)
    except regex.error as exc:
        return f"is not a valid regular expression: {exc}"
    return None


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


@dataclass
class _Throttle:
    """One log line per pattern per LOG_INTERVAL (real time, not the flows' clock), with the
    count of the time-outs it stood for: a user who retries can't flood the log."""

    last: dict[str, float] = field(default_factory=dict)
    silenced: dict[str, int] = field(default_factory=dict)

    def report(self, place: str, pattern: str, seconds: float) -> None:
        now = time.monotonic()
        if now - self.last.get(place, -LOG_INTERVAL) < LOG_INTERVAL:
            self.silenced[place] = self.silenced.get(place, 0) + 1
            return
        self.last[place] = now
        more = self.silenced.pop(place, 0)
        log.warning("%s: the pattern %r took longer than %gs on a user's text; counted as no "
                    "match%s. Simplify it (nested repeats like (a|aa)+ backtrack without end)",
                    place, pattern[:100], seconds,
                    f" ({more} more time(s) in the last {LOG_INTERVAL:g}s)" if more else "")


_throttle = _Throttle()


def matches(pattern: str, text: str, *, whole: bool, timeout: float, place: str) -> bool:
    """Does `pattern` match all of `text` (`whole`) or somewhere in it? A match that runs
    past `timeout` seconds counts as no match and is logged (at most once a minute per
    `place`, e.g. "flows.main.blocks.ask.pattern"). Raises `regex.error` for a pattern
    that `problem` would have refused."""
    compiled = _compiled(pattern)
    try:
        found = (compiled.fullmatch(text, timeout=timeout) if whole
                 else compiled.search(text, timeout=timeout))
    except TimeoutError:
        _throttle.report(place, pattern, timeout)
        return False
    return found is not None
