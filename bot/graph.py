"""Draws a flow as Mermaid or Graphviz dot, every edge labelled. A flow with errors is drawn
too: an edge to a block that does not exist goes, dashed and red, to a node saying so, and a
block that could not be read is drawn red — so an admin sees what they broke."""

from __future__ import annotations

from collections.abc import Collection

from bot.flow import FLOW_TARGET_PREFIX, Block, Flow


def _node_label(block: Block) -> str:
    kind = type(block).__name__.removesuffix("Block").lower()
    return f"{block.id} ({kind})"


def _quote(text: str) -> str:
    return text.replace('"', "'")


def _terminals(edges: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(node, label) for the "end", "other flow" and broken-edge nodes the edges point at."""
    nodes = sorted({dst for _, dst, _ in edges
                    if dst == "__end__" or dst.startswith(("flow_", "missing_"))})
    return [(n, "end" if n == "__end__" else
             f"no block '{n.removeprefix('missing_')}'" if n.startswith("missing_") else
             "flow " + n.removeprefix("flow_")) for n in nodes]


def _target(flow: Flow, target: str | None, unreadable: Collection[str],
            flows: Collection[str] | None) -> str:
    if target is None:
        return "__end__"
    if target.startswith(FLOW_TARGET_PREFIX):
        other = target.removeprefix(FLOW_TARGET_PREFIX)
        return "flow_" + other if flows is None or other in flows else "missing_" + target
    if target in flow.blocks or target in unreadable:
        return target
    return "missing_" + target


def _edges(flow: Flow, unreadable: Collection[str] = (),
           flows: Collection[str] | None = None) -> list[tuple[str, str, str]]:
    start = _target(flow, flow.start, unreadable, None)
    out = [("__start__", start, "")]
    for bid, block in flow.blocks.items():
        for label, target in block.edges():
            out.append((bid, _target(flow, target, unreadable, flows), label))
    return out


def mermaid(flow: Flow, unreadable: Collection[str] = (),
            flows: Collection[str] | None = None) -> str:
    """Mermaid `flowchart TD`. `unreadable`: blocks of this flow that exist but could not
    be read; `flows`: the flows that exist (None: do not check jumps to other flows)."""
    lines = ["flowchart TD", f'    __start__(["start of {flow.name}"])']
    for bid, block in flow.blocks.items():
        lines.append(f'    {bid}["{_quote(_node_label(block))}"]')
    for bid in sorted(unreadable):
        lines.append(f'    {bid}["{bid} (cannot be read)"]:::broken')
    edges = _edges(flow, unreadable, flows)
    for src, dst, label in edges:
        arrow = "-.->" if dst.startswith("missing_") else "-->"
        lines.append(f'    {src} {arrow}|"{_quote(label)}"| {dst}' if label else
                     f"    {src} {arrow} {dst}")
    for node, text in _terminals(edges):
        lines.append(f'    {node}(["{_quote(text)}"])'
                     + (":::broken" if node.startswith("missing_") else ""))
    if unreadable or any(dst.startswith("missing_") for _, dst, _ in edges):
        lines.append("    classDef broken stroke:#d00,stroke-width:2px,color:#d00")
    return "\n".join(lines) + "\n"


def dot(flow: Flow, unreadable: Collection[str] = (),
        flows: Collection[str] | None = None) -> str:
    """Graphviz dot; broken edges and unreadable blocks in red. Arguments as `mermaid`."""
    lines = [f'digraph "{_quote(flow.name)}" {{', "    rankdir=TB;",
             '    "__start__" [shape=oval, label="start"];']
    for bid, block in flow.blocks.items():
        lines.append(f'    "{bid}" [shape=box, label="{_quote(_node_label(block))}"];')
    for bid in sorted(unreadable):
        lines.append(f'    "{bid}" [shape=box, color=red, fontcolor=red, '
                     f'label="{_quote(bid)} (cannot be read)"];')
    edges = _edges(flow, unreadable, flows)
    for src, dst, label in edges:
        attrs = [f'label="{_quote(label)}"'] if label else []
        if dst.startswith("missing_"):
            attrs += ["color=red", "fontcolor=red", "style=dashed"]
        lines.append(f'    "{src}" -> "{dst}"' + (f" [{', '.join(attrs)}]" if attrs else "")
                     + ";")
    for node, text in _terminals(edges):
        red = ", color=red, fontcolor=red" if node.startswith("missing_") else ""
        lines.append(f'    "{node}" [shape=oval, label="{_quote(text)}"{red}];')
    lines.append("}")
    return "\n".join(lines) + "\n"
