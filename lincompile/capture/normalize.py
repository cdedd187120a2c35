"""Canonicalize a captured graph before matching: drop runtime asserts, no-op casts, p=0 dropout, full slices.

Invariant: the graph computes the same values afterwards (only identities are removed).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, torch._assert}
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
_IDENTITIES = {aten.alias.default, aten.contiguous.default, aten.clone.default, aten.detach.default}
_DROPOUTS = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_tensor_type(a: object, b: object) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and a.layout == b.layout and a.shape == b.shape)


def _dropout_p(node: fx.Node) -> float | None:
    args = list(node.args) + [None, None]
    p = node.kwargs.get("p", args[1])
    train = node.kwargs.get("train", args[2])
    if train is False:
        return 0.0
    return float(p) if isinstance(p, (int, float)) else None


def _full_slice(node: fx.Node) -> bool:
    """`x[..., 0:END:1]` with END at least the int64 maximum's half: every element, in order (`x[:, :, None]`
    traces as an unsqueeze and such a slice when a dim is dynamic)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    start = node.kwargs.get("start", args[2])
    end = node.kwargs.get("end", args[3])
    step = node.kwargs.get("step", args[4])
    return start in (0, None) and step in (1, None) and (end is None or (isinstance(end, int) and end >= 1 << 62))


def normalize(gm: fx.GraphModule) -> int:
    """Remove identity nodes in place; returns how many nodes were removed."""
    graph = gm.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        replacement = None
        if target in _ASSERTS and not node.users:
            graph.erase_node(node)
            removed += 1
            continue
        if target in _CASTS or target in _IDENTITIES:
            src = node.args[0]
            if isinstance(src, fx.Node) and _same_tensor_type(_val(src), _val(node)):
                replacement = src
        elif target == aten.slice.Tensor and isinstance(node.args[0], fx.Node) and _full_slice(node):
            replacement = node.args[0]
        elif target in _DROPOUTS and _dropout_p(node) == 0.0:
            src = node.args[0]
            if target == aten.native_dropout.default:
                for user in list(node.users):
                    if user.target is operator.getitem and user.args[1] == 0:
                        user.replace_all_uses_with(src)
                continue
            replacement = src
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            removed += 1
    removed += eliminate_dead_code(gm)
    return removed


#: Ops fx calls impure only because they *may* draw random numbers (dropout inside attention);
#: with no users their results are unobservable, so dead copies may go.
_SEEDED_BUT_REMOVABLE = {aten.scaled_dot_product_attention.default, aten.dropout.default}


def _is_impure(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _SEEDED_BUT_REMOVABLE:
        return False
    return node.is_impure()


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Remove nodes without users (dead attention cores included); returns how many went."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.recompile()
    return before - len(gm.graph.nodes)
