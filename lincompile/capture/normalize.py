"""Canonicalize a captured graph before matching: drop runtime asserts, no-op casts, p=0 dropout, full slices;
make in-place arithmetic on a private temporary (MPNet's `scores += position_bias`) out-of-place; write attention
with heads merged into the batch (Bloom, XGLM) in its 4-D form (`merged_heads`), and drop the view round trips
that leaves; split a permute that moves heads and transposes keys at once (OpenAI GPT's K) into those two; write
`x @ W.T` of a weight attribute W (Falcon's linear layers) as the linear layer it is.

Invariant: the graph computes the same values afterwards, in the same memory layouts (only identities are removed:
a `contiguous` or copy that changes strides stays, since a later `view` may need them, and so does a copy that an
in-place op writes, or whose source one writes); a merged-heads product may round its last bit differently (see
`merged_heads`).
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lincompile.capture.merged_heads import call_like, split_merged_heads

aten = torch.ops.aten

_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, torch._assert}
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
_IDENTITIES = {aten.alias.default, aten.contiguous.default, aten.clone.default, aten.detach.default}
#: Ops that return a new tensor even when it equals their input (the others above return the input itself then).
_COPIES = {aten.clone.default, aten._to_copy.default}
_DROPOUTS = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}
_IN_PLACE = {aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor, aten.mul_.Tensor: aten.mul.Tensor,
             aten.div_.Tensor: aten.div.Tensor, aten.masked_fill_.Scalar: aten.masked_fill.Scalar}


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_tensor_type(a: object, b: object) -> bool:
    """Same dtype, device, layout, shape and strides (symbolic ones only where provably equal)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and a.layout == b.layout and a.shape == b.shape
            and len(a.stride()) == len(b.stride())
            and all(statically_known_true(x == y) for x, y in zip(a.stride(), b.stride())))


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


#: Ops whose schema declares no alias but which may return their input itself.
_MAY_RETURN_SELF = {aten.type_as.default, aten.resolve_conj.default, aten.resolve_neg.default}


def _private_temporary(node: object, user: fx.Node) -> bool:
    """`node` is a fresh tensor (an op's own result, not a view or an input) that only `user` reads: mutating it in
    place or computing a new one is the same to the rest of the graph."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or list(node.users) != [user]:
        return False
    schema = getattr(node.target, "_schema", None)
    return (schema is not None and len(schema.returns) == 1 and schema.returns[0].alias_info is None
            and node.target not in _MAY_RETURN_SELF)


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None


def _aliasing(node: fx.Node) -> bool:
    """`node` may share memory with its first argument: a view op, or an item of a multi-output one (`split`,
    `chunk`, `unbind` hand out their views through `getitem`; counted for every op, which only keeps more)."""
    return node.op == "call_function" and (node.target is operator.getitem or _is_view(node))


def _written(node: fx.Node) -> bool:
    """Whether an op that mutates (any of its arguments) reads `node` or a tensor sharing its memory: a view of
    it, or what it is a view of, transitively."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        seen.add(current)
        if _aliasing(current) and current.args:
            todo.append(current.args[0])
        for user in current.users:
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return True
            if _aliasing(user):
                todo.append(user)
    return False


def _same_out_of_place(node: fx.Node) -> bool:
    """The out-of-place form of in-place `node` gives its result's dtype and shape (an in-place op keeps its
    input's; the out-of-place one may promote, e.g. fp16 += fp32, or broadcast)."""
    self_val, out_val = _val(node.args[0]), _val(node)
    others = [_val(a) if isinstance(a, fx.Node) else a for a in node.args[1:]]
    if self_val is None or out_val is None or any(o is None for o in others):
        return False
    tensors = [o for o in others if isinstance(o, torch.Tensor)]
    if node.target == aten.masked_fill_.Scalar:
        dtype = self_val.dtype
    else:
        dtype = torch.result_type(self_val, others[0])
    shape = torch.broadcast_shapes(self_val.shape, *(t.shape for t in tensors))
    return dtype == out_val.dtype and shape == out_val.shape


def _out_of_place(node: fx.Node) -> bool:
    """Make in-place arithmetic on a private temporary out-of-place when that gives the same result; whether it did."""
    if (node.op == "call_function" and node.target in _IN_PLACE and _private_temporary(node.args[0], node)
            and _same_out_of_place(node)):
        node.target = _IN_PLACE[node.target]
        return True
    return False


def _transposed_weight(node: object) -> fx.Node | None:
    """W for `W.T` (`t`, `numpy_T`, `transpose(0, 1)`, `permute([1, 0])`) of a 2-D floating weight attribute W:
    `matmul(x, W.T)` is `linear(x, W)`, which computes exactly that without a bias."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    args = list(node.args[1:])
    if not (node.target in (aten.t.default, aten.numpy_T.default)
            or (node.target == aten.transpose.int and sorted(a % 2 for a in args) == [0, 1])
            or (node.target == aten.permute.default and [d % 2 for d in args[0]] == [1, 0])):
        return None
    weight = node.args[0]
    value = _val(weight)
    if (isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(value, torch.Tensor)
            and value.dim() == 2 and value.is_floating_point()):
        return weight
    return None


def normalize(gm: fx.GraphModule) -> int:
    """Canonicalize `gm` in place; returns how many nodes were removed or rewritten."""
    graph = gm.graph
    changed = 0
    for node in list(graph.nodes):  # first, so that a copy only this arithmetic wrote is no longer written
        if _out_of_place(node):
            changed += 1
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        replacement = None
        if _out_of_place(node):  # again, now that no-op casts before it are gone (`s.float()` then `s += bias`)
            changed += 1
            continue
        if target in _ASSERTS and not node.users:
            graph.erase_node(node)
            changed += 1
            continue
        if target in _CASTS or target in _IDENTITIES:
            src = node.args[0]
            if (isinstance(src, fx.Node) and _same_tensor_type(_val(src), _val(node))
                    and not (target in _COPIES and (_written(node) or _written(src)))):
                replacement = src
        elif target == aten.slice.Tensor and isinstance(node.args[0], fx.Node) and _full_slice(node):
            replacement = node.args[0]
        elif (target == aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 3, 1]
              and isinstance(_val(node.args[0]), torch.Tensor)):
            with graph.inserting_before(node):  # keys split into heads and transposed at once (OpenAI GPT's)
                heads = call_like(graph, node, aten.permute.default, node.args[0], [0, 2, 1, 3])
                replacement = call_like(graph, node, aten.transpose.int, heads, 2, 3)
        elif target == aten.matmul.default and (weight := _transposed_weight(node.args[1])) is not None:
            with graph.inserting_before(node):  # Falcon's `x @ self.weight.T`: a linear layer, so found as one
                replacement = call_like(graph, node, aten.linear.default, node.args[0], weight)
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
            changed += 1
    changed += split_merged_heads(gm)
    changed += _view_round_trips(gm.graph)
    changed += eliminate_dead_code(gm)
    return changed


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_RESHAPES = _VIEWS | {aten.flatten.using_ints, aten.unflatten.int}


def _view_round_trips(graph: fx.Graph) -> int:
    """`view(reshape(x))` that gives back x's shape and strides is x (a merge, then a split back: what the
    merged-heads rewrite leaves between a 4-D op and its 4-D user)."""
    changed = 0
    for node in list(graph.nodes):
        inner = node.args[0] if node.op == "call_function" and node.target in _VIEWS else None
        if isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in _RESHAPES:
            source = inner.args[0]
            if isinstance(source, fx.Node) and _same_tensor_type(_val(source), _val(node)):
                node.replace_all_uses_with(source)
                changed += 1
    return changed


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
