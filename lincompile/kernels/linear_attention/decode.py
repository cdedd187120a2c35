"""One decode token of a linear method in few ops: the fast form of `reference.recurrent` for a single token.

It applies (`applies`) when every row of the batch is a real token (no padding row). When every row is also at
the same position (batch-1 decoding, or a batch decoded in step), the token's group slot s = p % G is a number,
not a per-row tensor, so
  - the group-buffer write is one indexed copy (the reference selects over every slot with a mask),
  - the local branch and phi of the buffer's keys read only slots 0..s, the ones filled (no masks),
  - the group is folded only when s = G - 1, without reading a flag from the device.
Rows at different positions (a left-padded batch after its prompt) write their slots with one scatter, the local
branch reads every slot masked to each row's filled ones, and groups fold only in a step where some row completes
one. Either way phi of the buffer's keys is computed only where it is read (the reference computes it every token)
and nothing selects between a real row's update and a padding row's unchanged state.
The math is `recurrent_linear`'s, branch for branch (same outputs and state, to rounding: sums over fewer
terms may round differently); tests/kernels/test_decode.py checks every causal linear method against it.
The registry's `recurrent-step` runs the reference for calls this form does not take.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from lincompile.kernels.linear_attention.reference_linear import acc_parts, grouped_alpha
from lincompile.kernels.linear_attention.reference_recurrent import buffer_features, fold_completed_group
from lincompile.kernels.linear_attention.state import accumulation_dtype, cast, pack_state
from lincompile.methods.feature_maps import denominator_eps, features, local_kernel
from lincompile.methods.params import named_params
from lincompile.methods.spec import MethodSpec


def applies(q: Tensor, key_mask: Tensor | None, state: list[Tensor], spec: MethodSpec, causal: bool) -> bool:
    """Whether `step` serves this call: one causal token of a causal linear method, a state given, every row a
    real token. Reads the mask (a sync on a GPU); tracing tensors have no values, nor may a CUDA graph's capture
    read them, so there this is False (as for a mask that is not [B, 1]: the reference checks and refuses it)."""
    if not (causal and q.shape[2] == 1 and spec.kind == "linear" and spec.causal_safe and state):
        return False
    if is_fake(q):  # a call's tensors are all real or all tracing ones
        return False
    if q.is_cuda and torch.cuda.is_current_stream_capturing():  # a CUDA graph being captured may not read values
        return False
    return key_mask is None or (key_mask.shape == (q.shape[0], 1) and bool(key_mask.all()))


def step(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], params: list[Tensor], spec: MethodSpec,
         scale: float) -> tuple[Tensor, list[Tensor]]:
    """(out [B, H, 1, dv] in q's dtype, new state) for one real token per row (`applies` checks that). Reads the
    position counter (a sync on a GPU). Never modifies `state`."""
    batch, heads, _, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[3]
    groups = heads // kv_heads
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    parts = acc_parts(spec, state, acc)
    pos = parts["position"] if "position" in parts else torch.zeros(batch, dtype=torch.int64, device=q.device)
    here = pos[:, None]
    qi = cast(q, acc).reshape(batch, kv_heads, groups, 1, dk)
    ki, vi = cast(k, acc), cast(v, acc)  # [B, Hkv, 1, d]
    fq = features(qi, spec, named, here, scale, query=True)[:, :, :, 0]  # [B, Hkv, g, F]
    num: Tensor | None = None  # kernel-weighted values (global and kernel-local branches)
    den: Tensor | None = None  # their weights' sum (normalizer="denominator")
    out: Tensor | None = None  # softmax-local output (normalized on its own)
    if spec.global_branch == "inclusive":
        num, den = _inclusive(spec, named, parts, fq, ki, vi, here, scale)
    position = None  # every row's, when they share it (a number, not a tensor): for group buffers and alpha
    if spec.uses_groups and (batch == 1 or bool((pos == pos[0]).all())):
        position = int(pos[0])
    if spec.global_branch == "grouped":
        alpha = grouped_alpha(spec, named["alpha"], pos if position is None else position)  # [B, 1, 1] or a scalar
        num = alpha[..., None] * (fq @ parts["state"])
        if "normalizer" in parts:
            den = alpha * (fq @ parts["normalizer"][..., None])[..., 0]
    if spec.uses_groups and position is not None:
        num, den, out = _group(spec, named, parts, qi, fq, ki, vi, position, num, den, scale)
    elif spec.uses_groups:
        num, den, out = _group_rows(spec, named, parts, qi, fq, ki, vi, pos, num, den, scale)
    out = combine(spec, num, den, out)
    if spec.conv != "none":
        out = out + _conv(spec, named, parts, vi, kv_heads, groups)
    if spec.uses_positions:
        parts["position"] = pos + 1
    return cast(out.reshape(batch, heads, 1, dv), q.dtype), pack_state(spec, parts)


def combine(spec: MethodSpec, num: Tensor | None, den: Tensor | None, out: Tensor | None) -> Tensor | None:
    """The kernel-weighted values `num` (over their weight sum `den` when normalized) plus the softmax-local output
    `out`; either may be None (that branch is absent)."""
    if num is None:
        return out
    if spec.normalizer == "denominator":
        num = num / den.clamp_min(denominator_eps(spec))[..., None]
    return num if out is None else out + num


def _inclusive(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], fq: Tensor, ki: Tensor,
               vi: Tensor, here: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """Absorb the token into S (and z), decayed first; returns phi(q) S and phi(q) z with the token in."""
    fk = features(ki[:, :, None], spec, named, here, scale)[:, :, 0]  # [B, Hkv, 1, F]
    s, z = parts["state"], parts.get("normalizer")
    if spec.decay:
        gamma = torch.exp(F.logsigmoid(named["decay"]))[None, :, None]  # [1, Hkv, 1]
        s = s * gamma[..., None]
        z = None if z is None else z * gamma
    parts["state"] = s = s + fk.transpose(-1, -2) * vi
    num, den = fq @ s, None
    if z is not None:
        parts["normalizer"] = z = z + fk[:, :, 0]
        den = (fq @ z[..., None])[..., 0]
    return num, den


def _group(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], qi: Tensor, fq: Tensor,
           ki: Tensor, vi: Tensor, position: int, num: Tensor | None, den: Tensor | None,
           scale: float) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Write the token into its buffer slot, run the local branch over slots 0..slot, fold a completed group
    into S (after the global branch read it) and clear the buffer; returns (num, den, softmax-local out)."""
    size = spec.group_size
    slot = position % size
    group_keys, group_values = parts["group_keys"].clone(), parts["group_values"].clone()
    group_keys[:, :, slot] = ki[:, :, 0]
    group_values[:, :, slot] = vi[:, :, 0]
    keys, values = group_keys[:, :, :slot + 1], group_values[:, :, :slot + 1]
    complete = slot == size - 1
    fb = None
    if spec.local in ("relu2", "yoso") or (complete and spec.global_branch == "grouped"):
        slot_pos = None  # only cosFormer's features read positions
        if spec.feature_map == "cosformer":
            slot_pos = torch.arange(position - slot, position + 1, device=qi.device).expand(qi.shape[0], -1)
        fb = features(keys[:, :, None], spec, named, slot_pos, scale)[:, :, 0]  # [B, Hkv, s+1, F]
    out = None
    if spec.local in ("relu2", "yoso"):
        w = local_kernel(fq @ fb.transpose(-1, -2), spec)  # [B, Hkv, g, s+1]
        local = w @ values
        num = local if num is None else num + local
        if spec.normalizer == "denominator":
            den = w.sum(-1) if den is None else den + w.sum(-1)
    if spec.local == "softmax":
        out = torch.softmax((qi[:, :, :, 0] @ keys.transpose(-1, -2)) * scale, -1) @ values
    if complete:
        if spec.global_branch == "grouped":
            parts["state"] = parts["state"] + fb.transpose(-1, -2) @ values
            if "normalizer" in parts:
                parts["normalizer"] = parts["normalizer"] + fb.sum(2)
        group_keys, group_values = torch.zeros_like(group_keys), torch.zeros_like(group_values)
    parts["group_keys"], parts["group_values"] = group_keys, group_values
    return num, den, out


def _group_rows(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], qi: Tensor, fq: Tensor,
                ki: Tensor, vi: Tensor, pos: Tensor, num: Tensor | None, den: Tensor | None,
                scale: float) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`_group` for rows at different positions `pos` [B]: each row's token goes into its own slot, the local
    branch reads every slot masked to the row's filled ones, rows whose group completes fold it."""
    size = spec.group_size
    slot = pos % size  # [B]
    slots = torch.arange(size, device=pos.device)
    index = slot[:, None, None, None]
    parts["group_keys"] = parts["group_keys"].scatter(2, index.expand(-1, *ki.shape[1:]), ki)
    parts["group_values"] = parts["group_values"].scatter(2, index.expand(-1, *vi.shape[1:]), vi)
    filled = (slots <= slot[:, None])[:, None, None, :]  # [B, 1, 1, G]
    complete = slot == size - 1
    folds = bool(complete.any())
    fb = None
    if spec.local in ("relu2", "yoso") or (folds and spec.global_branch == "grouped"):
        fb = buffer_features(spec, named, parts, pos, scale, slots)  # [B, Hkv, G, F]
    out = None
    if spec.local in ("relu2", "yoso"):
        w = torch.where(filled, local_kernel(fq @ fb.transpose(-1, -2), spec), 0.0)  # [B, Hkv, g, G]
        local = w @ parts["group_values"]
        num = local if num is None else num + local
        if spec.normalizer == "denominator":
            den = w.sum(-1) if den is None else den + w.sum(-1)
    if spec.local == "softmax":
        scores = (qi[:, :, :, 0] @ parts["group_keys"].transpose(-1, -2)) * scale
        out = torch.softmax(scores.masked_fill(~filled, float("-inf")), -1) @ parts["group_values"]  # own slot: filled
    if folds:
        fold_completed_group(spec, parts, complete, fb)
    return num, den, out


def _conv(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], vi: Tensor, kv_heads: int,
          groups: int) -> Tensor:
    """The causal conv's output [B, Hkv, g, dv]: the past taps over the window and the centre tap on the token, as
    one product; the window moves on by the token."""
    half = spec.conv_kernel // 2
    taps = named["conv_weight"].reshape(kv_heads, groups, -1)[:, :, :half + 1]
    window = torch.cat([parts["conv"], vi], 2)  # [B, Hkv, K//2 + 1, dv]: the past taps' tokens, then the token
    parts["conv"] = window[:, :, 1:]
    return taps @ window
