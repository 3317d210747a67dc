"""Parses `[flows.NAME]` tables into `Flow`s, reporting every problem with its place."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

from bot import patterns
from bot.flow import (
    BLOCK_TYPES,
    FLOW_TARGET_PREFIX,
    Block,
    ButtonsBlock,
    Choice,
    ConditionBlock,
    DelayBlock,
    EndBlock,
    Flow,
    HttpBlock,
    InputBlock,
    JumpBlock,
    MessageBlock,
    Rule,
    SetBlock,
    WebhookBlock,
    WebViewBlock,
)
from bot.template import UNSENDABLE_HEADER as _UNSENDABLE_HEADER
from bot.template import placeholders, request_url_problem
from bot.toml_reader import Problems, Reader, did_you_mean

MAX_CHOICES = 10
MAX_MAPPED_FIELDS = 50
CONDITION_OPS = (
    "equals",
    "not_equals",
    "contains",
    "not_contains",
    "is_empty",
    "is_not_empty",
    "greater_than",
    "less_than",
    "matches",
)
VALIDATIONS = ("text", "number", "email", "phone", "regex", "media")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
READ_ONLY_VARIABLES = ("channel", "user_id", "conversation_key", "webhook_url")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token


def _variable(r: Reader, key: str, *, required: bool = True) -> str:
    name: str = r.text(key) if required else r.text(key, "")
    if name and not _NAME.match(name):
        r.problems.error(r.at(key), f"{name!r} is not a variable name (letters, digits, _)")
    elif name in READ_ONLY_VARIABLES:
        r.problems.error(r.at(key), f"'{name}' is a built-in variable and cannot be set")
    return name


def _regex(r: Reader, key: str, pattern: str) -> None:
    wrong = patterns.problem(pattern)
    if wrong:
        r.problems.error(r.at(key), wrong)


def _field_map(r: Reader, key: str) -> tuple[tuple[str, str], ...]:
    mapping = r.str_table(key)
    if len(mapping) > MAX_MAPPED_FIELDS:
        r.problems.error(
            r.at(key), f"maps {len(mapping)} fields; at most {MAX_MAPPED_FIELDS} are allowed"
        )
    for var in mapping:
        if not _NAME.match(var):
            r.problems.error(f"{r.at(key)}.{var}", "is not a variable name (letters, digits, _)")
        elif var in READ_ONLY_VARIABLES:
            r.problems.error(f"{r.at(key)}.{var}", "is a built-in variable and cannot be set")
    return tuple(mapping.items())


def _target(r: Reader, key: str, *, required: bool = False) -> str | None:
    value: str | None = r.text(key) if required else r.text(key, None)
    return value or None


_HOST = re.compile(r"https?://[^/?#:@\s]+")  # a host, written or a template


def _media(r: Reader) -> dict[str, str]:
    """`image` or `document`: the URL of a file sent with the block's text."""
    found = {key: r.text(key, "") for key in ("image", "document")}
    for key, url in found.items():
        if url and not url.startswith(("http://", "https://", "{{")):
            r.problems.error(r.at(key), "must be an http:// or https:// URL the platform "
                             "can fetch (Telegram and Twilio download it)")
        elif url and any(c.isspace() for c in url.strip()):
            r.problems.error(r.at(key), "must be one URL, without spaces")
        elif url and not url.startswith("{{") and not _HOST.match(url):
            r.problems.error(r.at(key), "needs a host after http(s)://, e.g. "
                             "https://cdn.example.com/ticket.png")
    if found["image"] and found["document"]:
        r.problems.error(r.at("document"), "a block sends one file: `image` or `document`")
    return found


def _message(r: Reader, bid: str) -> Block:
    text = r.text("text", "") if r.has("image") or r.has("document") else r.text("text")
    return MessageBlock(bid, text=text, next=_target(r, "next"), **_media(r))


def _input(r: Reader, bid: str) -> Block:
    validation = r.text("validation", "text", choices=VALIDATIONS)
    pattern = r.text("pattern", "")
    if validation == "regex":
        if not pattern:
            r.problems.error(r.at("pattern"), "is required when validation = 'regex'")
        _regex(r, "pattern", pattern)
    elif pattern:
        r.problems.error(r.at("pattern"), "is only used with validation = 'regex'")
    return InputBlock(
        bid,
        **_media(r),
        text=r.text("text"),
        variable=_variable(r, "variable"),
        validation=validation,
        pattern=pattern,
        retry_message=r.text("retry_message", ""),
        next=_target(r, "next"),
    )


def _buttons(r: Reader, bid: str) -> Block:
    raw = r.raw("choices", [])
    choices: list[Choice] = []
    if not isinstance(raw, list) or not raw:
        r.problems.error(r.at("choices"), "must be a non-empty list of {label, next} tables")
        raw = []
    if len(raw) > MAX_CHOICES:
        r.problems.error(r.at("choices"), f"has {len(raw)} choices; at most {MAX_CHOICES}")
    labels: set[str] = set()
    for i, item in enumerate(raw):
        cr = Reader(item if isinstance(item, dict) else {}, f"{r.at('choices')}.{i}", r.problems)
        if not isinstance(item, dict):
            r.problems.error(cr.place, "must be a table like {label = 'Yes', next = 'yes'}")
            continue
        label = cr.text("label")
        if label.casefold() in labels:
            r.problems.error(cr.at("label"), f"{label!r} is used twice in this block")
        labels.add(label.casefold())
        choices.append(Choice(label, _target(cr, "next"), cr.text("value", label)))
        cr.done()
    return ButtonsBlock(
        bid,
        **_media(r),
        text=r.text("text"),
        variable=_variable(r, "variable", required=False),
        choices=tuple(choices),
        retry_message=r.text("retry_message", ""),
    )


def _condition(r: Reader, bid: str) -> Block:
    raw = r.raw("rules", [])
    rules: list[Rule] = []
    if not isinstance(raw, list):
        r.problems.error(r.at("rules"), "must be a list of {variable, op, value, next} tables")
        raw = []
    for i, item in enumerate(raw):
        rr = Reader(item if isinstance(item, dict) else {}, f"{r.at('rules')}.{i}", r.problems)
        if not isinstance(item, dict):
            r.problems.error(rr.place, "must be a table like {variable='x', op='equals', ...}")
            continue
        op = rr.text("op", choices=CONDITION_OPS)
        needs_value = op not in ("is_empty", "is_not_empty")
        value = rr.text("value") if needs_value else rr.text("value", "")
        if op == "matches":
            _regex(rr, "value", value)
        if op in ("greater_than", "less_than") and not _is_number(value):
            rr.problems.error(rr.at("value"), f"must be a number for {op}, not {value!r}")
        rules.append(Rule(rr.text("variable"), op, value, _target(rr, "next")))
        rr.done()
    return ConditionBlock(bid, rules=tuple(rules), else_=_target(r, "else"))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _set(r: Reader, bid: str) -> Block:
    return SetBlock(
        bid, variable=_variable(r, "variable"), value=r.text("value"), next=_target(r, "next")
    )


def _http(r: Reader, bid: str) -> Block:
    method = r.text("method", "GET").upper()
    if method not in HTTP_METHODS:
        r.problems.error(r.at("method"), f"must be one of {', '.join(HTTP_METHODS)}")
    url = r.text("url")
    wrong = request_url_problem(url) if url else None
    if wrong:
        r.problems.error(r.at("url"), wrong)
    headers = r.str_table("headers")
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            r.problems.error(f"{r.at('headers')}.{name}",
                             "is not a header name (letters, digits and !#$%&'*+.^_`|~-)")
        if _UNSENDABLE_HEADER.search(value):
            r.problems.error(f"{r.at('headers')}.{name}",
                             "holds a line break or control character, which can't be sent")
    return HttpBlock(
        bid,
        method=method,
        url=url,
        headers=tuple(headers.items()),
        body=r.raw("body"),
        timeout=r.number("timeout", 10.0, lo=0.1, hi=120),
        map=_field_map(r, "map"),
        status_variable=_variable(r, "status_variable", required=False),
        on_success=_target(r, "on_success"),
        on_failure=_target(r, "on_failure"),
    )


def _delay(r: Reader, bid: str) -> Block:
    return DelayBlock(bid, seconds=r.number("seconds", lo=0.0, hi=30 * 86400), next=_target(r, "next"))


def _jump(r: Reader, bid: str) -> Block:
    block, flow = r.text("block", ""), r.text("flow", "")
    if bool(block) == bool(flow):
        r.problems.error(r.place, "needs exactly one of `block` (this flow) or `flow` (its start)")
    return JumpBlock(bid, target=block or f"{FLOW_TARGET_PREFIX}{flow}")


def _end(r: Reader, bid: str) -> Block:
    return EndBlock(bid, text=r.text("text", ""))


def _webview(r: Reader, bid: str) -> Block:
    blocking = r.flag("blocking", True)
    url = r.text("url")
    verify = r.text("verify", "", choices=("", "telegram"))
    if url and not url.startswith(("http://", "https://", "/", "{{")):
        r.problems.error(r.at("url"), "must be an http(s) URL or a path on this server")
    inputs = r.str_list("input_variables", ())
    if blocking:
        expiration = r.number("expiration", lo=1, hi=86400)
        targets = {k: _target(r, k, required=True) for k in ("on_success", "on_error", "on_expired")}
        if r.has("next"):
            r.problems.error(r.at("next"), "is for blocking = false; use on_success/on_error")
        nxt = None
    else:
        expiration = r.number("expiration", 86400.0, lo=1, hi=30 * 86400)
        targets = {}
        for key in ("on_success", "on_error", "on_expired"):
            if r.has(key):
                r.problems.error(r.at(key), "is only for blocking = true; use `next`")
        nxt = _target(r, "next")
    return WebViewBlock(
        bid,
        url=url,
        text=r.text("text"),
        button=r.text("button", "Open"),
        input_variables=inputs,
        blocking=blocking,
        expiration=expiration,
        pending_message=r.text("pending_message", ""),
        response_variable=_variable(r, "response_variable", required=False),
        verify=verify,
        next=nxt,
        **targets,
    )


def _webhook(r: Reader, bid: str) -> Block:
    secret_env, provider = r.text("secret_env", ""), r.text("provider", "")
    if secret_env and provider:
        r.problems.error(r.at("secret_env"), "give either `secret_env` (a Standard Webhooks "
                         "secret) or `provider` (a profile with its own secret_env), not both")
    if secret_env and not secret_env.replace("_", "").isalnum():
        r.problems.error(r.at("secret_env"), f"must name an environment variable, not "
                         f"{secret_env!r}")
    return WebhookBlock(
        bid,
        text=r.text("text", ""),
        timeout=r.number("timeout", lo=1, hi=300),
        map=_field_map(r, "map"),
        save_payload_to=_variable(r, "save_payload_to", required=False),
        pending_message=r.text("pending_message", ""),
        secret_env=secret_env,
        provider=provider,
        on_success=_target(r, "on_success", required=True),
        on_failure=_target(r, "on_failure", required=True),
    )


_PARSERS: dict[str, Callable[[Reader, str], Block]] = {
    "message": _message,
    "input": _input,
    "buttons": _buttons,
    "condition": _condition,
    "set": _set,
    "http": _http,
    "delay": _delay,
    "jump": _jump,
    "end": _end,
    "webview": _webview,
    "webhook": _webhook,
}
assert set(_PARSERS) == set(BLOCK_TYPES)


def parse_flow(name: str, table: Any, problems: Problems) -> Flow | None:
    place = f"flows.{name}"
    if not isinstance(table, dict):
        problems.error(place, "must be a table with `start` and `blocks`")
        return None
    r = Reader(table, place, problems)
    start = r.text("start")
    error_message = r.text("error_message", "")
    raw_blocks = r.table_("blocks")
    r.done()
    blocks: dict[str, Block] = {}
    for bid, btable in raw_blocks.items():
        bplace = f"{place}.blocks.{bid}"
        if not _NAME.match(bid):
            problems.error(bplace, "block names use letters, digits and _ only")
        if not isinstance(btable, dict):
            problems.error(bplace, "must be a table with a `type`")
            continue
        br = Reader(btable, bplace, problems)
        kind = br.text("type", choices=tuple(_PARSERS))
        parser = _PARSERS.get(kind)
        if parser is None:
            problems.unreadable.add(f"{name}.{bid}")
            continue
        blocks[bid] = parser(br, bid)
        br.done()
    if not raw_blocks:
        problems.error(f"{place}.blocks", "a flow needs at least one block")
    elif start and start not in raw_blocks:
        problems.error(f"{place}.start", f"no block named {start!r}{did_you_mean(start, raw_blocks)}")
    return Flow(name, start, blocks, error_message)


def check_references(flow: Flow, flow_names: Collection[str], problems: Problems) -> None:
    """Every edge points at a block of this flow or at another flow; warn on dead blocks.

    A flow with a broken edge or a block that could not be read gets no "no path reaches
    it" warnings: where those lead is unknown, so the warnings would only echo the one
    real mistake. An edge to a block that exists but could not be read is not an error of
    its own (that block's error says what is wrong)."""
    before = len(problems.errors)
    unreadable = {b.split(".", 1)[1] for b in problems.unreadable
                  if b.split(".", 1)[0] == flow.name}
    for bid, block in flow.blocks.items():
        for key, target in _edge_keys(block):
            if target is None:
                continue
            place = f"flows.{flow.name}.blocks.{bid}.{key}"
            if target.startswith(FLOW_TARGET_PREFIX):
                other = target.removeprefix(FLOW_TARGET_PREFIX)
                if other not in flow_names:
                    problems.error(place, f"no flow named {other!r}{did_you_mean(other, flow_names)}")
            elif target not in flow.blocks and target not in unreadable:
                problems.error(place, f"no block named {target!r}{did_you_mean(target, flow.blocks)}")
    if len(problems.errors) > before or unreadable or flow.start not in flow.blocks:
        return
    _warn_doubling_sets(flow, problems)
    live = reachable(flow)
    for bid in flow.blocks:
        if bid not in live:
            problems.warn(f"flows.{flow.name}.blocks.{bid}", "no path from the start reaches it")


def _warn_doubling_sets(flow: Flow, problems: Problems) -> None:
    """A `set` that uses its own variable twice (`x = "{{x}} {{x}}"`) on a loop doubles it
    each round: a few rounds reach bot.max_variable_bytes (before the limit: MemoryError)."""
    for bid, block in flow.blocks.items():
        if not isinstance(block, SetBlock):
            continue
        own = sum(1 for path in placeholders(block.value)
                  if path.split(".")[0] == block.variable)
        loop = _loop_back(flow, bid) if own >= 2 else None
        if loop:
            problems.warn(
                f"flows.{flow.name}.blocks.{bid}.value",
                f"uses {{{{{block.variable}}}}} {own} times, so it multiplies it by {own} "
                f"each round of the loop {' → '.join(loop)}: after 20 rounds it would be "
                f"{own}^20 times as large. Each event that passes bot.max_variable_bytes is "
                "refused; keep a loop's growth additive (or bounded)")


def _loop_back(flow: Flow, start: str) -> list[str] | None:
    """The shortest path of blocks from `start` back to itself in this flow, or None."""
    parent: dict[str, str] = {}
    todo = [start]
    while todo:
        bid = todo.pop(0)
        block = flow.blocks.get(bid)
        for _, target in block.edges() if block else []:
            if target == f"{FLOW_TARGET_PREFIX}{flow.name}":
                target = flow.start
            if target is None or target in parent:
                continue
            parent[target] = bid
            if target == start:
                path = [start]
                while path[-1] != start or len(path) == 1:
                    path.append(parent[path[-1]])
                return path[::-1]
            todo.append(target)
    return None


def _edge_keys(block: Block) -> list[tuple[str, str | None]]:
    """Edges named by the config key that holds them, for error places."""
    if isinstance(block, ButtonsBlock):
        return [(f"choices.{i}.next", c.next) for i, c in enumerate(block.choices)]
    if isinstance(block, ConditionBlock):
        return [(f"rules.{i}.next", r.next) for i, r in enumerate(block.rules)] + [
            ("else", block.else_)
        ]
    if isinstance(block, JumpBlock):
        key = "flow" if block.target.startswith(FLOW_TARGET_PREFIX) else "block"
        return [(key, block.target)]
    if isinstance(block, InputBlock | MessageBlock | SetBlock | DelayBlock):
        return [("next", block.next)]
    if isinstance(block, WebViewBlock):
        if not block.blocking:
            return [("next", block.next)]
        return [
            ("on_success", block.on_success),
            ("on_error", block.on_error),
            ("on_expired", block.on_expired),
        ]
    if isinstance(block, HttpBlock | WebhookBlock):
        return [("on_success", block.on_success), ("on_failure", block.on_failure)]
    return []


def reachable(flow: Flow) -> set[str]:
    seen: set[str] = set()
    todo = [flow.start]
    while todo:
        bid = todo.pop()
        if bid in seen or bid not in flow.blocks:
            continue
        seen.add(bid)
        todo.extend(t for _, t in flow.blocks[bid].edges() if t)
    return seen
