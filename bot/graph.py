"""Draws a flow as Mermaid or Graphviz dot, every edge labelled. A flow with errors is drawn
too: an edge to a block that does not exist goes, dashed and red, to a node saying so, and a
block that could not be read is drawn red — so an admin sees what they broke."""

from __future__ import annotations

from collections.abc import Collection

from bot.flow import FLOW_TARGET_PREFIX, Block, Flow


def _node_label(block: Block) -> str:
    kind = type(block).__name__.removesuffix("Block").lower()
    return f"{block.id} ({kind})"


_CONTROL = {c: " " for c in range(32)}


def _dot_text(text: str) -> str:
    """`text` for inside a dot double-quoted string: backslashes and quotes escaped (a
    label's `\\N`, `\\G`, `\\l`… would otherwise be expanded), line breaks as `\\n`."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text.translate(_CONTROL)


def _mermaid_text(text: str) -> str:
    """`text` for inside a Mermaid `"…"` label: its quote, `#` (entity codes) and `<`/`>`
    (HTML) as Mermaid entity codes, control characters as spaces."""
    text = text.replace("#", "#35;").replace('"', "#quot;")
    return text.replace("<", "#lt;").replace(">", "#gt;").translate(_CONTROL)


# A node is keyed by its kind and name, so a block named "end", "__start__" or "flow_x"
# never merges with the end, start or other-flow node; drawn ids are n0, n1, … (safe in
# both languages whatever the names hold) and every name is only ever a label.
Node = tuple[str, str]
START: Node = ("start", "")
END: Node = ("end", "")


def _terminals(edges: list[tuple[Node, Node, str]]) -> list[tuple[Node, str]]:
    """(node, label) for the "end", "other flow" and broken-edge nodes the edges point at."""
    nodes = sorted({dst for _, dst, _ in edges if dst[0] in ("end", "flow", "missing")})
    return [(n, "end" if n == END else
             f"no block '{n[1]}'" if n[0] == "missing" else "flow " + n[1]) for n in nodes]


def _target(flow: Flow, target: str | None, unreadable: Collection[str],
            flows: Collection[str] | None) -> Node:
    if target is None:
        return END
    if target.startswith(FLOW_TARGET_PREFIX):
        other = target.removeprefix(FLOW_TARGET_PREFIX)
        return ("flow", other) if flows is None or other in flows else ("missing", target)
    if target in flow.blocks or target in unreadable:
        return ("block", target)
    return ("missing", target)


def _edges(flow: Flow, unreadable: Collection[str] = (),
           flows: Collection[str] | None = None) -> list[tuple[Node, Node, str]]:
    start = _target(flow, flow.start, unreadable, None)
    out = [(START, start, "")]
    for bid, block in flow.blocks.items():
        for label, target in block.edges():
            out.append((("block", bid), _target(flow, target, unreadable, flows), label))
    return out


class _Ids(dict[Node, str]):
    """Node -> drawn id (n0, n1, … in order of first use)."""

    def __missing__(self, node: Node) -> str:
        self[node] = f"n{len(self)}"
        return self[node]


def mermaid(flow: Flow, unreadable: Collection[str] = (),
            flows: Collection[str] | None = None) -> str:
    """Mermaid `flowchart TD`. `unreadable`: blocks of this flow that exist but could not
    be read; `flows`: the flows that exist (None: do not check jumps to other flows).
    Node ids are n0, n1, …; names appear only in escaped labels."""
    ids = _Ids()
    q = _mermaid_text
    lines = ["flowchart TD", f'    {ids[START]}(["start of {q(flow.name)}"])']
    for bid, block in flow.blocks.items():
        lines.append(f'    {ids["block", bid]}["{q(_node_label(block))}"]')
    for bid in sorted(unreadable):
        lines.append(f'    {ids["block", bid]}["{q(bid)} (cannot be read)"]:::broken')
    edges = _edges(flow, unreadable, flows)
    for src, dst, label in edges:
        arrow = "-.->" if dst[0] == "missing" else "-->"
        lines.append(f'    {ids[src]} {arrow}|"{q(label)}"| {ids[dst]}' if label else
                     f"    {ids[src]} {arrow} {ids[dst]}")
    for node, text in _terminals(edges):
        lines.append(f'    {ids[node]}(["{q(text)}"])'
                     + (":::broken" if node[0] == "missing" else ""))
    if unreadable or any(dst[0] == "missing" for _, dst, _ in edges):
        lines.append("    classDef broken stroke:#d00,stroke-width:2px,color:#d00")
    return "\n".join(lines) + "\n"


def dot(flow: Flow, unreadable: Collection[str] = (),
        flows: Collection[str] | None = None) -> str:
    """Graphviz dot; broken edges and unreadable blocks in red. Arguments as `mermaid`;
    node ids are n0, n1, …, every name an escaped label."""
    ids = _Ids()
    q = _dot_text
    lines = [f'digraph "{q(flow.name)}" {{', "    rankdir=TB;",
             f'    {ids[START]} [shape=oval, label="start"];']
    for bid, block in flow.blocks.items():
        lines.append(f'    {ids["block", bid]} [shape=box, label="{q(_node_label(block))}"];')
    for bid in sorted(unreadable):
        lines.append(f'    {ids["block", bid]} [shape=box, color=red, fontcolor=red, '
                     f'label="{q(bid)} (cannot be read)"];')
    edges = _edges(flow, unreadable, flows)
    for src, dst, label in edges:
        attrs = [f'label="{q(label)}"'] if label else []
        if dst[0] == "missing":
            attrs += ["color=red", "fontcolor=red", "style=dashed"]
        lines.append(f"    {ids[src]} -> {ids[dst]}"
                     + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    for node, text in _terminals(edges):
        red = ", color=red, fontcolor=red" if node[0] == "missing" else ""
        lines.append(f'    {ids[node]} [shape=oval, label="{q(text)}"{red}];')
    lines.append("}")
    return "\n".join(lines) + "\n"
