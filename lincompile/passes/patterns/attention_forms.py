"""One function per attention form, named after what it matches.

- `sdpa_op`: `aten.scaled_dot_product_attention` with a bool or additive mask, `is_causal`, `scale`,
  `enable_gqa`, dropout.
- `eager_matmul_softmax`: `matmul(q, k^T)`, scaled by `mul`/`div` (or unscaled), optionally softcapped
  (`c * tanh(s / c)`, Gemma 2), masked by additive terms, `where` or `masked_fill`, optionally joined by
  attention sinks (a per-head parameter column, dropped after the softmax: GPT-OSS) and shifted by the row max,
  softmax (fp32 round trips allowed), dropout, `matmul(., v)`.

Each returns a `SiteMatch`, or a string saying why a softmax that looks like attention did not match,
or None when the node is not attention at all.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from lincompile.passes.patterns.common import (CASTS, PASS_THROUGH, SiteMatch, is_transpose_last2, strip,
                                               strip_gqa, val)

aten = torch.ops.aten

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
DROPOUT_OPS = {aten.dropout.default}
#: A score at or below this (once scaled as the softmax sees it) masks its key: exp(-1e4) is 0 in fp32 and fp16.
#: Models mask with -1e4 (BERT's `(1 - mask) * -10000`), -1e9 or the dtype's minimum.
MASKED = -1e4
SDPA_OPS = {aten.scaled_dot_product_attention.default}
#: Fused attention ops we know but do not rewrite: found, reported as unmatched.
OTHER_FUSED_ATTENTION = {
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _sdpa_arg(node: fx.Node, name: str) -> object:
    index = _SDPA_ARGS.index(name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, _SDPA_DEFAULTS.get(name))


def sdpa_op(node: fx.Node) -> SiteMatch | str | None:
    """`aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`."""
    if node.op != "call_function":
        return None
    if node.target in OTHER_FUSED_ATTENTION:
        return f"fused attention op {node.target} is not rewritten; export with attn_implementation='sdpa' or 'eager'"
    if node.target not in SDPA_OPS:
        return None
    q, k, v = (_sdpa_arg(node, n) for n in ("query", "key", "value"))
    qv, kv_, vv = val(q), val(k), val(v)
    if qv is None or kv_ is None or vv is None or qv.dim() != 4 or kv_.dim() != 4:
        return "scaled_dot_product_attention on inputs that are not 4-D [batch, heads, tokens, dim]"
    k_base, groups = strip_gqa(k)
    v_base, v_groups = strip_gqa(v)
    if groups != v_groups:
        k_base, v_base, groups = k, v, 1
    if _sdpa_arg(node, "enable_gqa"):
        groups = qv.shape[1] // kv_.shape[1]
    scale = _sdpa_arg(node, "scale")
    scale = 1.0 / math.sqrt(qv.shape[-1]) if scale is None else float(scale)
    mask = _sdpa_arg(node, "attn_mask")
    terms = []
    if isinstance(mask, fx.Node):
        mask_val = val(mask)
        kind = "allow_bool" if mask_val is not None and mask_val.dtype == torch.bool else "additive"
        terms.append((mask, kind, 1.0))
    q_scaled, scale = prescaled(q, scale)
    return SiteMatch(
        form="sdpa_op", output=node, q=q, k=k_base, v=v_base, kv_groups=int(groups), scale=scale, q_scaled=q_scaled,
        mask_terms=terms,
        is_causal=bool(_sdpa_arg(node, "is_causal")), dropout_p=float(_sdpa_arg(node, "dropout_p") or 0.0),
        nodes=[node],
    )


def _scalar(node: object) -> float | None:
    """A Python number, or a 0-d `full`/`scalar_tensor` node holding one."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, fx.Node) and node.op == "call_function":
        if node.target == aten.full.default and list(node.args[0]) == [] and isinstance(node.args[1], (int, float)):
            return float(node.args[1])
        if node.target == aten.scalar_tensor.default and isinstance(node.args[0], (int, float)):
            return float(node.args[0])
        if node.target in CASTS | PASS_THROUGH:
            return _scalar(node.args[0])
    return None


#: Moves that keep every value of a tensor (and so commute with multiplying it by a constant).
_QUERY_MOVES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
                aten.permute.default, aten.unsqueeze.default, aten.unflatten.int,
                aten.flatten.using_ints} | PASS_THROUGH


def prescaled(q: fx.Node, scale: float) -> tuple[tuple[fx.Node, ...], float]:
    """(`SiteMatch.q_scaled`, the scale with its constant) when `q` is queries x multiplied (or divided) by a
    constant and then only moved, each node used by the next alone; else ((), scale)."""
    chain = [q]
    node = q
    while node.op == "call_function" and node.target in _QUERY_MOVES and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        if len(node.users) != 1:
            return (), scale
        chain.append(node)
    if node.op != "call_function" or node.target not in (aten.mul.Tensor, aten.div.Tensor) or len(node.args) != 2:
        return (), scale
    x, c = node.args[0], _scalar(node.args[1])
    if c is None and node.target == aten.mul.Tensor:
        x, c = node.args[1], _scalar(node.args[0])
    if c is None or c == 0 or node.kwargs or not isinstance(x, fx.Node) or val(x) is None:
        return (), scale
    return (x, *reversed(chain[:-1])), scale * (c if node.target == aten.mul.Tensor else 1.0 / c)


def _softcapped(node: object, cap: float) -> fx.Node | None:
    """The scores s of `tanh(s / cap)` (or `tanh(s * (1 / cap))`), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.tanh.default):
        return None
    inner = node.args[0]
    if not (isinstance(inner, fx.Node) and inner.op == "call_function"):
        return None
    c = _scalar(inner.args[1]) if len(inner.args) > 1 else None
    if not c or not cap:
        return None
    if inner.target in (aten.div.Tensor, aten.div.Scalar) and math.isclose(c, cap, rel_tol=1e-6):
        return inner.args[0]
    if inner.target in (aten.mul.Tensor, aten.mul.Scalar) and math.isclose(c * cap, 1.0, rel_tol=1e-6):
        return inner.args[0]
    return None


def _walk_scores(node: object, scale: float, terms: list, path: list[fx.Node],
                 softcap: list[float]) -> tuple[fx.Node, float] | None:
    """From a softmax input back to the q.k^T product, collecting scale factors, mask terms and a softcap (appended
    to `softcap`; only where nothing scaled the capped scores afterwards and no mask term lies under the cap, since
    the op applies masks after it). A failed walk may leave nodes on `path` (callers that try another branch cut
    it back) but leaves `terms` and `softcap` as it found them."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    path.append(node)
    target = node.target
    if target in MATMUL_OPS:
        return node, scale
    if target in CASTS or target in PASS_THROUGH:
        return _walk_scores(node.args[0], scale, terms, path, softcap)
    if target in (aten.mul.Tensor, aten.mul.Scalar):
        for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            c = _scalar(b)
            capped = _softcapped(a, c) if c is not None and scale == 1.0 and not softcap else None
            if capped is not None:
                marks = len(path), len(terms)
                softcap.append(abs(c))  # c tanh(s / c) is |c| tanh(s / |c|)
                path.extend([a, a.args[0]])
                found = _walk_scores(capped, scale, terms, path, softcap)
                if found is None or len(terms) != marks[1]:
                    softcap.pop()
                    del path[marks[0]:], terms[marks[1]:]
                    return None
                return found
            if c is not None:
                return _walk_scores(a, scale * c, terms, path, softcap)
        return None
    if target in (aten.div.Tensor, aten.div.Scalar):
        c = _scalar(node.args[1])
        return None if c is None or c == 0 else _walk_scores(node.args[0], scale / c, terms, path, softcap)
    alpha = node.kwargs.get("alpha", 1) if target == aten.add.Tensor else 1  # add(a, b, alpha=c) is a + c b
    if target == aten.add.Tensor and alpha == 1 and (kept := _kept_by_product(node)) is not None:
        scores, mask, spelling = kept
        path.extend(spelling)
        found = _walk_scores(scores, scale, terms, path, softcap)
        if found is not None:
            terms.append((mask, "allow_01", 1.0))
        return found
    if target == aten.add.Tensor:
        marks = len(path), len(terms), len(softcap)
        for (a, a_scale), (b, b_scale) in (((node.args[0], scale), (node.args[1], scale * alpha)),
                                           ((node.args[1], scale * alpha), (node.args[0], scale))):
            found = _walk_scores(a, a_scale, terms, path, softcap)
            if found is not None:
                if isinstance(b, fx.Node):
                    terms.append((b, "additive", b_scale))
                return found
            del path[marks[0]:], terms[marks[1]:], softcap[marks[2]:]
        return None
    if target in (aten.where.self, aten.where.ScalarOther) and _masking(node.args[2]):
        found = _walk_scores(node.args[1], scale, terms, path, softcap)
        if found is not None:
            terms.append((node.args[0], "allow_bool", 1.0))
        return found
    if target in (aten.max.other, aten.maximum.default, aten.clamp_min.default) and _lowest(node.args[1], node):
        return _walk_scores(node.args[0], scale, terms, path, softcap)
    if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and _masking(node.args[2]):
        found = _walk_scores(node.args[0], scale, terms, path, softcap)
        if found is not None:
            terms.append((node.args[1], "deny_bool", 1.0))
        return found
    return None


def _masking(fill: object) -> bool:
    """Whether scores replaced by `fill` can be a mask: unless `fill` is a number above -1e4 (a fill of 0, say,
    keeps weight exp(0) for the key; a tensor fill is taken for the mask value models write)."""
    c = _scalar(fill)
    return c is None or c <= MASKED


def _kept_by_product(node: fx.Node) -> tuple[object, fx.Node, list[fx.Node]] | None:
    """(scores, m, the nodes that spell it) for `scores * m + c * (1 - m)` with c <= -1e4: OpenAI GPT's causal mask,
    where(m, scores, c) if m holds only 0 and 1 (a term "allow_01": the probe checks that)."""
    for product, partner in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not (_is_call(product, aten.mul.Tensor) and _is_call(partner, aten.mul.Tensor, aten.mul.Scalar)):
            continue
        for complement, c in ((partner.args[0], partner.args[1]), (partner.args[1], partner.args[0])):
            c = _scalar(c)
            if c is None or c > MASKED or not _is_call(complement, aten.rsub.Scalar):
                continue
            if _scalar(complement.args[1]) != 1.0 or complement.kwargs.get("alpha", 1) != 1 or len(complement.args) > 2:
                continue
            for scores, mask in ((product.args[0], product.args[1]), (product.args[1], product.args[0])):
                if mask is complement.args[0]:
                    return scores, mask, [product, partner, complement]
    return None


def _lowest(bound: object, clamped: fx.Node) -> bool:
    """`bound` is the lowest finite value of `clamped`'s dtype: raising scores to it (XGLM's `max(scores,
    finfo.min)`) changes only -inf ones, whose keys keep weight 0 unless every key of the row is masked."""
    c, value = _scalar(bound), val(clamped)
    return c is not None and value is not None and value.dtype.is_floating_point and c <= torch.finfo(value.dtype).min


def _is_call(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _last_dim(node: fx.Node, dim: object) -> bool:
    value = val(node)
    return value is not None and dim in (-1, value.dim() - 1)


def _row_max(node: object, of: fx.Node) -> bool:
    """`node` is the max of `of` over its last dim, kept: `max.dim(of, -1, True)[0]` or `amax(of, [-1], True)`."""
    if _is_call(node, operator.getitem) and node.args[1] == 0 and _is_call(node.args[0], aten.max.dim):
        source, dim, *keep = node.args[0].args
        return source is of and _last_dim(of, dim) and bool(keep and keep[0])
    if _is_call(node, aten.amax.default):
        source, dims, *keep = node.args
        return source is of and len(dims) == 1 and _last_dim(of, dims[0]) and bool(keep and keep[0])
    return False


def _parameter(node: object) -> fx.Node | None:
    """The `get_attr` a per-head column is broadcast from (through views, expands and casts), else None."""
    while _is_call(node, aten.expand.default, aten.reshape.default, aten.view.default, aten.unsqueeze.default,
                   *CASTS):
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _peel_sinks(node: object, path: list[fx.Node]) -> tuple[object, str | None]:
    """The scores under a softmax input: `x - rowmax(x)` is `x` (softmax ignores the shift), and `cat([scores,
    column], -1)` with a one-column broadcast of a parameter is `scores` plus attention sinks (GPT-OSS); returns
    (scores, the sink parameter's target or None)."""
    while _is_call(node, *CASTS):
        path.append(node)
        node = node.args[0]
    if _is_call(node, aten.sub.Tensor) and _row_max(node.args[1], node.args[0]):
        path.append(node)
        node = node.args[0]
    cat_dim = node.args[1] if _is_call(node, aten.cat.default) and len(node.args) > 1 else 0
    if _is_call(node, aten.cat.default) and len(node.args[0]) == 2 and _last_dim(node, cat_dim):
        scores, column = node.args[0]
        sinks = _parameter(column)
        if sinks is not None and val(column) is not None and val(column).shape[-1] == 1:
            path.append(node)
            return scores, str(sinks.target)
    return node, None


def _dropped_sink(node: fx.Node, probs: fx.Node) -> bool:
    """`node` keeps every column of `probs` but its last: the sinks' (`probs[..., :-1]`, or `[..., :n]` for the n
    columns of scores, n static or symbolic)."""
    if not _is_call(node, aten.slice.Tensor) or node.args[0] is not probs or val(probs) is None:
        return False
    dim, start, end = (list(node.args[1:4]) + [None] * 3)[:3]
    end = end.meta.get("val") if isinstance(end, fx.Node) else end
    last = (isinstance(end, int) and end == -1) or str(end) == str(val(probs).shape[-1] - 1)
    return _last_dim(probs, dim) and start in (0, None) and last


def _follow_probs(node: fx.Node, path: list[fx.Node], sinks: bool = False) -> tuple[fx.Node, float] | str:
    """From the softmax output forward to `matmul(probs, v)` (with `sinks`, through the slice that drops the sinks'
    column first); returns it and the dropout p."""
    while sinks:
        users = list(node.users)
        if len(users) == 1 and _is_call(users[0], *CASTS):
            node = users[0]
            path.append(node)
            continue
        if len(users) != 1 or not _dropped_sink(users[0], node):
            return "softmax over scores and attention sinks whose sink column is not dropped ([..., :-1])"
        node = users[0]
        path.append(node)
        break
    dropout_p = 0.0
    while True:
        users = list(node.users)
        if len(users) != 1:
            return "the attention probabilities are used more than once (output_attentions?)"
        user = users[0]
        path.append(user)
        if user.target in CASTS or user.target in PASS_THROUGH:
            node = user
        elif user.target in DROPOUT_OPS:
            p = user.args[1] if len(user.args) > 1 else user.kwargs.get("p", 0.0)
            dropout_p = float(p) if isinstance(p, (int, float)) else 0.0
            node = user
        elif user.target in MATMUL_OPS and user.args[0] is node:
            return user, dropout_p
        else:
            return f"softmax output flows into {user.target}, not into a matmul with V"


def eager_matmul_softmax(node: fx.Node) -> SiteMatch | str | None:
    """softmax(scale * q @ k^T + mask) [dropout] @ v, in any of the common spellings."""
    if node.op != "call_function" or node.target not in SOFTMAX_OPS:
        return None
    scores_in = node.args[0]
    sval = val(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    terms: list = []
    path: list[fx.Node] = []
    softcap: list[float] = []
    scores_in, sinks = _peel_sinks(scores_in, path)
    found = _walk_scores(scores_in, 1.0, terms, path, softcap)
    if found is None:
        if _looks_like_scores(scores_in):
            return "softmax over q.k^T-like scores, but the score chain has an op this matcher does not know"
        return None
    qk, scale = found
    if sval is None or sval.dim() != 4 or dim not in (-1, 3):
        return "softmax over q.k^T, but not over the last dim of a 4-D [batch, heads, q, k] tensor"
    q, k_t = qk.args[0], qk.args[1]
    k_t = strip(k_t, PASS_THROUGH)
    if not is_transpose_last2(k_t):
        return "q.k^T product whose right operand is not a transpose of K"
    pv = _follow_probs(node, path, sinks is not None)
    if isinstance(pv, str):
        return pv
    pv_node, dropout_p = pv
    k_base, groups = strip_gqa(k_t.args[0])
    v_base, v_groups = strip_gqa(pv_node.args[1])
    if groups != v_groups:
        k_base, v_base, groups = k_t.args[0], pv_node.args[1], 1
    if any(val(n) is None or val(n).dim() != 4 for n in (q, k_base, v_base, pv_node)):
        return "attention on tensors that are not 4-D [batch, heads, tokens, dim]"
    q_scaled, scale = prescaled(q, scale)
    return SiteMatch(
        form="eager_matmul_softmax", output=pv_node, q=q, k=k_base, v=v_base, kv_groups=int(groups),
        scale=scale, q_scaled=q_scaled, mask_terms=terms, is_causal=False, dropout_p=dropout_p, nodes=[qk, *path],
        softcap=softcap[0] if softcap else 0.0, sinks=sinks,
    )


def _looks_like_scores(node: object, depth: int = 6) -> bool:
    """A product of two activations (not a layer's weight) within a few ops upstream."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for cur in frontier:
            if not isinstance(cur, fx.Node) or cur.op != "call_function":
                continue
            if cur.target in MATMUL_OPS or cur.target in (aten.einsum.default, aten.baddbmm.default):
                operands = {aten.einsum.default: cur.args[1], aten.baddbmm.default: cur.args[1:3]}.get(
                    cur.target, cur.args[:2])
                if all(isinstance(o, fx.Node) and o.op == "call_function" for o in operands):
                    return True
            nxt.extend(cur.all_input_nodes)
        frontier = nxt
    return False


PATTERNS = (sdpa_op, eager_matmul_softmax)
