"""A short causal call of a linear method in few ops: the fast form of `reference.attention` for T tokens from a
state (a speculative verify call, a prefill chunk), where every row is a real token and, for methods with group
buffers, every row is at the same position and the call stays within one group (it may complete it).

Then group slots are numbers, not per-row tensors, and the branches need no position masks:
  - the grouped global branch reads S alone (no earlier group in the call) with one alpha for every query;
  - the local branch reads the buffer's filled slots then the new tokens, causally (one triangular mask);
  - the inclusive branch is phi(q) S plus a causal product over the new tokens (decayed by gamma^lag);
  - the conv reads the window then the new tokens through one banded matrix of taps;
  - the buffer takes the tokens in one copy; a completed group is folded into S and the buffer cleared.
The math is `reference_linear`'s, branch for branch (the same outputs and state, to rounding);
tests/kernels/test_chain.py checks every causal linear method against the reference. The registry's
`recurrent-step` runs the reference for calls this form does not take.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from lincompile.kernels.linear_attention.decode import combine
from lincompile.kernels.linear_attention.reference_linear import acc_parts, grouped_alpha, start_position
from lincompile.kernels.linear_attention.state import accumulation_dtype, cast, init_state, pack_state, unpack_state
from lincompile.methods.feature_maps import features, local_kernel
from lincompile.methods.params import named_params
from lincompile.methods.spec import MethodSpec


def applies(q: Tensor, key_mask: Tensor | None, state: list[Tensor], spec: MethodSpec, causal: bool) -> bool:
    """Whether `run` serves this call: T >= 2 causal tokens of a causal linear method, every row real; for a
    method with group buffers every row at the same position and the call within one group. Reads the mask and
    the position counter (syncs on a GPU); tracing tensors have no values and a CUDA graph's capture may not read
    them, so there this is False, as under autograd (the op's backward recomputes through the reference), and
    for malformed calls (the reference says what is wrong)."""
    if not (causal and q.shape[2] > 1 and spec.kind == "linear" and spec.causal_safe) or torch.is_grad_enabled():
        return False
    if q.shape[0] == 0 or (key_mask is not None and key_mask.shape != (q.shape[0], q.shape[2])):
        return False
    if is_fake(q):  # a call's tensors are all real or all tracing ones
        return False
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    if key_mask is not None and not bool(key_mask.all()):
        return False
    if not spec.uses_groups:  # positions per row are fine (cosFormer's features read them row by row)
        return True
    position = unpack_state(spec, state).get("position") if state else None
    if position is None:
        return q.shape[2] <= spec.group_size
    if not bool((position == position[0]).all()):
        return False
    return int(position[0]) % spec.group_size + q.shape[2] <= spec.group_size


def run(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], params: list[Tensor], spec: MethodSpec,
        scale: float) -> tuple[Tensor, list[Tensor]]:
    """(out [B, H, T, dv] in q's dtype, new state) for a call `applies` accepts; `state` [] is the initial one.
    Never modifies `state`. Queries are rows [B, Hkv, g * T, ...] (a KV head's query heads one after another), so
    every product is a plain batched matmul over KV heads, with no broadcast copy of keys, values or S."""
    batch, heads, t, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[3]
    groups = heads // kv_heads
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    state = state or init_state(spec, batch, kv_heads, dk, dv, q.device, q.dtype)
    parts = acc_parts(spec, state, acc)
    start = start_position(parts, batch, q.device)  # [B]; every row the same with group buffers
    positions = start[:, None] + torch.arange(t, device=q.device)  # [B, T]
    qg = cast(q, acc).reshape(batch, kv_heads, groups, t, dk)
    ki, vi = cast(k, acc), cast(v, acc)  # [B, Hkv, T, d]
    fq = features(qg, spec, named, positions, scale, query=True).flatten(2, 3)  # [B, Hkv, g * T, F]
    num: Tensor | None = None  # kernel-weighted values (global and kernel-local branches)
    den: Tensor | None = None  # their weights' sum (normalizer="denominator")
    out: Tensor | None = None  # softmax-local output (normalized on its own)
    if spec.global_branch == "inclusive":
        num, den = _inclusive(spec, named, parts, fq, ki, vi, positions, groups, scale)
    if spec.global_branch == "grouped":
        alpha = grouped_alpha(spec, named["alpha"], int(start[0]))  # a scalar: every row in one group
        num = alpha * (fq @ parts["state"])
        if "normalizer" in parts:
            den = alpha * (fq @ parts["normalizer"][..., None])[..., 0]
    if spec.uses_groups:
        num, den, out = _group(spec, named, parts, qg.flatten(2, 3), fq, ki, vi, int(start[0]), num, den, scale)
    out = combine(spec, num, den, out)
    if spec.conv != "none":
        out = out + _conv(spec, named, parts, vi, kv_heads, groups)
    if spec.uses_positions:
        parts["position"] = start + t
    return cast(out.reshape(batch, heads, t, dv), q.dtype), pack_state(spec, parts)


def _inclusive(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], fq: Tensor, ki: Tensor,
               vi: Tensor, positions: Tensor, groups: int,
               scale: float) -> tuple[Tensor, Tensor | None]:
    """phi(q) S_i (and phi(q) z_i) with S_i the state once tokens 0..i are absorbed (decayed by gamma per token);
    S and z absorb every token."""
    t = ki.shape[2]
    fk = features(ki[:, :, None], spec, named, positions, scale)[:, :, 0]  # [B, Hkv, T, F]
    causal = torch.ones(t, t, dtype=torch.bool, device=ki.device).tril().repeat(groups, 1)  # [g * T, T]
    weight = torch.where(causal, fq @ fk.transpose(-1, -2), 0.0)  # [B, Hkv, g * T, T]
    s, z = parts["state"], parts.get("normalizer")
    carry = None  # what phi(q) S is multiplied by: gamma^(i + 1), [1, Hkv, g * T, 1]
    absorb = fk  # phi(k_j) weighted by gamma^(T - 1 - j) in the new S
    if spec.decay:
        log_gamma = F.logsigmoid(named["decay"])[:, None, None]  # [Hkv, 1, 1]
        steps = torch.arange(t, device=ki.device)
        lag = (steps[:, None] - steps[None, :]).clamp_min(0)
        weight = weight * torch.exp(lag * log_gamma).repeat(1, groups, 1)
        carry = torch.exp((steps[:, None] + 1) * log_gamma).repeat(1, groups, 1)[None]
        absorb = fk * torch.exp((t - 1 - steps)[:, None] * log_gamma)[None]
        s = s * torch.exp(t * log_gamma)[None]
        z = None if z is None else z * torch.exp(t * log_gamma)[None, :, :, 0]
    past = fq @ parts["state"]
    num = (past if carry is None else carry * past) + weight @ vi
    parts["state"] = s + absorb.transpose(-1, -2) @ vi
    den = None
    if z is not None:
        past_den = (fq @ parts["normalizer"][..., None])[..., 0]
        den = (past_den if carry is None else carry[..., 0] * past_den) + weight.sum(-1)
        parts["normalizer"] = z + absorb.sum(2)
    return num, den


def _group(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], qi: Tensor, fq: Tensor,
           ki: Tensor, vi: Tensor, position: int, num: Tensor | None, den: Tensor | None,
           scale: float) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The local branch over the buffer's filled slots and the new tokens (query i sees slots 0..slot + i), then
    the tokens into the buffer; a group completed by the call is folded into S and the buffer cleared.
    qi, fq: query rows [B, Hkv, g * T, ...]."""
    size, t = spec.group_size, ki.shape[2]
    slot = position % size
    keys = torch.cat([parts["group_keys"][:, :, :slot], ki], 2)  # [B, Hkv, slot + T, dk], in position order
    values = torch.cat([parts["group_values"][:, :, :slot], vi], 2)
    visible = torch.ones(t, slot + t, dtype=torch.bool, device=ki.device).tril(slot)
    visible = visible.repeat(qi.shape[2] // t, 1)  # [g * T, slot + T]
    complete = slot + t == size
    fb = None
    if spec.local in ("relu2", "yoso") or (complete and spec.global_branch == "grouped"):
        key_pos = None  # only cosFormer's features read positions
        if spec.feature_map == "cosformer":
            key_pos = torch.arange(position - slot, position + t, device=ki.device).expand(ki.shape[0], -1)
        fb = features(keys[:, :, None], spec, named, key_pos, scale)[:, :, 0]  # [B, Hkv, slot + T, F]
    out = None
    if spec.local in ("relu2", "yoso"):
        w = torch.where(visible, local_kernel(fq @ fb.transpose(-1, -2), spec), 0.0)
        num = w @ values if num is None else num + w @ values
        if spec.normalizer == "denominator":
            den = w.sum(-1) if den is None else den + w.sum(-1)
    if spec.local == "softmax":
        scores = (qi @ keys.transpose(-1, -2)) * scale
        out = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values
    if complete:
        if spec.global_branch == "grouped":
            parts["state"] = parts["state"] + fb.transpose(-1, -2) @ values
            if "normalizer" in parts:
                parts["normalizer"] = parts["normalizer"] + fb.sum(2)
        parts["group_keys"] = torch.zeros_like(parts["group_keys"])
        parts["group_values"] = torch.zeros_like(parts["group_values"])
    else:
        for name, new in (("group_keys", ki), ("group_values", vi)):  # clone, not slice_scatter: that copies
            parts[name] = parts[name].clone()  # the whole storage of a view (a commit's states share one)
            parts[name][:, :, slot:slot + t] = new
    return num, den, out


def _conv(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], vi: Tensor, kv_heads: int,
          groups: int) -> Tensor:
    """The causal conv's output [B, Hkv, g * T, dv]: query i reads the window and tokens 0..i through tap
    (c - i) of its head's filter at context index c (window first); the window moves on by the call's tokens."""
    half, t = spec.conv_kernel // 2, vi.shape[2]
    taps = named["conv_weight"].reshape(kv_heads, groups, -1)[:, :, :half + 1]
    context = torch.cat([parts["conv"], vi], 2)  # [B, Hkv, half + T, dv]
    # row i of the band is the taps shifted right by i: windows of the taps padded with T - 1 zeros on each
    # side, last window first (copies of the taps and zeros, no arithmetic)
    band = F.pad(taps, (t - 1, t - 1)).unfold(-1, half + t, 1).flip(-2)  # [Hkv, g, T, half + T]
    parts["conv"] = context[:, :, t:]
    return band.flatten(1, 2) @ context
