"""Lower ONNX `Einsum` nodes to Transpose / Unsqueeze / Mul / MatMul / Squeeze, which onnxruntime runs faster.

The reference op writes its contractions as einsums; torch.onnx keeps them as `Einsum` nodes, which onnxruntime
evaluates through a generic path (about a fifth of a SmolLM2 decode step). An equation is lowered when it is

- two operands contracting exactly one index, every other index of each operand kept in the output (batch,
  row or column indices), with no repeated index within an operand and no ellipsis; or
- three operands, the first's indices a subset of the second's (an elementwise weight, folded by `Mul` first),
  the rest as above.

Anything else stays `Einsum`. A lowered node computes the same numbers up to fp32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lincompile.backends.onnx_chunks import subgraphs

LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Aligned:
    """An operand brought to a target layout: transpose by `perm`, then insert size-1 axes at `unsqueeze`."""

    perm: tuple[int, ...]
    unsqueeze: tuple[int, ...]


@dataclass(frozen=True)
class MatMulPlan:
    """a @ b after aligning both to `lead + [m|1, k]` and `lead + [k, n|1]`; then `squeeze` the size-1 row/col
    axes and transpose the result by `out_perm` into the output's index order (None: already in order)."""

    a: Aligned
    b: Aligned
    squeeze: tuple[int, ...]
    out_perm: tuple[int, ...] | None


def parse(equation: str) -> tuple[list[str], str] | None:
    """(input index strings, output index string), or None for an implicit output or an ellipsis."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, output = equation.split("->")
    operands = inputs.split(",")
    if any(set(term) - LETTERS or len(set(term)) != len(term) for term in [*operands, output]):
        return None
    return operands, output


def align(term: str, layout: str) -> Aligned:
    """Bring an operand indexed by `term` to `layout` (which holds every letter of `term`; others become 1s)."""
    kept = [x for x in layout if x in term]
    return Aligned(tuple(term.index(x) for x in kept), tuple(i for i, x in enumerate(layout) if x not in term))


def plan_matmul(a: str, b: str, out: str) -> MatMulPlan | None:
    """The MatMul form of `a,b->out`, or None when it is not one (see the module docstring)."""
    if set(out) - set(a) - set(b):
        return None
    contracted = (set(a) & set(b)) - set(out)
    if len(contracted) != 1 or (set(a) | set(b)) - set(out) != contracted:
        return None
    (k,) = contracted
    rows = [x for x in out if x in a and x not in b]
    cols = [x for x in out if x in b and x not in a]
    m, n = (rows[-1] if rows else None), (cols[-1] if cols else None)
    lead = "".join(x for x in out if x not in (m, n))
    row, col = m or "1", n or "2"  # placeholders for a missing row / column axis (never letters)
    result = lead + row + col
    squeeze = tuple(i for i, x in enumerate(result) if x in "12")
    kept = "".join(x for x in result if x not in "12")
    out_perm = None if kept == out else tuple(kept.index(x) for x in out)
    return MatMulPlan(align(a, lead + row + k), align(b, lead + k + col), squeeze, out_perm)


def apply_numpy(plan: MatMulPlan, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The plan executed with numpy (what the ONNX nodes compute); used to test plans against np.einsum."""
    def aligned(x: np.ndarray, how: Aligned) -> np.ndarray:
        x = np.transpose(x, how.perm)
        for axis in how.unsqueeze:
            x = np.expand_dims(x, axis)
        return x

    y = np.matmul(aligned(a, plan.a), aligned(b, plan.b))
    if plan.squeeze:
        y = np.squeeze(y, plan.squeeze)
    return y if plan.out_perm is None else np.transpose(y, plan.out_perm)


class _Builder:
    """Emits replacement nodes and int64 axis initializers with unique names."""

    def __init__(self, graph: object, prefix: str) -> None:
        self.graph, self.prefix, self.nodes, self.count = graph, prefix, [], 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: object) -> str:
        from onnx import helper

        output = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.name(op), **attrs))
        return output

    def axes(self, values: tuple[int, ...]) -> str:
        from onnx import numpy_helper

        name = self.name("axes")
        self.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def align(self, value: str, how: Aligned) -> str:
        if how.perm != tuple(range(len(how.perm))):
            value = self.node("Transpose", [value], perm=list(how.perm))
        if how.unsqueeze:
            value = self.node("Unsqueeze", [value, self.axes(how.unsqueeze)])
        return value


def _lower(node: object, graph: object) -> list[object] | None:
    parsed = parse(next((a.s.decode() for a in node.attribute if a.name == "equation"), ""))
    if parsed is None or len(parsed[0]) not in (2, 3):
        return None
    operands, out = parsed
    weight = operands.pop(0) if len(operands) == 3 else None
    if weight is not None and set(weight) - set(operands[0]):
        return None
    plan = plan_matmul(operands[0], operands[1], out)
    if plan is None:
        return None
    build = _Builder(graph, node.name or node.output[0])
    values = list(node.input)
    if weight is not None:  # weight * first operand, elementwise, then the two-operand product
        values = [build.node("Mul", [build.align(values[0], align(weight, operands[0])), values[1]]), values[2]]
    last = plan.squeeze or plan.out_perm is not None
    product = build.node("MatMul", [build.align(values[0], plan.a), build.align(values[1], plan.b)],
                         None if last else node.output[0])
    if plan.squeeze:
        product = build.node("Squeeze", [product, build.axes(plan.squeeze)],
                             None if plan.out_perm is not None else node.output[0])
    if plan.out_perm is not None:
        build.node("Transpose", [product], node.output[0], perm=list(plan.out_perm))
    return build.nodes


def lower_einsums(model: object) -> tuple[int, int]:
    """Rewrite an `onnx.ModelProto` in place, subgraphs (If branches, Scan bodies) included; returns (lowered,
    left as Einsum)."""
    return _lower_graph(model.graph)


def _lower_graph(graph: object) -> tuple[int, int]:
    nodes, lowered, left = [], 0, 0
    for node in graph.node:
        for inner in subgraphs(node):
            counts = _lower_graph(inner)
            lowered, left = lowered + counts[0], left + counts[1]
        replacement = _lower(node, graph) if node.op_type == "Einsum" and node.domain in ("", "ai.onnx") else None
        if replacement is None:
            left += node.op_type == "Einsum"
            nodes.append(node)
        else:
            lowered += 1
            nodes.extend(replacement)
    del graph.node[:]
    graph.node.extend(nodes)
    return lowered, left
