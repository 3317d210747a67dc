"""`{{variable}}` templates with dotted paths, and dotted-path lookups in JSON values."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from yarl import URL

# what an HTTP header value can't carry (RFC 9110 5.5: no CR, LF, NUL or other controls)
UNSENDABLE_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
_MISSING = object()


def lookup(value: Any, path: str) -> Any:
    """`data.items.0.id` into nested dicts and lists; None when any step is missing.
    A key that is the whole dotted path (form fields like `order.status`) wins."""
    if isinstance(value, Mapping) and path in value:
        return value[path]
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def placeholders(template: str) -> list[str]:
    """The variable paths a template refers to, in order, repeats included."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template)]


def json_size(value: Any) -> int:
    """Bytes `value` takes as stored (compact JSON, UTF-8): what the variable limits count."""
    if isinstance(value, str):  # the common case, without building a copy of the JSON
        return len(value.encode("utf-8", "surrogatepass")) + 2
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"))


def render(template: str, variables: Mapping[str, Any], escape: Callable[[str], str] = str) -> str:
    """Fill placeholders; unknown variables become empty. `escape` is applied to values only."""
    return _PLACEHOLDER.sub(lambda m: escape(as_text(lookup(variables, m.group(1)))), template)


def render_url(template: str, variables: Mapping[str, Any]) -> str:
    """A URL with every value percent-encoded (`/`, `?`, `&`, `:` included)."""
    return render(template, variables, lambda v: quote(v, safe=""))


def render_file_url(template: str, variables: Mapping[str, Any]) -> str:
    """The URL of a file a block sends (`image`, `document`): a template that starts with
    a placeholder takes that value as the start of the URL as is (`{{photo_url}}`, a URL an
    http block fetched; `{{cdn}}/a/{{id}}.png`), later values are percent-encoded as in
    `render_url`. "" unless the result is one http(s) URL: no file is sent then, only the
    text (a platform refuses the whole message for a file it cannot fetch)."""
    template = template.strip()
    first = _PLACEHOLDER.match(template)
    if first is None:
        url = render_url(template, variables)
    else:
        url = (as_text(lookup(variables, first.group(1))).strip()
               + render_url(template[first.end():], variables))
    if not url.lower().startswith(("http://", "https://")) or any(c.isspace() for c in url):
        return ""
    return url if len(url) > len(url.partition("://")[0]) + 3 else ""


# What the admin wrote between placeholders stays as written (their own %-escapes too);
# only characters a URL can't carry (spaces, non-ASCII) are encoded.
_PATH_SAFE = "!$&'()*+,;=:@%~"
_QUERY_SAFE = "/?!$&'()*+,;=:@%~"


def _value(text: str) -> str:
    return quote(text, safe="")


def _render_part(template: str, variables: Mapping[str, Any], safe: str) -> str:
    out: list[str] = []
    at = 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(quote(template[at:m.start()], safe=safe))
        out.append(_value(as_text(lookup(variables, m.group(1)))))
        at = m.end()
    out.append(quote(template[at:], safe=safe))
    return "".join(out)


def _split_request_url(template: str) -> tuple[str, str, str]:
    """(scheme, authority, the rest: path, query, fragment) of an `http` block's URL."""
    scheme, sep, rest = template.partition("://")
    if not sep:
        return "", "", template
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    return scheme, rest[:end], rest[end:]


def request_url_problem(template: str) -> str | None:
    """Why an `http` block's `url` can't be used (for `flowbot check`), or None. The scheme
    and host must be written out: a template there could send the request (and its
    headers, maybe a token) anywhere, and would be escaped into a URL that never works."""
    scheme, authority, _rest = _split_request_url(template)
    if _PLACEHOLDER.search(scheme) or template.lstrip().startswith("{{") or _PLACEHOLDER.search(
            authority):
        return ("takes its scheme or host from a template; write them out and put variables "
                "in the path or query only, e.g. https://api.example.com/orders/{{order_id}}")
    if scheme.lower() not in ("http", "https"):
        return "must start with http:// or https://"
    if not authority:
        return "needs a host after http(s)://"
    try:
        URL(f"{scheme}://{authority}")
    except ValueError as exc:
        return f"has a host that is not valid: {exc}"
    return None


def render_request_url(template: str, variables: Mapping[str, Any]) -> str:
    """An `http` block's URL, filled so that no value can change where the request goes:
    the scheme and host are the template's own (`request_url_problem` refuses templated
    ones; this raises ValueError for them), each value is percent-encoded whole (`/`, `?`,
    `#`, `&`, `%` included), and a path segment a value turns into `.` or `..` is sent as
    `%2E`/`%2E%2E`, so it can't climb the path (`/orders/{{oid}}` with oid `..` is not
    `POST /`). The answer is fully encoded: send it as `yarl.URL(answer, encoded=True)`,
    which keeps those escapes."""
    wrong = request_url_problem(template)
    if wrong:
        raise ValueError(f"url {wrong}")
    scheme, authority, rest = _split_request_url(template)
    rest, hash_, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    segments = []
    for segment in path.split("/"):
        filled = _render_part(segment, variables, _PATH_SAFE)
        if filled in (".", "..") and _PLACEHOLDER.search(segment):
            filled = "%2E" * len(filled)
        segments.append(filled)
    return (str(URL(f"{scheme}://{authority}")) + "/".join(segments)
            + question + _render_part(query, variables, _QUERY_SAFE)
            + hash_ + _render_part(fragment, variables, _QUERY_SAFE))


def render_json(value: Any, variables: Mapping[str, Any]) -> Any:
    """Render every string in a JSON value; a string that is one placeholder keeps its type."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value.strip())
        if whole:
            return lookup(variables, whole.group(1))
        return render(value, variables)
    if isinstance(value, list):
        return [render_json(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: render_json(v, variables) for k, v in value.items()}
    return value
