"""Draws a flow as Mermaid or Graphviz dot, every edge labelled."""

from __future__ import annotations

from bot.flow import FLOW_TARGET_PREFIX, Block, Flow


def _node_label(block: Block) -> str:
    kind = type(block).__name__.removesuffix("Block").lower()
    return f"{block.id} ({kind})"


def _quote(text: str) -> str:
    return text.replace('"', "'")


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
    extra: set[str] = set()
    for src, dst, label in _edges(flow):
        if dst == "__end__" or dst.startswith("flow_"):
            extra.add(dst)
        lines.append(f'    {src} -->|"{_quote(label)}"| {dst}')
    for node in sorted(extra):
        text = "end" if node == "__end__" else "flow " + node.removeprefix("flow_")
        lines.append(f'    {node}(["{text}"])')
    return "\n".join(lines) + "\n"


def dot(flow: Flow) -> str:
    lines = [f'digraph "{_quote(flow.name)}" {{', "    rankdir=TB;",
             '    "__start__" [shape=oval, label="start"];',
             f'    "__start__" -> "{flow.start}";']
    for bid, block in flow.blocks.items():
        lines.append(f'    "{bid}" [shape=box, label="{_quote(_node_label(block))}"];')
    extra: set[str] = set()
    for src, dst, label in _edges(flow):
        if dst == "__end__" or dst.startswith("flow_"):
            extra.add(dst)
        lines.append(f'    "{src}" -> "{dst}" [label="{_quote(label)}"];')
    for node in sorted(extra):
        text = "end" if node == "__end__" else "flow " + node.removeprefix("flow_")
        lines.append(f'    "{node}" [shape=oval, label="{text}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
