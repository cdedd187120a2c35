"""Plain PyTorch reference of every method: the truth every fast form is tested against.

Layout: q [B, H, T, Dk], k [B, Hkv, S, Dk], v [B, Hkv, S, Dv] with H a multiple of Hkv (GQA is never
materialised: query heads are viewed as [B, Hkv, H/Hkv, T, Dk]). `key_mask` [B, S] marks real keys
(padding is False). Accumulation is fp32 (fp64 for fp64 inputs); the output has q's dtype.

Forms:
- `attention` (parallel from a state): the masked quadratic form over the new tokens plus the
  contribution of the state; returns the output and the state after the new tokens.
- `recurrent`: token by token through the state; must agree with `attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lincompile.methods.spec import MethodSpec

DENOMINATOR_EPS = 1e-6


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def init_state(spec: MethodSpec, batch: int, kv_heads: int, dk: int, dv: int,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The state before any token: empty KV cache (softmax, model dtype) or zeros (linear, accumulation dtype)."""
    if spec.kind == "softmax":
        return [torch.zeros(batch, kv_heads, 0, dk, device=device, dtype=dtype),
                torch.zeros(batch, kv_heads, 0, dv, device=device, dtype=dtype),
                torch.zeros(batch, 0, device=device, dtype=torch.bool)]
    parts: list[Tensor] = []
    acc = accumulation_dtype(dtype)
    for name in spec.state_parts():
        if name == "state":
            parts.append(torch.zeros(batch, kv_heads, dk, dv, device=device, dtype=acc))
        elif name == "normalizer":
            parts.append(torch.zeros(batch, kv_heads, dk, device=device, dtype=acc))
        else:
            raise ValueError(f"{spec.name}: state part {name!r} has no reference layout")
    return parts


def feature_map(x: Tensor, spec: MethodSpec) -> Tensor:
    """phi applied to q or k (fp32 in, fp32 out)."""
    if spec.feature_map == "identity":
        return x
    if spec.feature_map == "elu1":
        return F.elu(x) + 1.0
    if spec.feature_map == "relu":
        return F.relu(x)
    if spec.feature_map == "l2":
        return F.normalize(x, dim=-1)
    raise ValueError(f"{spec.name}: feature map {spec.feature_map!r} has no reference")


def _key_mask(key_mask: Tensor | None, k: Tensor) -> Tensor:
    if key_mask is None:
        return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if key_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected (batch, keys) = "
                         f"{(k.shape[0], k.shape[2])}")
    return key_mask.to(torch.bool)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [batch, heads, tokens, head_dim]")
    batch, heads, _, _ = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads or v.shape[1] != kv_heads or k.shape[2] != v.shape[2]:
        raise ValueError(f"incompatible heads/tokens: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return batch, heads, kv_heads, heads // kv_heads


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
                      state: list[Tensor], scale: float, causal: bool) -> tuple[Tensor, list[Tensor]]:
    """Exact softmax attention over the cached keys and the new ones; the cache grows by S."""
    batch, heads, kv_heads, groups = _check_shapes(q, k, v)
    past_k, past_v, past_mask = state
    keys = torch.cat([past_k.to(k.dtype), k], dim=2)
    values = torch.cat([past_v.to(v.dtype), v], dim=2)
    mask = torch.cat([past_mask, _key_mask(key_mask, k)], dim=1)
    t, total = q.shape[2], keys.shape[2]
    acc = accumulation_dtype(q.dtype)
    qg = q.to(acc).reshape(batch, kv_heads, groups, t, q.shape[-1])
    scores = torch.einsum("bhgtd,bhsd->bhgts", qg, keys.to(acc)) * scale
    if bias is not None:
        scores = scores + bias.to(acc).expand(batch, heads, t, total).reshape(scores.shape)
    allowed = mask[:, None, None, None, :]
    if causal:
        past = total - t
        rows = torch.arange(t, device=q.device)[:, None] + past
        cols = torch.arange(total, device=q.device)[None, :]
        allowed = allowed & (cols <= rows)
    scores = scores.masked_fill(~allowed, torch.finfo(acc).min)
    probs = torch.softmax(scores, dim=-1) * allowed.any(-1, keepdim=True)  # a query with no key outputs 0
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, values.to(acc))
    return out.reshape(batch, heads, t, v.shape[-1]).to(q.dtype), [keys, values, mask]


def linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: list[Tensor],
                     spec: MethodSpec, causal: bool) -> tuple[Tensor, list[Tensor]]:
    """Kernelized linear attention with an inclusive global branch, in parallel form from a state."""
    if spec.global_branch != "inclusive" or spec.local != "none" or spec.conv != "none":
        raise NotImplementedError(f"{spec.name}: the reference covers only inclusive global linear attention so far")
    batch, heads, kv_heads, groups = _check_shapes(q, k, v)
    t, s = q.shape[2], k.shape[2]
    if causal and t != s:
        raise ValueError(f"causal attention needs as many new keys as queries, got {t} and {s}")
    acc = accumulation_dtype(q.dtype)
    keep = _key_mask(key_mask, k)[:, None, :, None].to(acc)
    qf = feature_map(q.to(acc), spec).reshape(batch, kv_heads, groups, t, q.shape[-1])
    kf = feature_map(k.to(acc), spec) * keep
    vf = v.to(acc) * keep
    scores = torch.einsum("bhgtd,bhsd->bhgts", qf, kf)
    if causal:
        scores = scores * torch.ones(t, s, device=q.device, dtype=acc).tril()
    s_past = state[0]
    num = torch.einsum("bhgts,bhse->bhgte", scores, vf) + torch.einsum("bhgtd,bhde->bhgte", qf, s_past)
    new_state = [s_past + torch.einsum("bhsd,bhse->bhde", kf, vf)]
    if spec.normalizer == "denominator":
        z_past = state[1]
        den = scores.sum(-1) + torch.einsum("bhgtd,bhd->bhgt", qf, z_past)
        num = num / den.clamp_min(DENOMINATOR_EPS)[..., None]
        new_state.append(z_past + kf.sum(2))
    return num.reshape(batch, heads, t, v.shape[-1]).to(q.dtype), new_state


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
              state: list[Tensor], params: list[Tensor], spec: MethodSpec, scale: float,
              causal: bool) -> tuple[Tensor, list[Tensor]]:
    """Parallel form from a state (an empty list means the initial state): the reference behind
    `lincompile::attention`."""
    if not state:
        state = init_state(spec, q.shape[0], k.shape[1], k.shape[-1], v.shape[-1], q.device, q.dtype)
    if spec.kind == "softmax":
        return softmax_attention(q, k, v, key_mask, bias, state, scale, causal)
    return linear_attention(q, k, v, key_mask, state, spec, causal)


def recurrent(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: list[Tensor],
              params: list[Tensor], spec: MethodSpec, scale: float) -> tuple[Tensor, list[Tensor]]:
    """Causal decoding one token at a time through the state; agrees with `attention`.

    Linear methods use the explicit recurrence S += phi(k) v^T, z += phi(k), o = phi(q) S / phi(q) z;
    softmax appends to its KV cache.
    """
    if spec.kind == "softmax":
        outs = []
        for i in range(q.shape[2]):
            mask_i = None if key_mask is None else key_mask[:, i:i + 1]
            out, state = softmax_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], mask_i,
                                           None, state, scale, True)
            outs.append(out)
        return torch.cat(outs, dim=2), state
    batch, heads, kv_heads, groups = _check_shapes(q, k, v)
    acc = accumulation_dtype(q.dtype)
    keep = _key_mask(key_mask, k).to(acc)
    s_t = state[0].to(acc)
    z_t = state[1].to(acc) if spec.normalizer == "denominator" else None
    outs = []
    for i in range(q.shape[2]):
        q_i = feature_map(q[:, :, i].to(acc), spec).reshape(batch, kv_heads, groups, -1)
        k_i = feature_map(k[:, :, i].to(acc), spec) * keep[:, i, None, None]
        v_i = v[:, :, i].to(acc) * keep[:, i, None, None]
        s_t = s_t + k_i[..., :, None] * v_i[..., None, :]
        out = torch.einsum("bhgd,bhde->bhge", q_i, s_t)
        if z_t is not None:
            z_t = z_t + k_i
            out = out / torch.einsum("bhgd,bhd->bhg", q_i, z_t).clamp_min(DENOMINATOR_EPS)[..., None]
        outs.append(out.reshape(batch, heads, 1, -1))
    new_state = [s_t] if z_t is None else [s_t, z_t]
    return torch.cat(outs, dim=2).to(q.dtype), new_state
