"""Typed reads from a TOML table that collect every problem with its dotted place."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

_MISSING: Any = object()


def did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Problems:
    """Everything wrong with a config, in the order found."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        # "flow.block" of blocks that exist but could not be read (a wrong `type`): edges
        # to them are not errors of their own, and what they lead to is unknown
        self.unreadable: set[str] = set()

    def at_place(self, place: str) -> list[str]:
        """The errors reported at exactly this place."""
        return [e for e in self.errors if e.split(": ", 1)[0] == place]

    def only(self, place: str, text: str) -> None:
        """Make `text` the one error at `place`, where the first of any others stood."""
        where = [i for i, e in enumerate(self.errors) if e.split(": ", 1)[0] == place]
        line = f"{place}: {text}"
        if not where:
            self.errors.append(line)
            return
        self.errors[where[0]] = line
        for i in reversed(where[1:]):
            del self.errors[i]

    def error(self, place: str, text: str) -> None:
        self.errors.append(f"{place}: {text}")

    def warn(self, place: str, text: str) -> None:
        self.warnings.append(f"{place}: {text}")


class Reader:
    """Reads keys off one table; `done()` reports the keys nobody asked for."""

    def __init__(self, table: dict[str, Any], place: str, problems: Problems) -> None:
        self.table = table
        self.place = place
        self.problems = problems
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.place}.{key}" if self.place else key

    def has(self, key: str) -> bool:
        return key in self.table

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self.table:
            return self.table[key]
        if default is _MISSING:
            self.problems.error(self.at(key), "is required")
        return default

    def _wrong(self, key: str, want: str, value: Any) -> None:
        self.problems.error(self.at(key), f"must be {want}, not {type(value).__name__} {value!r}")

    def text(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(key, default)
        if key not in self.table:
            return "" if value is _MISSING else value
        if not isinstance(value, str):
            self._wrong(key, "a string", value)
            return default if default is not _MISSING else ""
        if choices and value not in choices:
            self.problems.error(
                self.at(key),
                f"must be one of {', '.join(choices)}, not {value!r}{did_you_mean(value, choices)}",
            )
        return value

    def integer(self, key: str, default: Any = _MISSING, *, lo: int, hi: int) -> Any:
        value = self._get(key, default)
        if key not in self.table:
            return lo if value is _MISSING else value
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong(key, "a whole number", value)
            return default if default is not _MISSING else lo
        if not lo <= value <= hi:
            self.problems.error(self.at(key), f"must be {lo}..{hi}, not {value}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, lo: float, hi: float) -> Any:
        value = self._get(key, default)
        if key not in self.table:
            return float(lo) if value is _MISSING else value
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._wrong(key, "a number", value)
            return default if default is not _MISSING else lo
        if not lo <= value <= hi:
            self.problems.error(self.at(key), f"must be {lo:g}..{hi:g}, not {value:g}")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is _MISSING:
            return False
        if key in self.table and not isinstance(value, bool):
            self._wrong(key, "true or false", value)
            return default if default is not _MISSING else False
        return value

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if key not in self.table:
            return tuple(value) if isinstance(value, list | tuple) else ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._wrong(key, "a list of strings", value)
            return ()
        return tuple(value)

    def str_table(self, key: str) -> dict[str, str]:
        """A table of string values (headers, variable → path maps)."""
        value = self._get(key, {})
        if not isinstance(value, dict):
            self._wrong(key, "a table", value)
            return {}
        out: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, str):
                out[k] = v
            else:
                self.problems.error(f"{self.at(key)}.{k}", f"must be a string, not {v!r}")
        return out

    def table_(self, key: str) -> dict[str, Any]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            self._wrong(key, "a table", value)
            return {}
        return value

    def raw(self, key: str, default: Any = None) -> Any:
        return self._get(key, default)

    def done(self) -> None:
        """Report the keys nobody asked for. An unknown key that is a near miss of a missing
        required one (`timout` for `timeout`) is one problem, not two."""
        for key in self.table:
            if key not in self._seen:
                known = sorted(self._seen)
                hint = did_you_mean(key, known)
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                required = f"{self.at(close[0])}: is required" if close else ""
                if required in self.problems.errors:
                    self.problems.errors.remove(required)
                self.problems.error(self.at(key), f"unknown key{hint}")
