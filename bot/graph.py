"""Draws a flow as Mermaid or Graphviz dot, every edge labelled."""

from __future__ import annotations

from bot.flow import FLOW_TARGET_PREFIX, Block, Flow


def _node_label(block: Block) -> str:
    kind = type(block).__name__.removesuffix("Block").lower()
    return f"{block.id} ({kind})"


def _quote(text: str) -> str:
    return text.replace('"', "'")


def _terminals(edges: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(node, label) for the "end" and "other flow" nodes the edges point at."""
    nodes = sorted({dst for _, dst, _ in edges if dst == "__end__" or dst.startswith("flow_")})
    return [(n, "end" if n == "__end__" else "flow " + n.removeprefix("flow_")) for n in nodes]


def _edges(flow: Flow) -> list[tuple[str, str, str]]:
    out = []
    for bid, block in flow.blocks.items():
        for label, target in block.edges():
            if target is None:
                target = "__end__"
            elif target.startswith(FLOW_TARGET_PREFIX):
                target = "flow_" + target.removeprefix(FLOW_TARGET_PREFIX)
            out.append((bid, target, label))
    return out


def mermaid(flow: Flow) -> str:
    lines = ["flowchart TD", f'    __start__(["start of {flow.name}"]) --> {flow.start}']
    for bid, block in flow.blocks.items():
        lines.append(f'    {bid}["{_quote(_node_label(block))}"]')
    edges = _edges(flow)
    lines += [f'    {src} -->|"{_quote(label)}"| {dst}' for src, dst, label in edges]
    lines += [f'    {node}(["{text}"])' for node, text in _terminals(edges)]
    return "\n".join(lines) + "\n"


def dot(flow: Flow) -> str:
    lines = [f'digraph "{_quote(flow.name)}" {{', "    rankdir=TB;",
             '    "__start__" [shape=oval, label="start"];',
             f'    "__start__" -> "{flow.start}";']
    for bid, block in flow.blocks.items():
        lines.append(f'    "{bid}" [shape=box, label="{_quote(_node_label(block))}"];')
    edges = _edges(flow)
    lines += [f'    "{src}" -> "{dst}" [label="{_quote(label)}"];' for src, dst, label in edges]
    lines += [f'    "{node}" [shape=oval, label="{text}"];' for node, text in _terminals(edges)]
    lines.append("}")
    return "\n".join(lines) + "\n"
