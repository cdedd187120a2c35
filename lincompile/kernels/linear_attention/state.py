"""The recurrent state of one attention site: its parts, their layout, and the initial state.

Parts in `MethodSpec.state_parts()` order (B batch, Hkv KV heads, F = spec.feature_dim(dk), G group size,
K conv kernel; "acc" = fp32, or fp64 for fp64 models):

  kind softmax / quadratic (grows with the context):
    keys [B, Hkv, L, dk], values [B, Hkv, L, dv] (model dtype), key_mask [B, L] bool
  kind linear (constant size):
    state        [B, Hkv, F, dv] acc   sum of phi(k) v^T: all tokens seen (inclusive; decayed by gamma per token)
                                       or the completed groups only (grouped)
    normalizer   [B, Hkv, F]     acc   the matching sum of phi(k) (normalizer="denominator")
    group_keys   [B, Hkv, G, dk] acc   raw keys of the current, incomplete group: slot j holds position
    group_values [B, Hkv, G, dv] acc   position - position % G + j for j < position % G; later slots are zero
    conv         [B, Hkv, K//2, dv] acc  values of the last K//2 tokens: slot j holds position - K//2 + j (zero
                                       before position 0)
    position     [B] int64             real tokens seen; padding never advances it
  kind projected: no state (bidirectional only).

A group is folded into `state` as soon as it completes, so `group_keys` never holds a full group.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lincompile.methods.spec import MethodSpec


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t.to(dtype)`, without the call when `t` already has it (a decode step makes many such calls, each a cost)."""
    return t if t.dtype == dtype else t.to(dtype)


def init_state(spec: MethodSpec, batch: int, kv_heads: int, dk: int, dv: int,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The state before any token: an empty KV cache (model dtype) or zeros (accumulation dtype)."""
    if spec.has_kv_cache:
        return [torch.zeros(batch, kv_heads, 0, dk, device=device, dtype=dtype),
                torch.zeros(batch, kv_heads, 0, dv, device=device, dtype=dtype),
                torch.zeros(batch, 0, device=device, dtype=torch.bool)]
    acc = accumulation_dtype(dtype)
    features = spec.feature_dim(dk)
    shapes = {"state": (batch, kv_heads, features, dv), "normalizer": (batch, kv_heads, features),
              "group_keys": (batch, kv_heads, spec.group_size, dk),
              "group_values": (batch, kv_heads, spec.group_size, dv),
              "conv": (batch, kv_heads, spec.conv_kernel // 2, dv)}
    return [torch.zeros(batch, device=device, dtype=torch.int64) if name == "position"
            else torch.zeros(shapes[name], device=device, dtype=acc) for name in spec.state_parts()]


def unpack_state(spec: MethodSpec, state: list[Tensor]) -> dict[str, Tensor]:
    """The op's state list as {part: tensor}; the count must match the spec."""
    names = spec.state_parts()
    if len(state) != len(names):
        raise ValueError(f"{spec.name}: expected state parts {list(names)}, got {len(state)} tensors")
    return dict(zip(names, state))


def pack_state(spec: MethodSpec, parts: dict[str, Tensor]) -> list[Tensor]:
    """{part: tensor} back to the op's list order."""
    return [parts[name] for name in spec.state_parts()]


def real_only(x: Tensor, real: Tensor) -> Tensor:
    """x [B, H, N, d] with the tokens that are not `real` [B, N] set to zero (a select, so 0 * inf never happens)."""
    return torch.where(real[:, None, :, None], x, 0.0)
