"""Attention written with the heads merged into the batch (Bloom: 3-D `baddbmm` scores and `bmm` with V over
[B*H, T, d]), rewritten in its 4-D [B, H, T, d] form, which the attention patterns read.

Two local rewrites, each where every operand is a 4-D tensor with its first two dims merged, split the same way:
  view4(baddbmm(bias3, q3, k3^T, beta, alpha))  ->  alpha * (q4 @ k4^T) + beta * unflatten(bias3)
  bmm(merge(p4), merge(v4))                     ->  flatten(p4 @ v4, 0, 1)
Invariant: the same values (one batched product of the same rows each way; a fused `baddbmm` may round its sum
differently in the last bit), the same output shapes. fp16 scores are left alone: the unscaled product could
overflow where the fused one, scaled before rounding, does not.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

_MERGES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}


def _shape(node: object) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _split(node: object, heads: tuple) -> fx.Node | None:
    """The 4-D [B, H, n, d] tensor that `node` [B*H, n, d] merges (B, H = `heads`), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MERGES):
        return None
    source, merged = node.args[0], _shape(node)
    shape = _shape(source)
    if shape is None or merged is None or len(shape) != 4 or len(merged) != 3:
        return None
    if not (_same(shape[:2], heads) and _same(shape[2:], merged[1:]) and str(shape[0] * shape[1]) == str(merged[0])):
        return None
    return source


def _transposed(node: object) -> fx.Node | None:
    """x for `transpose(x, -1, -2)` of a 3-D x, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.transpose.int):
        return None
    dims = {d % 3 for d in node.args[1:3]}
    return node.args[0] if dims == {1, 2} and len(_shape(node) or ()) == 3 else None


def _call(graph: fx.Graph, like: fx.Node, target: object, *args: object) -> fx.Node:
    """A new node whose meta value is computed from its inputs' (fake) values, in the module of `like` (the node it
    stands in for: site paths are read from it)."""
    node = graph.call_function(target, args)
    values = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    fake = next(v for v in values if isinstance(v, torch.Tensor)).fake_mode
    with fake:
        node.meta["val"] = target(*values)
    node.meta.update({key: like.meta[key] for key in ("nn_module_stack", "stack_trace") if key in like.meta})
    return node


def _scores(graph: fx.Graph, scores: fx.Node) -> bool:
    users = list(scores.users)
    shape, merged = (_shape(users[0]) if len(users) == 1 else None), _shape(scores)
    if shape is None or merged is None or users[0].target not in _MERGES or len(shape) != 4 \
            or not _same(shape[2:], merged[1:]):
        return False
    split = users[0]
    heads = shape[:2]
    bias, q3, kt3 = scores.args[:3]
    q4, k3 = _split(q3, heads), _transposed(kt3)
    k4 = _split(k3, heads)
    beta, alpha = scores.kwargs.get("beta", 1), scores.kwargs.get("alpha", 1)
    bias_shape = _shape(bias)
    if q4 is None or k4 is None or bias_shape is None or len(bias_shape) != 3 or not isinstance(heads[1], int):
        return False
    shared = str(bias_shape[0]) == "1"  # one bias for every batch row and head: it broadcasts as it is
    if not (shared or str(bias_shape[0]) == str(heads[0] * heads[1])):
        return False
    if not (isinstance(beta, (int, float)) and isinstance(alpha, (int, float))):
        return False
    if scores.meta["val"].dtype == torch.float16:
        return False
    with graph.inserting_before(split):
        out = _call(graph, split, aten.matmul.default, q4, _call(graph, split, aten.transpose.int, k4, -1, -2))
        if alpha != 1:
            out = _call(graph, split, aten.mul.Tensor, out, alpha)
        if beta != 0:
            term = bias if shared else _call(graph, split, aten.unflatten.int, bias, 0, [-1, heads[1]])
            if beta != 1:
                term = _call(graph, split, aten.mul.Tensor, term, beta)
            out = _call(graph, split, aten.add.Tensor, out, term)
    split.replace_all_uses_with(out)
    return True


def _values(graph: fx.Graph, product: fx.Node) -> bool:
    probs3, v3 = product.args[:2]
    shape = _shape(probs3.args[0]) if isinstance(probs3, fx.Node) and probs3.target in _MERGES else None
    if shape is None or len(shape) != 4:
        return False
    probs4, v4 = _split(probs3, shape[:2]), _split(v3, shape[:2])
    if probs4 is None or v4 is None:
        return False
    with graph.inserting_before(product):
        out = _call(graph, product, aten.flatten.using_ints,
                    _call(graph, product, aten.matmul.default, probs4, v4), 0, 1)
    product.replace_all_uses_with(out)
    return True


def split_merged_heads(gm: fx.GraphModule) -> int:
    """Rewrite every merged-heads score and value product in `gm` in place; returns how many (the old nodes are
    left for dead-code elimination)."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.baddbmm.default:
            changed += _scores(gm.graph, node)
        elif node.op == "call_function" and node.target == aten.bmm.default:
            changed += _values(gm.graph, node)
    return changed
