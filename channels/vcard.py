"""A shared contact's name and phone number, read from a vCard (RFC 2426 3.0, RFC 6350 4.0,
and the older 2.1 that some phones still write). Only what a flow gets as `contact_name`
and `contact_phone`; everything else in the card is skipped.

Written here rather than taken from `vobject`: that library brings python-dateutil and pytz,
has no type hints, and its 2.1 quoted-printable support is partial, while two properties
need some forty lines.
"""

from __future__ import annotations

import quopri
import re
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_UNESCAPED = {"n": "\n", "N": "\n"}  # RFC 6350 3.4: \n, \, \; \\ in text values


@dataclass(frozen=True)
class Contact:
    """The first card's display name and preferred (else first) phone number, "" if absent."""

    name: str = ""
    phone: str = ""


@dataclass(frozen=True)
class _Line:
    name: str  # upper case, without the group ("item1.TEL" → "TEL")
    params: dict[str, list[str]]  # upper-case keys; a 2.1 bare parameter ("CELL") is TYPE
    value: str


def decode(body: bytes, charset: str = "") -> str:
    """A vCard file's bytes as text: the charset the server named, else UTF-8 (vCard 4.0's
    only encoding, RFC 6350 3.1), else Latin-1 (a 2.1 card from an old phone)."""
    for name in (charset, "utf-8"):
        if not name:
            continue
        try:
            return body.decode(name)
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode("latin-1")


def _unfold(text: str) -> list[str]:
    """Physical lines to logical ones: a line break followed by one space or tab continues
    the line (RFC 6350 3.2, RFC 2425 5.8.1); a quoted-printable value ending in "=" goes
    on with the next line as is (vCard 2.1 soft line breaks)."""
    out: list[str] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if raw[:1] in (" ", "\t") and out:
            out[-1] += raw[1:]
        elif out and out[-1].endswith("=") and "QUOTED-PRINTABLE" in out[-1].split(":", 1)[0].upper():
            out[-1] = out[-1][:-1] + "=\n" + raw  # kept as a soft break for quopri
        else:
            out.append(raw)
    return out


def _split_unquoted(text: str, sep: str) -> list[str]:
    """`text` split at each `sep` outside double quotes (parameter values may quote ":"
    and ";", RFC 6350 3.3)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _parse_line(line: str) -> _Line | None:
    head, colon, value = _partition_quoted(line)
    if not colon:
        return None
    name, *raw_params = _split_unquoted(head, ";")
    params: dict[str, list[str]] = {}
    for param in raw_params:
        key, eq, values = param.partition("=")
        if not eq:  # vCard 2.1: "TEL;CELL;PREF:…", "…;QUOTED-PRINTABLE:…"
            key, values = ("ENCODING" if param.upper() in ("QUOTED-PRINTABLE", "BASE64", "B")
                           else "TYPE"), param
        params.setdefault(key.strip().upper(), []).extend(
            v.strip().strip('"') for v in _split_unquoted(values, ","))
    return _Line(name.rpartition(".")[2].strip().upper(), params, value)


def _partition_quoted(line: str) -> tuple[str, str, str]:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == ":" and not quoted:
            return line[:i], ":", line[i + 1:]
    return line, "", ""


def _value(line: _Line) -> str:
    """The value as text: quoted-printable decoded in its CHARSET (vCard 2.1), escapes
    undone (RFC 6350 3.4)."""
    value = line.value
    if any(e.upper() == "QUOTED-PRINTABLE" for e in line.params.get("ENCODING", ())):
        raw = quopri.decodestring(value.encode("latin-1", "replace"))
        value = decode(raw, (line.params.get("CHARSET") or [""])[0])
    return value


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), text)


def _preferred(line: _Line) -> bool:
    types = {t.lower() for t in line.params.get("TYPE", ())}
    return "pref" in types or "PREF" in line.params  # 3.0 TYPE=pref; 4.0 PREF=1


def _name_from_n(value: str) -> str:
    """N is "Family;Given;Additional;Prefixes;Suffixes": shown as "Given Family", the order
    Telegram's first_name + last_name give."""
    parts = [_unescape(p).strip() for p in re.split(r"(?<!\\);", value)]
    parts += [""] * (5 - len(parts))
    family, given, additional, prefix, suffix = parts[:5]
    return " ".join(p for p in (prefix, given, additional, family, suffix) if p)


def parse(text: str) -> Contact:
    """The first card in `text`: FN (else N), and the TEL marked preferred, else the first.
    A `tel:` URI (vCard 4.0) loses its scheme. Malformed lines are skipped; text that is no
    vCard gives an empty Contact."""
    full = n = ""
    phones: list[tuple[bool, str]] = []
    inside = False
    for raw in _unfold(text):
        line = _parse_line(raw)
        if line is None:
            continue
        if line.name == "BEGIN" and line.value.strip().upper() == "VCARD":
            inside = True
        elif line.name == "END" and line.value.strip().upper() == "VCARD":
            if inside:
                break  # the first card only
        elif not inside:
            continue
        elif line.name == "FN" and not full:
            full = _unescape(_value(line)).strip()
        elif line.name == "N" and not n:
            n = _name_from_n(_value(line))
        elif line.name == "TEL":
            phone = _unescape(_value(line)).strip()
            phone = phone[4:] if phone.lower().startswith("tel:") else phone
            if phone:
                phones.append((_preferred(line), phone))
    preferred = [p for pref, p in phones if pref]
    phone = preferred[0] if preferred else phones[0][1] if phones else ""
    return Contact(name=" ".join((full or n).split()), phone=phone)
