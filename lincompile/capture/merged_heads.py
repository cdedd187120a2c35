"""Attention written with the heads merged into the batch (Bloom: 3-D `baddbmm` scores and `bmm` with V over
[B*H, T, d]; XGLM: `bmm` scores and a softmax over [B*H, T, S]), rewritten in its 4-D [B, H, T, d] form, which the
attention patterns read.

Local rewrites, each where every operand is a 4-D tensor with its first two dims merged, split the same way:
  view4(baddbmm(bias3, q3, k3^T, beta, alpha))  ->  alpha * (q4 @ k4^T) + beta * unflatten(bias3)
  view4(bmm(merge(q4), merge(k4)^T))            ->  q4 @ k4^T
  softmax(merge(x4), -1)                        ->  flatten(softmax(x4, -1), 0, 1)
  bmm(merge(p4), merge(v4))                     ->  flatten(p4 @ v4, 0, 1)
Invariant: the same values (one batched product of the same rows each way; a fused `baddbmm` may round its sum
differently in the last bit; a softmax reads each row alone), the same output shapes. fp16 `baddbmm` scores are
left alone: the unscaled product could overflow where the fused one, scaled before rounding, does not. The views
these leave behind (merge, then split back) are removed by `normalize`.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

_MERGES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}


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


def call_like(graph: fx.Graph, like: fx.Node, target: object, *args: object) -> fx.Node:
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
    """`baddbmm` (with its bias) or `bmm` scores, viewed 4-D by their only user."""
    users = list(scores.users)
    shape, merged = (_shape(users[0]) if len(users) == 1 else None), _shape(scores)
    if shape is None or merged is None or users[0].target not in _MERGES or len(shape) != 4 \
            or not _same(shape[2:], merged[1:]):
        return False
    split = users[0]
    heads = shape[:2]
    fused = scores.target == aten.baddbmm.default
    bias, q3, kt3 = scores.args[:3] if fused else (None, *scores.args[:2])
    q4, k3 = _split(q3, heads), _transposed(kt3)
    k4 = _split(k3, heads)
    beta, alpha = (scores.kwargs.get("beta", 1), scores.kwargs.get("alpha", 1)) if fused else (0, 1)
    if q4 is None or k4 is None or not isinstance(heads[1], int):
        return False
    if fused and not _fusable(bias, heads, beta, alpha, scores):
        return False
    shared = fused and str(_shape(bias)[0]) == "1"  # one bias for every batch row and head: broadcast as it is
    with graph.inserting_before(split):
        kt4 = call_like(graph, split, aten.transpose.int, k4, -1, -2)
        out = call_like(graph, split, aten.matmul.default, q4, kt4)
        if alpha != 1:
            out = call_like(graph, split, aten.mul.Tensor, out, alpha)
        if beta != 0:
            term = bias if shared else call_like(graph, split, aten.unflatten.int, bias, 0, [-1, heads[1]])
            if beta != 1:
                term = call_like(graph, split, aten.mul.Tensor, term, beta)
            out = call_like(graph, split, aten.add.Tensor, out, term)
    split.replace_all_uses_with(out)
    return True


def _fusable(bias: object, heads: tuple, beta: object, alpha: object, scores: fx.Node) -> bool:
    """A `baddbmm`'s bias is [B*H or 1, ., S], its factors are numbers, its scores are not fp16."""
    bias_shape = _shape(bias)
    if bias_shape is None or len(bias_shape) != 3:
        return False
    if not (str(bias_shape[0]) == "1" or str(bias_shape[0]) == str(heads[0] * heads[1])):
        return False
    if not (isinstance(beta, (int, float)) and isinstance(alpha, (int, float))):
        return False
    return scores.meta["val"].dtype != torch.float16


def _softmax(graph: fx.Graph, node: fx.Node) -> bool:
    """A softmax over the last dim of merged 4-D scores."""
    merged = node.args[0]
    source_shape = _shape(merged.args[0]) if isinstance(merged, fx.Node) and merged.target in _MERGES else None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if source_shape is None or len(source_shape) != 4 or dim not in (-1, 2) or node.kwargs:
        return False
    scores4 = _split(merged, source_shape[:2])
    if scores4 is None:
        return False
    with graph.inserting_before(node):
        probs = call_like(graph, node, node.target, scores4, -1, *node.args[2:])
        out = call_like(graph, node, aten.flatten.using_ints, probs, 0, 1)
    node.replace_all_uses_with(out)
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
        out = call_like(graph, product, aten.flatten.using_ints,
                        call_like(graph, product, aten.matmul.default, probs4, v4), 0, 1)
    product.replace_all_uses_with(out)
    return True


def split_merged_heads(gm: fx.GraphModule) -> int:
    """Rewrite every merged-heads score product, softmax and value product in `gm` in place; returns how many (the
    old nodes are left for dead-code elimination)."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.baddbmm.default:
            changed += _scores(gm.graph, node)
        elif node.op == "call_function" and node.target == aten.bmm.default:
            changed += _values(gm.graph, node) or _scores(gm.graph, node)
        elif node.op == "call_function" and node.target in _SOFTMAXES:
            changed += _softmax(gm.graph, node)
    return changed
