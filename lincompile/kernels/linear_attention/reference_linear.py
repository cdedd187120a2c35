"""Linear methods (kind="linear") as masked quadratic forms over a context of tokens, plus the state fold.

Every parallel-type form is one call of `mix` over a `Context`: the state's current-group buffer, its conv
window, then new tokens (a prefill chunk, or draft tokens of a tree). Which context token a query sees is a
`visible` mask (causal order, a draft tree's ancestors, or everything for bidirectional attention); which
branch a token feeds follows from its flags and positions:

  inclusive global  new tokens the query sees (older ones are in S), weight phi_q.phi_k * gamma^(p_q - p_k)
  grouped global    group buffer + new tokens in another (so, causally, an earlier) group, weight alpha phi_q.phi_k
  local             group buffer + new tokens in the query's group, weight relu2/YOSO(phi_q.phi_k) or softmax
  conv              conv window + new tokens at lag p_q - p_k in [0, K//2] (causal) or [-K//2, K//2] (centered)

Positions count real tokens only: padding takes no position, so a padded row computes what the same row
without padding computes. A padding query is evaluated as if a zero token stood at the next position. Padding
keys and values are replaced by zeros before any product, so whatever they hold (inf, NaN) never reaches a real
row or the state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lincompile.kernels.linear_attention.state import accumulation_dtype, cast, pack_state, real_only, unpack_state
from lincompile.methods.feature_maps import closed_form_dots, denominator_eps, features, local_kernel
from lincompile.methods.params import named_params
from lincompile.methods.spec import MethodSpec


@dataclass(frozen=True)
class Context:
    """Tokens new queries may attend to, in order: group buffer, conv window, new tokens (N in all)."""

    k: Tensor  # [B, Hkv, N, dk] raw keys, accumulation dtype
    v: Tensor  # [B, Hkv, N, dv]
    pos: Tensor  # [B, N] int64 positions (relative to the call's start when the state keeps no counter)
    real: Tensor  # [B, N] bool: a token (not padding, not an empty buffer slot)
    kernel: Tensor  # [N] bool: feeds the local and grouped branches (buffer, new)
    conv: Tensor  # [N] bool: feeds the conv (window, new)
    fresh: Tensor  # [N] bool: feeds the inclusive global branch (new)


def start_position(parts: dict[str, Tensor], batch: int, device: torch.device) -> Tensor:
    """Tokens already seen [B]: the state's counter, or 0 when only relative positions matter."""
    if "position" in parts:
        return parts["position"]
    return torch.zeros(batch, dtype=torch.int64, device=device)


def acc_parts(spec: MethodSpec, state: list[Tensor], acc: torch.dtype) -> dict[str, Tensor]:
    """The state as {part: tensor}, floating parts in the accumulation dtype."""
    return {n: cast(t, acc) if t.is_floating_point() else t for n, t in unpack_state(spec, state).items()}


def state_context(spec: MethodSpec, parts: dict[str, Tensor], r0: Tensor, k: Tensor, v: Tensor, pos: Tensor,
                  real: Tensor) -> Context:
    """The state's group buffer and conv window (at positions before r0), then new tokens k, v at `pos` (zeros
    where not `real`)."""
    batch, kv_heads, _, dk = k.shape
    device = k.device
    blocks = []  # (k, v, pos, real, kernel, conv, fresh)
    if spec.uses_groups:
        size = spec.group_size
        slots = torch.arange(size, device=device)
        offset = (r0 % size)[:, None]
        blocks.append((parts["group_keys"], parts["group_values"], r0[:, None] - offset + slots, slots < offset,
                       True, False, False))
    if spec.conv != "none":
        window = parts["conv"]
        half = window.shape[2]
        slots = torch.arange(half, device=device)
        # slots before position 0 hold zeros, so they may count as tokens: they contribute nothing
        blocks.append((k.new_zeros(batch, kv_heads, half, dk), window, r0[:, None] - half + slots,
                       torch.ones(batch, half, dtype=torch.bool, device=device), False, True, False))
    blocks.append((real_only(k, real), real_only(v, real), pos, real, True, True, True))

    def flag(i: int) -> Tensor:
        return torch.cat([torch.full((b[0].shape[2],), b[i], device=device) for b in blocks])

    return Context(torch.cat([b[0] for b in blocks], 2), torch.cat([b[1] for b in blocks], 2),
                   torch.cat([b[2].expand(batch, -1) for b in blocks], 1),
                   torch.cat([b[3].expand(batch, -1) for b in blocks], 1), flag(4), flag(5), flag(6))


def grouped_alpha(spec: MethodSpec, alpha: Tensor, pos: Tensor | int) -> Tensor:
    """The grouped global branch's weight for queries at positions `pos` ([B] or [B, T], or one int for every
    row): alpha (a scalar) when global_cap is 0, else alpha * min(1, global_cap / n) with
    n = group_size * (pos // group_size) the tokens it sums, shaped [B, 1, 1] or [B, 1, 1, T] to broadcast over KV
    heads and their query heads (a scalar for an int: its factor is computed in Python's float64, so it may
    differ from the tensor path's, computed in alpha's dtype, in the last bit)."""
    if not spec.global_cap:
        return alpha
    if isinstance(pos, int):
        return alpha * min(1.0, spec.global_cap / max(pos - pos % spec.group_size, 1))
    summed = group_start(pos, spec.group_size).to(alpha.dtype)
    gain = alpha * (spec.global_cap / summed.clamp_min(1)).clamp_max(1)
    return gain.reshape(pos.shape[0], 1, 1, *pos.shape[1:])


def group_start(pos: Tensor, size: int) -> Tensor:
    """The first position of each integer position's group, pos // size * size, written pos - pos % size: the
    same integers (both floor), two ONNX ops where a floor division takes seven."""
    return pos - pos % size


def _per_head(mask: Tensor) -> Tensor:
    """[B, T, N] -> [B, 1, 1, T, N], broadcasting over KV heads and their query heads."""
    return mask[:, None, None]


def _key_features(ctx: Context, spec: MethodSpec, params: dict[str, Tensor], scale: float) -> Tensor:
    return features(ctx.k[:, :, None], spec, params, ctx.pos, scale)[:, :, 0]  # [B, Hkv, N, F]


def _log_gamma(params: dict[str, Tensor]) -> Tensor:
    return F.logsigmoid(params["decay"])  # [Hkv]


def mix(spec: MethodSpec, params: dict[str, Tensor], q: Tensor, q_pos: Tensor, ctx: Context, visible: Tensor,
        parts: dict[str, Tensor] | None, r0: Tensor, scale: float) -> Tensor:
    """Outputs [B, H, T, dv] (accumulation dtype) of queries q [B, H, T, dk] at positions q_pos [B, T].

    visible [B, T, N]: which context tokens each query may see. `parts` carries S / z of the state (None:
    no state, e.g. bidirectional, or S and z known to be zero, the initial state); the inclusive branch decays S
    by gamma^(q_pos - r0 + 1).
    """
    batch, heads, t, dk = q.shape
    kv_heads, dv = ctx.v.shape[1], ctx.v.shape[-1]
    groups = heads // kv_heads
    qg = q.to(ctx.v.dtype).reshape(batch, kv_heads, groups, t, dk)
    seen = visible & ctx.real[:, None, :]
    same_group = group_start(q_pos, spec.group_size)[:, :, None] == group_start(ctx.pos, spec.group_size)[:, None, :]
    out = qg.new_zeros(batch, kv_heads, groups, t, dv)
    if spec.global_branch != "none" or spec.local in ("relu2", "yoso"):
        out = out + _kernel_terms(spec, params, qg, q_pos, ctx, seen, same_group, parts, r0, scale)
    if spec.local == "softmax":
        allowed = _per_head(seen & ctx.kernel & same_group)
        scores = torch.einsum("bhgtd,bhnd->bhgtn", qg, ctx.k) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
        out = out + torch.einsum("bhgtn,bhne->bhgte", probs * allowed.any(-1, keepdim=True), ctx.v)
    if spec.conv != "none":
        out = out + _conv(spec, params, q_pos, ctx, visible, groups)
    return out.reshape(batch, heads, t, dv)


def _kernel_terms(spec: MethodSpec, params: dict[str, Tensor], qg: Tensor, q_pos: Tensor, ctx: Context,
                  seen: Tensor, same_group: Tensor, parts: dict[str, Tensor] | None, r0: Tensor,
                  scale: float) -> Tensor:
    """Global and kernel-local branches: sum of weights * v (+ the state's phi(q) S), over the weight sum
    (+ phi(q) z) when normalized. Weights: phi_q.phi_k (* gamma^lag, or * alpha), relu2/YOSO locally."""
    dots = closed_form_dots(qg, ctx.k, spec, scale)
    with_state = parts is not None and spec.global_branch != "none"
    fq = features(qg, spec, params, q_pos, scale, query=True) if dots is None or with_state else None
    if dots is None:
        dots = torch.einsum("bhgtf,bhnf->bhgtn", fq, _key_features(ctx, spec, params, scale))
    weight = torch.zeros_like(dots)
    num_state = den_state = dots.new_zeros(())
    has_z = spec.normalizer == "denominator" and parts is not None
    if spec.global_branch == "inclusive":
        mask = seen & ctx.fresh
        term = torch.where(_per_head(mask), dots, 0.0)
        carry = dots.new_ones(())  # what phi(q) S is multiplied by
        if spec.decay:
            log_gamma = _log_gamma(params)[None, :, None, None]
            lag = (q_pos[:, :, None] - ctx.pos[:, None, :]).masked_fill(~mask, 0).abs()
            term = term * torch.exp(_per_head(lag) * log_gamma[..., None])
            carry = torch.exp((q_pos - r0[:, None] + 1)[:, None, None, :] * log_gamma)  # [B, Hkv, 1, T]
        weight = weight + term
        if parts is not None:
            num_state = torch.einsum("bhgtf,bhfe->bhgte", fq, parts["state"]) * carry[..., None]
            if has_z:
                den_state = torch.einsum("bhgtf,bhf->bhgt", fq, parts["normalizer"]) * carry
    if spec.global_branch == "grouped":
        alpha = grouped_alpha(spec, params["alpha"], q_pos)  # [B, 1, 1, T] or a scalar
        weight = weight + alpha[..., None] * torch.where(_per_head(seen & ctx.kernel & ~same_group), dots, 0.0)
        if parts is not None:
            num_state = alpha[..., None] * torch.einsum("bhgtf,bhfe->bhgte", fq, parts["state"])
            if has_z:
                den_state = alpha * torch.einsum("bhgtf,bhf->bhgt", fq, parts["normalizer"])
    if spec.local in ("relu2", "yoso"):
        weight = weight + torch.where(_per_head(seen & ctx.kernel & same_group), local_kernel(dots, spec), 0.0)
    num = torch.einsum("bhgtn,bhne->bhgte", weight, ctx.v) + num_state
    if spec.normalizer == "denominator":
        num = num / (weight.sum(-1) + den_state).clamp_min(denominator_eps(spec))[..., None]
    return num


def _conv(spec: MethodSpec, params: dict[str, Tensor], q_pos: Tensor, ctx: Context, visible: Tensor,
          groups: int) -> Tensor:
    """Depthwise conv on V as a banded matrix: tap K//2 - lag of the query head's filter at each lag."""
    size = spec.conv_kernel
    half = size // 2
    lag = q_pos[:, :, None] - ctx.pos[:, None, :]
    allowed = ctx.real[:, None, :] & ctx.conv & (lag <= half)
    allowed = allowed & ((lag >= 0) & visible if spec.conv == "causal" else lag >= -half)
    taps = params["conv_weight"].reshape(-1, groups, size)  # [Hkv, g, K]
    band = taps[:, :, (half - lag).clamp(0, size - 1)].permute(2, 0, 1, 3, 4)  # [B, Hkv, g, T, N]
    band = torch.where(allowed[:, None, None], band, 0.0)
    return torch.einsum("bhgtn,bhne->bhgte", band, ctx.v)


def fold(spec: MethodSpec, params: dict[str, Tensor], ctx: Context, parts: dict[str, Tensor], r0: Tensor,
         end: Tensor, scale: float) -> dict[str, Tensor]:
    """The state once the context's real tokens are absorbed (positions r0..end-1 are new; end [B]).

    Completed groups go into S; the tokens of the last, incomplete group fill the group buffer; the last
    K//2 tokens fill the conv window. Buffers are rebuilt with one-hot sums, which copy values exactly.
    """
    new = dict(parts)
    real = ctx.real
    if spec.global_branch != "none":
        fk = _key_features(ctx, spec, params, scale)
        carry = fk.new_ones(())  # what the old S is multiplied by
        if spec.global_branch == "inclusive":
            taken = real & ctx.fresh
        else:  # tokens of completed groups, including the old buffer's once its group completes
            taken = real & ctx.kernel & (ctx.pos < group_start(end, spec.group_size)[:, None])
        weight = taken[:, None, :].to(fk.dtype).expand(-1, fk.shape[1], -1)  # [B, Hkv, N]
        if spec.decay:
            log_gamma = _log_gamma(params)[None, :, None]
            lag = (end[:, None] - 1 - ctx.pos).masked_fill(~taken, 0)
            weight = weight * torch.exp(lag[:, None, :] * log_gamma)
            carry = torch.exp((end - r0)[:, None, None] * log_gamma)  # gamma^(tokens absorbed), [B, Hkv, 1]
        new["state"] = carry[..., None] * parts["state"] + torch.einsum("bhn,bhnf,bhne->bhfe", weight, fk, ctx.v)
        if "normalizer" in parts:
            new["normalizer"] = carry * parts["normalizer"] + torch.einsum("bhn,bhnf->bhf", weight, fk)
    if spec.uses_groups:
        base = group_start(end, spec.group_size)
        onehot = _slots(ctx.pos - base[:, None], real & ctx.kernel, spec.group_size, ctx.v.dtype)
        new["group_keys"] = torch.einsum("bnj,bhnd->bhjd", onehot, ctx.k)
        new["group_values"] = torch.einsum("bnj,bhnd->bhjd", onehot, ctx.v)
    if spec.conv != "none":
        half = spec.conv_kernel // 2
        onehot = _slots(ctx.pos - (end - half)[:, None], real & ctx.conv, half, ctx.v.dtype)
        new["conv"] = torch.einsum("bnj,bhnd->bhjd", onehot, ctx.v)
    if spec.uses_positions:
        new["position"] = end
    return new


def _slots(slot: Tensor, keep: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """One-hot [B, N, size]: token n goes to slot `slot[b, n]` when kept and in range."""
    hit = slot[:, :, None] == torch.arange(size, device=slot.device)
    return (hit & keep[:, :, None]).to(dtype)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, state: list[Tensor],
                     params: list[Tensor], spec: MethodSpec, scale: float,
                     initial: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Causal self-attention over new tokens from a state: the masked quadratic form, then the fold. `initial`:
    the state is the initial one (its S and z are zero), so the queries skip their product with them."""
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    parts = acc_parts(spec, state, acc)
    batch, t = q.shape[0], q.shape[2]
    r0 = start_position(parts, batch, q.device)
    real = key_mask
    pos = r0[:, None] + torch.cumsum(real, 1) - real.to(torch.int64)
    ctx = state_context(spec, parts, r0, k.to(acc), v.to(acc), pos, real)
    prefix = ctx.pos.shape[1] - t
    order = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    visible = torch.cat([order.new_ones(t, prefix), order], 1).expand(batch, t, -1)
    out = mix(spec, named, q, pos, ctx, visible, None if initial else parts, r0, scale)
    end = r0 + real.sum(1)
    return out.to(q.dtype), pack_state(spec, fold(spec, named, ctx, parts, r0, end, scale))


def bidirectional_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, params: list[Tensor],
                            spec: MethodSpec, scale: float) -> Tensor:
    """Encoder self-attention or cross-attention (any query/key lengths): every real key, no state.

    Positions are plain token indices; the grouped branch reads every other group, local its own group.
    """
    if spec.global_cap:
        raise ValueError(f"method {spec.name!r}: global_cap={spec.global_cap} bounds a causal sum over earlier "
                         "groups; a bidirectional site reads every other group: use global_cap=0 there")
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    batch, t, s = q.shape[0], q.shape[2], k.shape[2]
    device = q.device
    q_pos = torch.arange(t, device=device).expand(batch, t)
    yes = torch.ones(s, dtype=torch.bool, device=device)
    ctx = Context(real_only(k.to(acc), key_mask), real_only(v.to(acc), key_mask),
                  torch.arange(s, device=device).expand(batch, s), key_mask, yes, yes, yes)
    visible = torch.ones(batch, t, s, dtype=torch.bool, device=device)
    return mix(spec, named, q, q_pos, ctx, visible, None, torch.zeros(batch, dtype=torch.int64, device=device),
               scale).to(q.dtype)
