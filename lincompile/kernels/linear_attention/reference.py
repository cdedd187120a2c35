"""Plain PyTorch reference of every method: the truth every fast form is tested against.

Layout: q [B, H, T, Dk], k [B, Hkv, S, Dk], v [B, Hkv, S, Dv] with H a multiple of Hkv (GQA is never
materialised: query heads are viewed as [B, Hkv, H/Hkv, T, Dk]). `key_mask` [B, S] marks real keys
(padding is False and contributes nothing). Accumulation is fp32 (fp64 for fp64 inputs); the output has
q's dtype. `params` follows `lincompile.methods.params.param_layout`; `state` follows
`lincompile.kernels.linear_attention.state` (an empty list means the initial state).

Forms, which must agree:
- `attention`: parallel from a state (the masked quadratic form over the new tokens plus the state's
  contribution); causal self-attention, or bidirectional / cross-attention (causal=False, no state use);
- `chunked`: causal prefill in chunks, linear in T;
- `recurrent`: token by token through explicit recurrences;
- `verify` / `commit`: k draft tokens under a chain or tree from a state, then an accepted path absorbed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lincompile.kernels.linear_attention.reference_linear import bidirectional_attention, causal_attention
from lincompile.kernels.linear_attention.reference_recurrent import recurrent_cache, recurrent_linear
from lincompile.kernels.linear_attention.reference_softmax import cache_attention, projected_attention
from lincompile.kernels.linear_attention.state import accumulation_dtype, init_state
from lincompile.kernels.linear_attention.verify import VerifyExtras, commit, verify
from lincompile.methods.spec import MethodSpec

__all__ = ["VerifyExtras", "accumulation_dtype", "attention", "chunked", "commit", "init_state", "recurrent",
           "verify"]


def _key_mask(key_mask: Tensor | None, k: Tensor) -> Tensor:
    if key_mask is None:
        return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if key_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected (batch, keys) = "
                         f"{(k.shape[0], k.shape[2])}")
    return key_mask.to(torch.bool)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [batch, heads, tokens, head_dim]")
    if q.shape[1] % k.shape[1] or v.shape[1] != k.shape[1] or k.shape[2] != v.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible heads/tokens: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _initial(spec: MethodSpec, q: Tensor, k: Tensor, v: Tensor, state: list[Tensor]) -> list[Tensor]:
    if state:
        return list(state)
    return init_state(spec, q.shape[0], k.shape[1], k.shape[-1], v.shape[-1], q.device, q.dtype)


def _require_causal(spec: MethodSpec, form: str) -> None:
    if not spec.causal_safe:
        why = "is not causal-capable" if not spec.causal_capable else "looks at future tokens (centered conv)"
        raise ValueError(f"{spec.name} {why}: the {form} form is causal only")


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
              state: list[Tensor], params: list[Tensor], spec: MethodSpec, scale: float,
              causal: bool) -> tuple[Tensor, list[Tensor]]:
    """Parallel form from a state: the reference behind `lincompile::attention`.

    Causal: self-attention over the new tokens (as many keys as queries) after the state; returns the new
    state. Bidirectional: every real key (any lengths, e.g. cross-attention); the state is returned as given.
    `bias` is honoured by softmax only.
    """
    _check_shapes(q, k, v)
    mask = _key_mask(key_mask, k)
    initial = not state
    state = _initial(spec, q, k, v, state)
    if causal and not spec.causal_capable:
        raise ValueError(f"{spec.name} is not causal-capable (it projects along the sequence); use it on "
                         "bidirectional sites only")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many new keys as queries, got {q.shape[2]} and {k.shape[2]}")
    if spec.has_kv_cache:
        return cache_attention(q, k, v, mask, bias, state, params, spec, scale, causal)
    if spec.kind == "projected":
        return projected_attention(q, k, v, mask, params, spec, scale), state
    if not causal:
        return bidirectional_attention(q, k, v, mask, params, spec, scale), state
    return causal_attention(q, k, v, mask, state, params, spec, scale, initial)


def chunked(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
            state: list[Tensor], params: list[Tensor], spec: MethodSpec, scale: float, causal: bool,
            chunk_size: int = 64) -> tuple[Tensor, list[Tensor]]:
    """Causal prefill in chunks of `chunk_size` tokens: within a chunk the masked quadratic form, across
    chunks only the state, so linear methods cost O(T (C + G + K)); equals `attention`."""
    _require_causal(spec, "chunked")
    if not causal:
        raise ValueError("chunked is the causal prefill form; call attention for bidirectional sites")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_shapes(q, k, v)
    mask = _key_mask(key_mask, k)
    past = state[0].shape[2] if spec.has_kv_cache and state else 0  # [] (the initial state) goes to the first chunk
    outs = []
    for start in range(0, max(q.shape[2], 1), chunk_size):  # no token: one empty chunk (the state as it is)
        end = start + chunk_size
        chunk_bias = None
        if bias is not None:  # [..., T or 1, past + T]: this chunk's rows, keys up to the chunk's end
            rows = bias if bias.shape[-2] == 1 else bias[..., start:end, :]
            chunk_bias = rows[..., :past + min(end, q.shape[2])]
        out, state = attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], mask[:, start:end],
                               chunk_bias, state, params, spec, scale, True)
        outs.append(out)
    return torch.cat(outs, 2), state


def recurrent(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: list[Tensor],
              params: list[Tensor], spec: MethodSpec, scale: float) -> tuple[Tensor, list[Tensor]]:
    """Causal decoding one token at a time through explicit recurrences; agrees with `attention`."""
    _require_causal(spec, "recurrent")
    _check_shapes(q, k, v)
    mask = _key_mask(key_mask, k)
    state = _initial(spec, q, k, v, state)
    if spec.has_kv_cache:
        return recurrent_cache(q, k, v, mask, state, params, spec, scale)
    return recurrent_linear(q, k, v, mask, state, params, spec, scale)
