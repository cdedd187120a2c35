"""Token-by-token decoding with explicit recurrences (the decode kernels' reference).

Per real token at position p, for linear methods:
  inclusive   S = gamma S + phi(k) v^T,  z = gamma z + phi(k);   o_glob = phi(q) S  (/ phi(q) z)
  grouped     o_glob = alpha phi(q) S_completed;  once p % G == G-1, S_completed += the group, buffer cleared
  local       buffer[p % G] = (k, v);  o_loc = sum_{j <= p % G} kernel(q, buffer_j) v_j
  conv        o_conv = sum_j w[j] window[j] + w[K//2] v;  window = window[1:] + [v]
A padding token reads the state as a zero token at p would, and changes nothing. `absorb_linear` runs the
same state updates without the outputs (what a speculative commit needs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from lincompile.kernels.linear_attention.reference_linear import acc_parts, grouped_alpha, start_position
from lincompile.kernels.linear_attention.reference_softmax import cache_weights
from lincompile.kernels.linear_attention.state import accumulation_dtype, pack_state, real_only
from lincompile.methods.feature_maps import denominator_eps, features, local_kernel
from lincompile.methods.params import named_params
from lincompile.methods.spec import MethodSpec


def recurrent_cache(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, state: list[Tensor],
                    params: list[Tensor], spec: MethodSpec, scale: float) -> tuple[Tensor, list[Tensor]]:
    """KV-cache methods: append the token to the cache (zeros for padding), then attend over the whole cache."""
    batch, heads, t, dk = q.shape
    kv_heads = k.shape[1]
    k, v = real_only(k, key_mask), real_only(v, key_mask)
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    keys, values, mask = state
    outs = []
    for i in range(t):
        keys = torch.cat([keys.to(k.dtype), k[:, :, i:i + 1]], 2)
        values = torch.cat([values.to(v.dtype), v[:, :, i:i + 1]], 2)
        mask = torch.cat([mask, key_mask[:, i:i + 1]], 1)
        qi = q[:, :, i:i + 1].to(acc).reshape(batch, kv_heads, heads // kv_heads, 1, dk)
        probs = cache_weights(spec, named, qi, keys.to(acc), mask[:, None, :], None, scale)
        outs.append(torch.einsum("bhgtl,bhld->bhgtd", probs, values.to(acc)).reshape(batch, heads, 1, -1))
    return _tokens(outs, q, v).to(q.dtype), [keys, values, mask]


def recurrent_linear(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, state: list[Tensor],
                     params: list[Tensor], spec: MethodSpec, scale: float) -> tuple[Tensor, list[Tensor]]:
    """Linear methods, one token at a time through the constant-size state (`token_step`)."""
    acc = accumulation_dtype(q.dtype)
    named = named_params(spec, params, acc)
    parts = acc_parts(spec, state, acc)
    pos = start_position(parts, q.shape[0], q.device)
    outs = []
    for i in range(q.shape[2]):
        outs.append(token_step(spec, named, parts, q[:, :, i], k[:, :, i], v[:, :, i], key_mask[:, i], pos, scale))
        pos = pos + key_mask[:, i].to(torch.int64)
    if spec.uses_positions:
        parts["position"] = pos
    return _tokens([o[:, :, None] for o in outs], q, v).to(q.dtype), pack_state(spec, parts)


def _tokens(outs: list[Tensor], q: Tensor, v: Tensor) -> Tensor:
    """Per-token outputs [B, H, 1, dv] joined along the tokens; [B, H, 0, dv] for none."""
    return torch.cat(outs, 2) if outs else q.new_zeros(q.shape[0], q.shape[1], 0, v.shape[-1])


def first_token(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: list[Tensor],
                params: list[Tensor], spec: MethodSpec, scale: float) -> tuple[Tensor, list[Tensor]]:
    """`recurrent_linear` on the call's first token alone (out [B, H, 1, dv], the state after it), for any T and
    in tensor ops only: the form the ONNX export runs at a decode step (`backends.onnx_step`)."""
    acc = accumulation_dtype(q.dtype)
    parts = acc_parts(spec, state, acc)
    pos = start_position(parts, q.shape[0], q.device)
    real = torch.ones_like(pos, dtype=torch.bool) if key_mask is None else key_mask[:, 0].to(torch.bool)
    out = token_step(spec, named_params(spec, params, acc), parts, q[:, :, 0], k[:, :, 0], v[:, :, 0], real, pos,
                     scale)
    if spec.uses_positions:
        parts["position"] = pos + real.to(torch.int64)
    return out[:, :, None].to(q.dtype), pack_state(spec, parts)


def token_step(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], q: Tensor, k: Tensor,
               v: Tensor, real: Tensor, pos: Tensor, scale: float) -> Tensor:
    """One token of a linear method: q [B, H, dk], k [B, Hkv, dk], v [B, Hkv, dv] at positions pos [B], `real` [B]
    bool; returns its output [B, H, dv] (accumulation dtype) and absorbs the real rows' tokens into `parts` (S, z,
    group buffer, conv window; not the position counter). Tensor ops only, no branch on values but the fold's
    guard (`_any`), so a trace of one call is right for any values: the ONNX export's decode step is this."""
    batch, heads, dk = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    acc = accumulation_dtype(q.dtype)
    size, half = spec.group_size, spec.conv_kernel // 2
    slots = torch.arange(size, device=q.device)
    qi = q.to(acc).reshape(batch, kv_heads, groups, 1, dk)
    ki, vi = _token(k, real, acc), _token(v, real, acc)
    here = pos[:, None]
    fq = features(qi, spec, named, here, scale, query=True)[:, :, :, 0]  # [B, Hkv, g, F]
    num: Tensor | None = None  # kernel-weighted values (global and kernel-local branches)
    den: Tensor | None = None  # their weights' sum
    out: Tensor | None = None  # softmax-local output (normalized on its own) and the conv
    if spec.global_branch == "inclusive":
        gamma = torch.exp(F.logsigmoid(named["decay"]))[None, :] if spec.decay else None  # [1, Hkv]
        s_next, z_next = _inclusive_next(spec, named, parts, ki, vi, real, here, scale, gamma)
        num = fq @ s_next
        if z_next is not None:
            den = (fq @ z_next[..., None])[..., 0]
        _keep_real(parts, real, s_next, z_next)
    if spec.global_branch == "grouped":
        alpha = grouped_alpha(spec, named["alpha"], pos)  # [B, 1, 1] or a scalar
        num = alpha[..., None] * (fq @ parts["state"])
        if "normalizer" in parts:
            den = alpha * (fq @ parts["normalizer"][..., None])[..., 0]
    fb = None  # phi of the buffer's keys, once per token
    if spec.uses_groups:
        write = _write_group(parts, ki, vi, real, pos, slots)
        valid = ((slots < (pos % size)[:, None]) | write)[:, None, None, :]  # [B, 1, 1, G]
        if spec.local in ("relu2", "yoso") or spec.global_branch == "grouped":
            fb = buffer_features(spec, named, parts, pos, scale, slots)
        if spec.local in ("relu2", "yoso"):
            w = torch.where(valid, local_kernel(fq @ fb.transpose(-1, -2), spec), 0.0)
            num = _plus(num, w @ parts["group_values"])
            den = _plus(den, w.sum(-1))
        if spec.local == "softmax":
            scores = (qi[:, :, :, 0] @ parts["group_keys"].transpose(-1, -2)) * scale
            scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)  # bf16 under autocast
            out = (torch.softmax(scores, -1) * valid.any(-1, True)) @ parts["group_values"]
    if num is not None:
        if spec.normalizer == "denominator":
            num = num / den.clamp_min(denominator_eps(spec))[..., None]
        out = _plus(out, num)
    if spec.conv != "none":
        taps = named["conv_weight"].reshape(kv_heads, groups, -1)
        out = _plus(out, taps[:, :, :half] @ parts["conv"])
        out = out + taps[None, :, :, half, None] * vi[:, :, None, :]
        _shift_conv(parts, vi, real)
    if spec.uses_groups:
        complete = real & (pos % size == size - 1)
        if _any(complete):  # most tokens complete nothing
            fold_completed_group(spec, parts, complete, fb)
    return out.reshape(batch, heads, -1)


def _token(x: Tensor, real: Tensor, acc: torch.dtype) -> Tensor:
    """A token's key or value [B, Hkv, d] in the accumulation dtype, zero in padding rows (whatever they held), and
    contiguous whatever its layout: the decode step and a commit then run the same kernels, so the same bits."""
    return torch.where(real[:, None, None], x.to(acc), 0.0)


def _plus(total: Tensor | None, term: Tensor) -> Tensor:
    """`total + term`, or `term` when there is no total yet."""
    return term if total is None else total + term


def absorb_linear(k: Tensor, v: Tensor, state: list[Tensor], params: list[Tensor], spec: MethodSpec,
                  scale: float) -> list[Tensor]:
    """The state after decoding the real tokens k, v [B, Hkv, t, d] one at a time: `recurrent_linear`'s state
    updates, op for op (so the same state bit for bit), without computing outputs. When every row is at the
    same position (a speculative commit), buffer and window updates go in runs of copies, bit for bit the same."""
    batch = k.shape[0]
    acc = accumulation_dtype(k.dtype)
    named = named_params(spec, params, acc)
    parts = acc_parts(spec, state, acc)
    pos = start_position(parts, batch, k.device)
    slots = torch.arange(spec.group_size, device=k.device)
    if spec.uses_groups and spec.global_branch != "inclusive" and bool((pos == pos[0]).all()):
        pos = _absorb_runs(spec, named, parts, k.to(acc), v.to(acc), pos, scale, slots)
        if spec.uses_positions:
            parts["position"] = pos
        return pack_state(spec, parts)
    gamma = torch.exp(F.logsigmoid(named["decay"]))[None, :] if spec.decay else None
    real = torch.ones(batch, dtype=torch.bool, device=k.device)
    for i in range(k.shape[2]):
        ki, vi = _token(k[:, :, i], real, acc), _token(v[:, :, i], real, acc)
        if spec.global_branch == "inclusive":
            _keep_real(parts, real, *_inclusive_next(spec, named, parts, ki, vi, real, pos[:, None], scale, gamma))
        if spec.uses_groups:
            _write_group(parts, ki, vi, real, pos, slots)
        if spec.conv != "none":
            _shift_conv(parts, vi, real)
        if spec.uses_groups:
            complete = pos % spec.group_size == spec.group_size - 1
            if _any(complete):
                fb = (buffer_features(spec, named, parts, pos, scale, slots) if spec.global_branch == "grouped"
                      else None)
                fold_completed_group(spec, parts, complete, fb)
        pos = pos + 1
    if spec.uses_positions:
        parts["position"] = pos
    return pack_state(spec, parts)


def _absorb_runs(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], k: Tensor, v: Tensor,
                 pos: Tensor, scale: float, slots: Tensor) -> Tensor:
    """`absorb_linear` for a method with group buffers and no inclusive branch (nothing summed per token) when
    every row is at the same position: each run of tokens up to a group's end goes into the buffer and the conv
    window in one copy, and a completed group is folded as the token loop folds it, so the state is the same
    bit for bit. Updates `parts` (never the caller's tensors); returns the position after the last token."""
    parts["group_keys"], parts["group_values"] = parts["group_keys"].clone(), parts["group_values"].clone()
    done, t, start = 0, k.shape[2], int(pos[0])
    while done < t:
        slot = (start + done) % spec.group_size
        n = min(t - done, spec.group_size - slot)
        parts["group_keys"][:, :, slot:slot + n] = k[:, :, done:done + n]
        parts["group_values"][:, :, slot:slot + n] = v[:, :, done:done + n]
        if spec.conv != "none":
            parts["conv"] = torch.cat([parts["conv"], v[:, :, done:done + n]], 2)[:, :, n:].contiguous()
        done += n
        if slot + n == spec.group_size:
            last = pos + (done - 1)
            fb = (buffer_features(spec, named, parts, last, scale, slots) if spec.global_branch == "grouped"
                  else None)
            fold_completed_group(spec, parts, torch.ones_like(pos, dtype=torch.bool), fb)
    return pos + t


def _inclusive_next(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], ki: Tensor, vi: Tensor,
                    real: Tensor, here: Tensor, scale: float,
                    gamma: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """S and z once the token is absorbed (a padding row adds nothing but still decays)."""
    rf = real.to(ki.dtype)[:, None, None]  # [B, 1, 1]
    fk = features(ki[:, :, None, None], spec, named, here, scale)[:, :, 0, 0]  # [B, Hkv, F]
    decay = 1.0 if gamma is None else gamma
    s_next = _scale(parts["state"], decay) + rf[..., None] * fk[..., :, None] * vi[..., None, :]
    z_next = _scale(parts["normalizer"], decay) + rf * fk if "normalizer" in parts else None
    return s_next, z_next


def _keep_real(parts: dict[str, Tensor], real: Tensor, s_next: Tensor, z_next: Tensor | None) -> None:
    """Store S and z for real rows (padding rows keep theirs), in place."""
    parts["state"] = torch.where(real[:, None, None, None], s_next, parts["state"])
    if z_next is not None:
        parts["normalizer"] = torch.where(real[:, None, None], z_next, parts["normalizer"])


def _write_group(parts: dict[str, Tensor], ki: Tensor, vi: Tensor, real: Tensor, pos: Tensor,
                 slots: Tensor) -> Tensor:
    """Put the token into its group-buffer slot (real rows), in place; returns the slot written [B, G].
    `slots` = arange(group size)."""
    write = (slots == (pos % slots.shape[0])[:, None]) & real[:, None]
    parts["group_keys"] = torch.where(write[:, None, :, None], ki[:, :, None], parts["group_keys"])
    parts["group_values"] = torch.where(write[:, None, :, None], vi[:, :, None], parts["group_values"])
    return write


def buffer_features(spec: MethodSpec, named: dict[str, Tensor], parts: dict[str, Tensor], pos: Tensor,
                     scale: float, slots: Tensor) -> Tensor:
    """phi of the group buffer's keys [B, Hkv, G, F], each slot at its position in the group of `pos`."""
    buffer_pos = pos[:, None] - (pos % spec.group_size)[:, None] + slots
    return features(parts["group_keys"][:, :, None], spec, named, buffer_pos, scale)[:, :, 0]


def _shift_conv(parts: dict[str, Tensor], vi: Tensor, real: Tensor) -> None:
    """Append the token's value to the conv window and drop the oldest (real rows), in place."""
    shifted = torch.cat([parts["conv"], vi[:, :, None]], 2)[:, :, 1:]
    parts["conv"] = torch.where(real[:, None, None, None], shifted, parts["conv"])


def _scale(x: Tensor, decay: Tensor | float) -> Tensor:
    """gamma [1, Hkv] times a per-head tensor [B, Hkv, ...]."""
    if isinstance(decay, float):
        return x
    return x * decay.reshape(decay.shape + (1,) * (x.dim() - 2))


def _any(flags: Tensor) -> bool:
    """Whether any flag is set; True for a tracing tensor, which has no values (the op's backward, traced by
    `torch.library.opcheck` or AOT autograd, recomputes through this reference): the fold it guards is masked
    by the flags, so running it is right for any values."""
    return is_fake(flags) or bool(flags.any())


def fold_completed_group(spec: MethodSpec, parts: dict[str, Tensor], complete: Tensor, fb: Tensor | None) -> None:
    """Rows whose group just completed: add it to S (grouped branch; `fb` = phi of the buffer's keys) and
    clear the buffer, in place."""
    if spec.global_branch == "grouped":
        assert fb is not None
        flag = complete[:, None, None].to(fb.dtype)
        parts["state"] = parts["state"] + flag[..., None] * (fb.transpose(-1, -2) @ parts["group_values"])
        if "normalizer" in parts:
            parts["normalizer"] = parts["normalizer"] + flag * fb.sum(2)
    for name in ("group_keys", "group_values"):
        parts[name] = torch.where(complete[:, None, None, None], 0.0, parts[name])
