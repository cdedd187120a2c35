"""Speculative verification of k draft tokens (a chain or a tree) from a state, and exact commit.

`verify` scores every draft node as if its root-to-node path had been decoded token by token, without
changing the state; `commit` then absorbs an accepted path from the drafts' keys and values (no rerun of the
model), giving the state sequential decoding of those tokens gives.

For linear methods a node at depth d sits at position p = position + d; it sees the state (S of completed
groups, the current group buffer, the conv window) and its ancestors. This stays exact when the tree crosses
a group boundary: a node in a later group reads the buffer and its ancestors of earlier groups through the
grouped branch (what the fold into S would have held) and only its own group's ancestors through the local
branch; the conv reads each node's ancestors by lag. KV-cache methods attend to the cache plus ancestors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lincompile.kernels.linear_attention.reference_linear import acc_parts, mix, start_position, state_context
from lincompile.kernels.linear_attention.reference_recurrent import absorb_linear
from lincompile.kernels.linear_attention.reference_softmax import cache_weights
from lincompile.kernels.linear_attention.state import accumulation_dtype, init_state
from lincompile.methods.params import named_params
from lincompile.methods.spec import MethodSpec


@dataclass(frozen=True)
class VerifyExtras:
    """What `commit` needs from one `verify` call: the method, and the drafts' keys, values and tree."""

    spec: MethodSpec
    params: tuple[Tensor, ...]
    scale: float
    keys: Tensor  # [B, Hkv, k, dk]
    values: Tensor  # [B, Hkv, k, dv]
    parents: Tensor  # [k] int64; -1 = attached to the committed prefix


def tree(parents: Tensor | None, count: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(parents [k], ancestor-or-self [k, k] bool, depth [k]) of a draft tree; None means a chain.

    Nodes are topologically ordered: parents[i] is -1 or an earlier node.
    """
    if parents is None:
        parents = torch.arange(count, device=device) - 1
    parents = torch.as_tensor(parents, dtype=torch.int64, device=device)
    if parents.shape != (count,):
        raise ValueError(f"parents must have shape ({count},), got {tuple(parents.shape)}")
    listed = parents.tolist()
    if any(p < -1 or p >= i for i, p in enumerate(listed)):
        raise ValueError(f"parents[i] must be -1 or an earlier node index, got {listed}")
    rows = []
    depth = []
    for i, p in enumerate(listed):
        row = torch.zeros(count, dtype=torch.bool, device=device) if p < 0 else rows[p].clone()
        row[i] = True
        rows.append(row)
        depth.append(0 if p < 0 else depth[p] + 1)
    ancestors = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.bool, device=device)
    return parents, ancestors, torch.tensor(depth, dtype=torch.int64, device=device)


def verify(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], params: list[Tensor], spec: MethodSpec,
           scale: float, parents: Tensor | None = None) -> tuple[Tensor, VerifyExtras]:
    """Outputs [B, H, k, dv] of k draft tokens (all real) under a chain or tree; `state` (empty: the initial
    state) is left unchanged."""
    if not spec.causal_safe:
        raise ValueError(f"{spec.name}: verification needs a causal-safe method")
    batch, heads, count, dk = q.shape
    kv_heads = k.shape[1]
    state = state or init_state(spec, batch, kv_heads, dk, v.shape[-1], q.device, q.dtype)
    parents, ancestors, depth = tree(parents, count, q.device)
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    extras = VerifyExtras(spec, tuple(params), scale, k, v, parents)
    if spec.has_kv_cache:
        past_k, past_v, past_mask = state
        keys = torch.cat([past_k.to(acc), k.to(acc)], 2)
        values = torch.cat([past_v.to(acc), v.to(acc)], 2)
        allowed = torch.cat([past_mask[:, None, :].expand(batch, count, -1), ancestors.expand(batch, -1, -1)], 2)
        qg = q.to(acc).reshape(batch, kv_heads, heads // kv_heads, count, dk)
        probs = cache_weights(spec, named, qg, keys, allowed, None, scale)
        out = torch.einsum("bhgtl,bhld->bhgtd", probs, values).reshape(batch, heads, count, v.shape[-1])
        return out.to(q.dtype), extras
    parts = acc_parts(spec, state, acc)
    r0 = start_position(parts, batch, q.device)
    pos = r0[:, None] + depth
    real = torch.ones(batch, count, dtype=torch.bool, device=q.device)
    ctx = state_context(spec, parts, r0, k.to(acc), v.to(acc), pos, real)
    prefix = ctx.pos.shape[1] - count
    visible = torch.cat([ancestors.new_ones(count, prefix), ancestors], 1).expand(batch, -1, -1)
    return mix(spec, named, q, pos, ctx, visible, parts, r0, scale).to(q.dtype), extras


def commit(state: list[Tensor], extras: VerifyExtras, accepted_path: list[int]) -> list[Tensor]:
    """The state after decoding the accepted path (node indices from a root down) token by token: the decode
    path's recurrent state updates, op for op, so the same state bit for bit (no outputs are computed)."""
    parents = extras.parents.tolist()
    for step, node in enumerate(accepted_path):
        if not 0 <= node < len(parents):
            raise ValueError(f"accepted_path {accepted_path}: node {node} is not a draft index")
        expected = -1 if step == 0 else accepted_path[step - 1]
        if parents[node] != expected:
            raise ValueError(f"accepted_path {accepted_path} is not a root-to-node path of parents {parents}")
    if not accepted_path:
        return list(state)
    spec = extras.spec
    state = state or init_state(spec, extras.keys.shape[0], extras.keys.shape[1], extras.keys.shape[-1],
                                extras.values.shape[-1], extras.keys.device, extras.keys.dtype)
    index = torch.tensor(accepted_path, dtype=torch.int64, device=extras.keys.device)
    keys, values = extras.keys.index_select(2, index), extras.values.index_select(2, index)
    batch, count = keys.shape[0], len(accepted_path)
    if spec.has_kv_cache:
        past_k, past_v, past_mask = state
        mask = torch.ones(batch, count, dtype=torch.bool, device=past_mask.device)
        return [torch.cat([past_k, keys.to(past_k.dtype)], 2), torch.cat([past_v, values.to(past_v.dtype)], 2),
                torch.cat([past_mask, mask], 1)]
    return absorb_linear(keys, values, list(state), list(extras.params), spec, extras.scale)
