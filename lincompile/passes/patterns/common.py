"""Small graph-walking helpers shared by the attention patterns."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

#: Ops that do not change values (after normalization these are rare, but models still emit them).
PASS_THROUGH = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default}
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}


@dataclass
class SiteMatch:
    """What one pattern found: the nodes a rewrite needs, before mask classification."""

    form: str
    output: fx.Node                 # node whose uses the rewrite takes over, [B, H, T, Dv]
    q: fx.Node                      # [B, H, T, Dk] (after RoPE, scaled if the model scaled q)
    k: fx.Node                      # [B, Hkv, S, Dk] (GQA expansion stripped)
    v: fx.Node                      # [B, Hkv, S, Dv]
    kv_groups: int
    scale: float
    #: (node, kind, coefficient): kind is "additive" (score += coefficient * node), "allow_bool"
    #: (keep where True), "allow_01" (keep where 1, drop where 0: a float mask multiplied in) or "deny_bool"
    #: (drop where True).
    mask_terms: list[tuple[fx.Node, str, float]]
    is_causal: bool                 # causal by flag (sdpa is_causal=True), independent of `mask`
    dropout_p: float
    nodes: list[fx.Node]            # the nodes of the attention core, for pictures and reports
    softcap: float = 0.0            # scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2); 0: none
    sinks: str | None = None        # target of the [heads] attention-sink logits parameter (GPT-OSS); None: none
    #: queries the model multiplied by a constant before attention (OPT, XGLM, BART: q_proj(x) * scaling): the
    #: queries before the constant, then the layout moves down to `q`; `scale` includes the constant, and the
    #: rewrite feeds the op those moves of the unscaled queries, so a feature map sees the same queries whichever
    #: way a model scales its scores (keys a model scales keep their constant: no model seen does)
    q_scaled: tuple[fx.Node, ...] = ()


def val(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def strip(node: fx.Node, ops: set) -> fx.Node:
    """Follow `node` back through value-preserving ops in `ops`."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops:
        node = node.args[0]
    return node


def strip_gqa(node: fx.Node) -> tuple[fx.Node, int]:
    """Undo GQA head expansion: `unsqueeze(2) -> expand -> reshape` or `repeat_interleave(dim=1)`.

    Returns the un-expanded [B, Hkv, S, D] node and the group count (1 when there is no expansion).
    """
    node = strip(node, PASS_THROUGH)
    if node.op == "call_function" and node.target in (aten.reshape.default, aten.view.default,
                                                      aten._unsafe_view.default):
        expand = strip(node.args[0], PASS_THROUGH)
        if expand.op == "call_function" and expand.target == aten.expand.default:
            unsq = strip(expand.args[0], PASS_THROUGH)
            if unsq.op == "call_function" and unsq.target == aten.unsqueeze.default and unsq.args[1] == 2:
                base = unsq.args[0]
                base_val, out_val = val(base), val(node)
                if base_val is not None and out_val is not None and base_val.dim() == 4:
                    groups = out_val.shape[1] // base_val.shape[1]
                    return base, int(groups)
    if node.op == "call_function" and node.target in (aten.repeat_interleave.self_int,):
        base, repeats = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim == 1 and isinstance(repeats, int):
            return base, repeats
    return node, 1


def is_transpose_last2(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target == aten.transpose.int:
        dims = {d % 4 for d in node.args[1:3]}
        return dims == {2, 3}
    if node.target == aten.permute.default:
        perm = [d % 4 for d in node.args[1]]
        return perm == [0, 1, 3, 2]
    return False


def depends_on(node: fx.Node, targets: set[fx.Node]) -> bool:
    """True when any of `targets` is an ancestor of (or is) `node`."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if cur in targets:
            return True
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(n for n in cur.all_input_nodes)
    return False


def module_path(node: fx.Node) -> str:
    """The innermost module path from `nn_module_stack`, e.g. `model.layers.0.self_attn`."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "?"
    path, _cls = list(stack.values())[-1]
    return str(path)
