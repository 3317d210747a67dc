"""`{{variable}}` templates with dotted paths, and dotted-path lookups in JSON values."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

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


def render(template: str, variables: Mapping[str, Any], escape: Callable[[str], str] = str) -> str:
    """Fill placeholders; unknown variables become empty. `escape` is applied to values only."""
    return _PLACEHOLDER.sub(lambda m: escape(as_text(lookup(variables, m.group(1)))), template)


def render_url(template: str, variables: Mapping[str, Any]) -> str:
    return render(template, variables, lambda v: quote(v, safe=""))


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
