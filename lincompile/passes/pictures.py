"""Pictures of attention subgraphs for `--dump-dir`: Graphviz DOT text and an SVG drawn with networkx.

`site_{i}_before.*` shows a site as detection found it (q/k/v producers, mask terms, the attention
core); `site_{i}_after.*` shows the `lincompile::attention` call that replaced it with its inputs and
outputs. The SVG needs matplotlib; without it only the DOT file is written.
"""
from __future__ import annotations

from pathlib import Path

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


def to_svg(graph: nx.DiGraph, path: Path, title: str) -> bool:
    """Draw `graph` top-down by topological layers into `path`; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    for layer, names in enumerate(nx.topological_generations(graph)):
        for name in names:
            graph.nodes[name]["layer"] = -layer
    pos = nx.multipartite_layout(graph, subset_key="layer", align="horizontal")
    width = max(6.0, 1.8 * max((len(g) for g in nx.topological_generations(graph)), default=1))
    height = max(4.0, 1.5 * (1 + len(list(nx.topological_generations(graph)))))
    fig, ax = plt.subplots(figsize=(width, height))
    labels = {n: d["label"].replace("\\n", "\n") for n, d in graph.nodes(data=True)}
    nx.draw_networkx(graph, pos, ax=ax, labels=labels, node_shape="s", node_color="#dde8f7", node_size=1500,
                     font_size=7, arrows=True, arrowsize=10)
    ax.set_title(title)
    ax.axis("off")
    fig.savefig(path, format=path.suffix.lstrip("."), bbox_inches="tight")
    plt.close(fig)
    return True


def write_site_pictures(directory: Path, stem: str, nodes: list[fx.Node], title: str) -> list[Path]:
    """Write `{stem}.dot` and `{stem}.svg` for the subgraph on `nodes`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    graph = subgraph(nodes)
    dot = directory / f"{stem}.dot"
    dot.write_text(to_dot(graph, title))
    svg = directory / f"{stem}.svg"
    return [dot, svg] if to_svg(graph, svg, title) else [dot]
