"""Methods without a constant-size state: exact softmax and the quadratic relu^2 / YOSO kernel (a KV cache
that grows with the context), and Linformer (sequence projection, bidirectional only)."""
from __future__ import annotations

import torch
from torch import Tensor

from lincompile.kernels.linear_attention.state import accumulation_dtype, real_only
from lincompile.methods.feature_maps import denominator_eps, features, local_kernel
from lincompile.methods.params import named_params
from lincompile.methods.spec import MethodSpec


def cache_weights(spec: MethodSpec, params: dict[str, Tensor], q: Tensor, keys: Tensor, allowed: Tensor,
                  bias: Tensor | None, scale: float) -> Tensor:
    """Attention weights [B, Hkv, g, T, L] of grouped queries q [B, Hkv, g, T, d] over keys [B, Hkv, L, d]
    (accumulation dtype); allowed [B, T, L] masks them. Softmax rows with no allowed key are all zero (with
    sinks too, where the original's would hold the sink's share and so weigh no value either);
    quadratic kernel weights are divided by their row sum (at least `denominator_eps(spec)`) when normalized."""
    allowed = allowed[:, None, None]
    if spec.kind == "quadratic":
        fq = features(q, spec, params, None, scale, query=True)
        fk = features(keys[:, :, None], spec, params, None, scale)[:, :, 0]
        weights = torch.where(allowed, local_kernel(torch.einsum("bhgtf,bhlf->bhgtl", fq, fk), spec), 0.0)
        if spec.normalizer == "denominator":
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(denominator_eps(spec))
        return weights
    scores = torch.einsum("bhgtd,bhld->bhgtl", q, keys) * scale
    if spec.softcap:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if bias is not None:
        b, h, g, t, total = scores.shape
        scores = scores + bias.to(q.dtype).expand(b, h * g, t, total).reshape(scores.shape)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if spec.sinks:  # each head's sink logit joins the denominator as a key that weighs no value
        b, h, g, t, _ = scores.shape
        sinks = params["sinks"].reshape(1, h, g, 1, 1).expand(b, h, g, t, 1)
        return torch.softmax(torch.cat([scores, sinks], -1), dim=-1)[..., :-1] * allowed.any(-1, keepdim=True)
    return torch.softmax(scores, dim=-1) * allowed.any(-1, keepdim=True)


def cache_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, bias: Tensor | None, state: list[Tensor],
                    params: list[Tensor], spec: MethodSpec, scale: float, causal: bool) -> tuple[Tensor, list[Tensor]]:
    """Attention over the cached keys and the new ones; the cache grows by the new keys (zeros at padding)."""
    batch, heads, t, dk = q.shape
    kv_heads = k.shape[1]
    past_k, past_v, past_mask = state
    k, v = real_only(k, key_mask), real_only(v, key_mask)
    keys = torch.cat([past_k.to(k.dtype), k], dim=2)
    values = torch.cat([past_v.to(v.dtype), v], dim=2)
    mask = torch.cat([past_mask, key_mask], dim=1)
    total = keys.shape[2]
    acc = accumulation_dtype(q.dtype)
    allowed = mask[:, None, :].expand(batch, t, total)
    if causal:
        rows = torch.arange(t, device=q.device)[:, None] + (total - t)
        allowed = allowed & (torch.arange(total, device=q.device)[None, :] <= rows)
    qg = q.to(acc).reshape(batch, kv_heads, heads // kv_heads, t, dk)
    probs = cache_weights(spec, named_params(spec, params, acc), qg, keys.to(acc), allowed, bias, scale)
    out = torch.einsum("bhgtl,bhld->bhgtd", probs, values.to(acc))
    return out.reshape(batch, heads, t, v.shape[-1]).to(q.dtype), [keys, values, mask]


def projected_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, params: list[Tensor],
                        spec: MethodSpec, scale: float) -> Tensor:
    """Linformer: softmax(scale q (E K)^T) (F V) with E, F [p, n] applied to the first S columns; padding
    keys are zeroed before the projection, so they contribute nothing."""
    batch, heads, t, dk = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    if s > spec.horizon:
        raise ValueError(f"{spec.name}: {s} keys exceed the projection length horizon={spec.horizon}")
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    keys = torch.einsum("ps,bhsd->bhpd", named["linformer_keys"][:, :s], real_only(k.to(acc), key_mask))
    values = torch.einsum("ps,bhsd->bhpd", named["linformer_values"][:, :s], real_only(v.to(acc), key_mask))
    qg = q.to(acc).reshape(batch, kv_heads, heads // kv_heads, t, dk)
    probs = torch.softmax(torch.einsum("bhgtd,bhpd->bhgtp", qg, keys) * scale, dim=-1)
    out = torch.einsum("bhgtp,bhpe->bhgte", probs, values)
    return out.reshape(batch, heads, t, v.shape[-1]).to(q.dtype)
