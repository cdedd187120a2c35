"""Graph invariants checked after every pass.

- the graph lints (every use is defined before it, one output node);
- every `lincompile::attention` call carries a valid `MethodSpec` and 4-D q/k/v.
"""
from __future__ import annotations

import torch
from torch import fx

from lincompile.methods.spec import MethodSpec


class GraphInvariantError(RuntimeError):
    """A pass left the graph in a state no later pass or backend may rely on."""


def attention_op() -> object:
    import lincompile.kernels.ops  # noqa: F401  (registers the op)

    return torch.ops.lincompile.attention.default


def check_graph(gm: fx.GraphModule, *, after: str = "") -> None:
    where = f" after pass {after!r}" if after else ""
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises plain RuntimeError/AssertionError subclasses
        raise GraphInvariantError(f"graph does not lint{where}: {exc}") from exc
    op = attention_op()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is op:
            try:
                MethodSpec.from_json(node.args[7])
            except Exception as exc:
                raise GraphInvariantError(f"{node.name}{where}: bad method spec: {exc}") from exc
            for arg in node.args[:3]:
                val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
                if not isinstance(val, torch.Tensor) or val.dim() != 4:
                    raise GraphInvariantError(f"{node.name}{where}: q/k/v must be 4-D tensors")
    if sum(1 for n in gm.graph.nodes if n.op == "output") != 1:
        raise GraphInvariantError(f"graph must have exactly one output node{where}")
