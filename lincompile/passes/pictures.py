"""Pictures of attention subgraphs for `--dump-dir`: Graphviz DOT text and an SVG laid out by topological layer.

`site_{i}_before.*` shows a site as detection found it (q/k/v producers, mask terms, the attention
core); `site_{i}_after.*` shows the `lincompile::attention` call that replaced it with its inputs and
outputs. The SVG is written directly (boxes, labels, arrows), which takes milliseconds per site.
"""
from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import networkx as nx
from torch import fx


def _label(node: fx.Node) -> str:
    target = str(node.target)
    if not target.startswith(("aten.", "lincompile.")):
        target = getattr(node.target, "__name__", target)
    target = target.replace("aten.", "").replace(".default", "")
    return f"{node.name}\\n{target}" if node.op == "call_function" else f"{node.name}\\n({node.op})"


def between(sources: list[fx.Node], sink: fx.Node) -> list[fx.Node]:
    """`sources`, `sink` and every node on a data-flow path from a source to the sink, in graph order."""
    ancestors: set[fx.Node] = set()
    stack = [sink]
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            stack.extend(node.all_input_nodes)
    reached: set[fx.Node] = set()
    stack = [s for s in sources if s in ancestors]
    while stack:
        node = stack.pop()
        if node not in reached and node in ancestors:
            reached.add(node)
            stack.extend(node.users)
    keep = reached | set(sources) | {sink}
    return [n for n in sink.graph.nodes if n in keep]


def subgraph(nodes: list[fx.Node]) -> nx.DiGraph:
    """The induced data-flow graph on `nodes` (edges from producer to user)."""
    chosen = set(nodes)
    graph = nx.DiGraph()
    for node in nodes:
        graph.add_node(node.name, label=_label(node))
    for node in nodes:
        for src in node.all_input_nodes:
            if src in chosen:
                graph.add_edge(src.name, node.name)
    return graph


def to_dot(graph: nx.DiGraph, title: str) -> str:
    lines = [f'digraph "{title}" {{', "  rankdir=TB;", '  node [shape=box, fontsize=10];']
    for name, data in graph.nodes(data=True):
        lines.append(f'  "{name}" [label="{data["label"]}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


#: SVG geometry (px): box size and the gaps between layers and between boxes of a layer.
BOX_W, BOX_H, GAP_X, GAP_Y = 170, 38, 20, 34


def to_svg(graph: nx.DiGraph, title: str) -> str:
    """`graph` drawn top-down by topological layers (inputs first) as a standalone SVG document: one labelled
    box per node, one arrow per edge. Plain SVG text, so large sites draw in milliseconds."""
    layers = list(nx.topological_generations(graph))
    width = max((len(layer) for layer in layers), default=1) * (BOX_W + GAP_X) + GAP_X
    height = len(layers) * (BOX_H + GAP_Y) + GAP_Y
    where: dict[str, tuple[float, float]] = {}
    for row, names in enumerate(layers):
        left = (width - len(names) * (BOX_W + GAP_X) + GAP_X) / 2
        for col, name in enumerate(sorted(names)):
            where[name] = (left + col * (BOX_W + GAP_X), GAP_Y + row * (BOX_H + GAP_Y))
    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'font-family="monospace" font-size="10">', f"<title>{escape(title)}</title>",
             '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>']
    for a, b in graph.edges:
        (xa, ya), (xb, yb) = where[a], where[b]
        parts.append(f'<line x1="{xa + BOX_W / 2:.0f}" y1="{ya + BOX_H:.0f}" x2="{xb + BOX_W / 2:.0f}" y2="{yb:.0f}" '
                     'stroke="#555" marker-end="url(#arrow)"/>')
    for name, data in graph.nodes(data=True):
        x, y = where[name]
        lines = [escape(line) for line in data["label"].split("\\n")]
        spans = "".join(f'<tspan x="{x + BOX_W / 2:.0f}" dy="{0 if i == 0 else 12}">{line}</tspan>'
                        for i, line in enumerate(lines))
        parts.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="#dde8f7" '
                     f'stroke="#7a93b8"/><text x="{x + BOX_W / 2:.0f}" y="{y + 15:.0f}" text-anchor="middle">'
                     f'{spans}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_site_pictures(directory: Path, stem: str, nodes: list[fx.Node], title: str) -> list[Path]:
    """Write `{stem}.dot` and `{stem}.svg` for the subgraph on `nodes`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    graph = subgraph(nodes)
    dot = directory / f"{stem}.dot"
    dot.write_text(to_dot(graph, title))
    svg = directory / f"{stem}.svg"
    svg.write_text(to_svg(graph, title))
    return [dot, svg]
