"""Launching the generated kernels: the Triton implementation behind `lincompile::attention`, and verify.

`attention` has the reference's signature and numbers (fp32 within 1e-5 relative). It launches the generated
`recurrent` kernel for one token per row and `chunked_fwd` otherwise. Calls outside what the kernels express
are served by `reference.attention` itself (never an approximation of it): bidirectional sites, padding that
is not a left-padded prefix, fp64, and direct calls that need autograd. `attention_backward` serves the op's
backward for a causal prefill from the initial state with every key real (training; `backward_applies`); the
op recomputes any other backward through the reference.

Which device runs what (`supports`): Triton on CUDA; on CPU only when `LINCOMPILE_KERNELS=triton`, which then
needs `TRITON_INTERPRET=1` (Triton's interpreter). `LINCOMPILE_KERNELS=reference` is honoured by the registry.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any, Callable

import torch
from torch import Tensor

from lincompile.kernels.linear_attention import reference
from lincompile.kernels.linear_attention.state import pack_state, unpack_state
from lincompile.kernels.triton import compile as gen
from lincompile.kernels.triton.codegen_features import MOVED_COLUMNS
from lincompile.kernels.triton.plan import Plan, block, unsupported_reason
from lincompile.methods.params import named_params, param_names, param_trainable
from lincompile.methods.spec import MethodSpec

#: Tests set this to fill every output with NaN before a launch, so an element a kernel misses shows up.
POISON_OUTPUTS = False
#: Software-pipelining stages of each generated kernel at launch (tests/kernels/triton/test_sm90_build.py builds
#: each with these). Kernels that walk chunks or hold chunk-sized tiles take one: at Triton's default 3,
#: chunked_fwd needs 368 KB of shared memory on sm_90 at d=128 (bf16; more in fp32) and chunk_outputs 295 KB at
#: d=64, beyond an H100/H200's 227 KB; with one, 112 KB (cross-compiled, not yet timed). The others keep the
#: default they ran with on an H200 (session 12).
STAGES = {"recurrent": 3, "verify_fwd": 3, "bwd_dq": 3, "bwd_dkv": 3,
          "chunked_fwd": 1, "chunk_sums": 1, "chunk_outputs": 1, "bwd_dq_chunks": 1, "bwd_dkv_chunks": 1}
#: Prefills and backwards of at least this many chunks run chunk-parallel (`codegen_parallel`,
#: `codegen_bwd_parallel`); shorter ones, and decay, walk the chunks in one program per head (`chunked_fwd`, `bwd_dq`
#: and `bwd_dkv`). Tests set it to run either form.
PARALLEL_MIN_CHUNKS = 4
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    """LINCOMPILE_KERNELS: auto (Triton on CUDA, reference on CPU; also when unset or empty), triton, or reference."""
    mode = os.environ.get("LINCOMPILE_KERNELS") or "auto"
    if mode not in _MODES:
        raise ValueError(f"LINCOMPILE_KERNELS={mode!r} is not one of {_MODES}")
    return mode


def supports(spec: MethodSpec, device: torch.device) -> bool:
    """True when the generated kernels serve this spec on this device (see the module docstring)."""
    mode = kernel_mode()
    kind = torch.device(device).type
    if mode == "reference" or not (kind == "cuda" or (kind == "cpu" and mode == "triton")):
        return False
    if unsupported_reason(spec) or importlib.util.find_spec("triton") is None:
        return False
    if kind == "cpu" and not gen.interpreting():
        raise RuntimeError("LINCOMPILE_KERNELS=triton on CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    if kind == "cpu":
        import numpy
        import triton

        problem = gen.interpreter_problem(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
    return True


def block_v(dv: int) -> int:
    """Columns of V per program: the whole head under the interpreter, at most 64 on a GPU."""
    full = block(dv)
    return full if gen.interpreting() else min(64, full)


def plan_for(spec: MethodSpec, dk: int, dv: int, dtype: torch.dtype) -> Plan:
    return Plan(spec, dk, dv, _DTYPES[dtype], block_v(dv))


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _constant(n: int, value: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A read-only [n] tensor of `value`, made once per device: the host path of a decode step launches no fill
    or compare kernels for the padding counts, real-token flags, start positions and absent tensors. Made and
    waited for outside any CUDA-graph capture (see `_constant_for`), so every stream sees it filled."""
    made = torch.full((n,), value, dtype=dtype, device=device)
    if made.is_cuda:
        torch.cuda.current_stream(device).synchronize()
    return made


def _constant_for(n: int, value: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`_constant`, or a fresh tensor while a CUDA graph is being captured (a fill recorded there has not run)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((n,), value, dtype=dtype, device=device)
    return _constant(n, value, dtype, device)


def _left_padding(key_mask: Tensor | None, batch: int, t: int, device: torch.device) -> Tensor | None:
    """Leading padding count per row [B] (int32), or None when the mask is not a left-padded prefix."""
    if key_mask is None:
        return _constant_for(batch, 0, torch.int32, device)
    mask = key_mask.to(torch.bool)
    pad = t - mask.sum(1)
    expected = torch.arange(t, device=device)[None, :] >= pad[:, None]
    return pad.to(torch.int32) if torch.equal(mask, expected) else None


def _kernel_shapes(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """4-D q, k, v of one dtype the kernels take, with matching batch, tokens, KV heads and head dim (GQA)."""
    return (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.dtype in _DTYPES and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[2] == k.shape[2] == v.shape[2]
            and q.shape[0] == k.shape[0] == v.shape[0] and k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0
            and q.shape[3] == k.shape[3])


def _launchable(q: Tensor, k: Tensor, v: Tensor, params: list[Tensor], causal: bool) -> bool:
    tensors = (q, k, v, *params)
    return (causal and _kernel_shapes(q, k, v) and q.shape[2] > 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _fallback(form: Callable[..., Any], *args: Any) -> Any:
    """The reference form itself, for a call the kernels do not express (tests patch this to catch it)."""
    return form(*args)


def feature_params(named: dict[str, Tensor], kv_heads: int) -> Tensor | None:
    """The feature map's parameters as the kernels read them, [Hkv, FP] fp32: performer's omega, or hedgehog's W
    then b; None for maps without parameters."""
    if "performer_features" in named:
        return named["performer_features"].reshape(kv_heads, -1).contiguous()
    if "hedgehog_weight" in named:
        return torch.cat([named["hedgehog_weight"].reshape(kv_heads, -1), named["hedgehog_bias"]], 1).contiguous()
    return None


class _Parts:
    """The state and parameters as the kernels read them: fp32 contiguous, a dummy for each absent tensor."""

    def __init__(self, spec: MethodSpec, state: list[Tensor], params: list[Tensor], q: Tensor, k: Tensor,
                 v: Tensor) -> None:
        batch, kv_heads, dk, dv = q.shape[0], k.shape[1], k.shape[3], v.shape[3]
        if not state:
            state = reference.init_state(spec, batch, kv_heads, dk, dv, q.device, q.dtype)
        parts = unpack_state(spec, state)
        self.spec = spec
        self.device = q.device
        self.dummy = _constant_for(1, 0, torch.float32, q.device)  # never written: kernels write a part the spec has
        self.parts = {n: t if n == "position" else t.to(torch.float32).contiguous() for n, t in parts.items()}
        named = named_params(spec, params, torch.float32)
        self.alpha = named["alpha"].reshape(1).contiguous() if "alpha" in named else self.dummy
        if spec.decay:  # the kernels read log gamma per KV head where alpha goes
            self.alpha = torch.nn.functional.logsigmoid(named["decay"]).contiguous()
        self.conv_weight = named["conv_weight"].contiguous() if "conv_weight" in named else self.dummy
        features = feature_params(named, kv_heads)
        self.features = features if features is not None else self.dummy
        position = parts.get("position")
        self.r0 = position if position is not None else _constant_for(batch, 0, torch.int64, q.device)

    def get(self, name: str) -> Tensor:
        return self.parts.get(name, self.dummy)

    def fresh(self) -> dict[str, Tensor]:
        """Output buffers for every floating state part."""
        return {n: _alloc(tuple(t.shape), torch.float32, self.device) for n, t in self.parts.items() if n != "position"}

    def state_args(self, out: dict[str, Tensor]) -> list[Tensor]:
        """(S, S', z, z', group_keys, group_values, group_keys', group_values', conv, conv') kernel arguments."""
        def o(name: str) -> Tensor:
            return out.get(name, self.dummy)
        return [self.get("state"), o("state"), self.get("normalizer"), o("normalizer"), self.get("group_keys"),
                self.get("group_values"), o("group_keys"), o("group_values"), self.get("conv"), o("conv")]


def _on_device(form: Callable[..., Any]) -> Callable[..., Any]:
    """`form` run with its first tensor's GPU as the current device: Triton launches on the current device, which
    is not the tensors' when they are on another GPU than cuda:0 (or the caller's `torch.cuda.set_device`)."""
    @functools.wraps(form)
    def run(q: Tensor, *args: Any, **kwargs: Any) -> Any:
        if q.device.type != "cuda":
            return form(q, *args, **kwargs)
        with torch.cuda.device(q.device):
            return form(q, *args, **kwargs)
    return run


@_on_device
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None, state: list[Tensor],
              params: list[Tensor], spec: MethodSpec, scale: float, causal: bool) -> tuple[Tensor, list[Tensor]]:
    """`reference.attention`'s contract, computed by the generated kernels where they apply."""
    args = (q, k, v, key_mask, bias, state, params, spec, scale, causal)
    if unsupported_reason(spec) or not _launchable(q, k, v, params, causal):
        return _fallback(reference.attention, *args)
    batch, heads, t, dk = q.shape
    if key_mask is not None and tuple(key_mask.shape) != (batch, t):
        return _fallback(reference.attention, *args)
    pad = _left_padding(key_mask, batch, t, q.device)
    if pad is None:
        return _fallback(reference.attention, *args)
    kv_heads, dv = k.shape[1], v.shape[3]
    parts = _Parts(spec, state, params, q, k, v)
    plan = plan_for(spec, dk, dv, q.dtype)
    module = gen.load(plan)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = _alloc((batch, heads, t, dv), q.dtype, q.device)
    new = parts.fresh()
    grid = (triton_cdiv(dv, plan.block_v), batch * heads)
    if t == 1:
        real = _constant_for(batch, 1, torch.int32, q.device) if key_mask is None else (pad == 0).to(torch.int32)
        module.recurrent[grid](q, k, v, out, parts.r0, real, *parts.state_args(new), parts.alpha,
                               parts.conv_weight, parts.features, scale, math.sqrt(scale), heads, kv_heads,
                               num_stages=STAGES["recurrent"])
    elif not spec.decay and triton_cdiv(t, plan.chunk) >= PARALLEL_MIN_CHUNKS:
        _parallel_prefill(module, plan, parts, new, (q, k, v, out, pad), scale, heads, kv_heads)
    else:
        module.chunked_fwd[grid](q, k, v, out, parts.r0, pad, *parts.state_args(new), parts.alpha,
                                 parts.conv_weight, parts.features, scale, math.sqrt(scale), t, heads, kv_heads,
                                 num_stages=STAGES["chunked_fwd"])
    if spec.uses_positions:
        new["position"] = parts.r0 + (t if key_mask is None else t - pad.to(torch.int64))
    return out, pack_state(spec, new)


def _parallel_prefill(module: Any, plan: Plan, parts: _Parts, new: dict[str, Tensor],
                      tensors: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], scale: float, heads: int,
                      kv_heads: int) -> None:
    """`chunked_fwd`'s contract by `chunk_sums`, an exclusive prefix sum of the chunks' additions to S and z here
    (fp32), then `chunk_outputs`; fills `new`."""
    q, k, v, out, pad = tensors
    batch, t, dv = q.shape[0], q.shape[2], v.shape[3]
    nc = triton_cdiv(t + plan.chunk - 1, plan.chunk)  # the first chunk may start up to C - 1 before the row
    v_blocks = triton_cdiv(dv, plan.block_v)
    prefix = {"state": parts.dummy, "normalizer": parts.dummy}
    if plan.spec.global_branch != "none":
        f = plan.spec.feature_dim(plan.dk)
        sums = {"state": _alloc((batch, kv_heads, nc, f, dv), torch.float32, q.device),
                "normalizer": _alloc((batch, kv_heads, nc, f), torch.float32, q.device)
                if "normalizer" in parts.parts else parts.dummy}
        module.chunk_sums[(v_blocks, batch * kv_heads, nc)](
            k, v, parts.r0, pad, parts.get("group_keys"), parts.get("group_values"), sums["state"],
            sums["normalizer"], parts.features, math.sqrt(scale), t, kv_heads, nc, num_stages=STAGES["chunk_sums"])
        for name in ("state", "normalizer"):
            if name in parts.parts:
                running = torch.cumsum(sums[name], 2)
                new[name] = parts.get(name) + running[:, :, -1]
                prefix[name] = running.sub_(sums[name]).add_(parts.get(name).unsqueeze(2))  # in place: exclusive
    buffers = parts.state_args(new)[4:]  # group keys / values and conv window, in and out
    module.chunk_outputs[(v_blocks, batch * heads, nc)](
        q, k, v, out, parts.r0, pad, prefix["state"], prefix["normalizer"], *buffers, parts.alpha, parts.conv_weight,
        parts.features, scale, math.sqrt(scale), t, heads, kv_heads, nc, num_stages=STAGES["chunk_outputs"])


@_on_device
def verify(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], params: list[Tensor], spec: MethodSpec,
           scale: float, parents: Tensor | None = None) -> tuple[Tensor, reference.VerifyExtras]:
    """`reference.verify`'s contract (k drafts under a chain or tree, state unchanged) by the verify kernel."""
    if unsupported_reason(spec) or not _launchable(q, k, v, params, True):
        return _fallback(reference.verify, q, k, v, state, params, spec, scale, parents)
    from lincompile.kernels.linear_attention.verify import tree

    batch, heads, count, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[3]
    parents, ancestors, depth = tree(parents, count, q.device)
    parts = _Parts(spec, state, params, q, k, v)
    plan = plan_for(spec, dk, dv, q.dtype)
    module = gen.load(plan)
    out = _alloc((batch, heads, count, dv), q.dtype, q.device)
    s = parts.state_args({})
    module.verify_fwd[(triton_cdiv(dv, plan.block_v), batch * heads)](
        q.contiguous(), k.contiguous(), v.contiguous(), out, parts.r0, depth.to(torch.int32),
        ancestors.to(torch.int8).contiguous(), s[0], s[2], s[4], s[5], s[8], parts.alpha, parts.conv_weight,
        parts.features, scale, math.sqrt(scale), count, heads, kv_heads, BT=max(16, 1 << (count - 1).bit_length()),
        num_stages=STAGES["verify_fwd"])
    return out, reference.VerifyExtras(spec, tuple(params), scale, k, v, parents)


def backward_verified(spec: MethodSpec, dk: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether the generated backward is known to match the reference for this kind of call.

    Not with decay in half precision: the decay's gradient is the difference of two large sums, which bf16
    operands lose (wrong by several times its size, here under the interpreter and on an H200 alike). Not on CUDA
    for the maps that move columns or head dims under 64: on an H200 (Triton 3.6,
    bench/results/gpu_h200/gpu_tests.log) every bf16 case at d=32 (those maps, the only ones run there at d=32) was
    wrong while passing under the interpreter. Such calls train through the reference's autograd."""
    if spec.decay and dtype != torch.float32:
        return False
    return device_type != "cuda" or (spec.feature_map not in MOVED_COLUMNS and dk >= 64)


def backward_applies(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, spec: MethodSpec, causal: bool) -> bool:
    """True when `attention_backward` can compute the gradients of a causal prefill from the initial state with
    every key real (the op checks those two from the values): a spec, device and dtype the kernels take, and a
    call `backward_verified`. Decided from shapes and types only."""
    return (supports(spec, q.device) and bias is None and causal and _kernel_shapes(q, k, v)
            and backward_verified(spec, q.shape[3], q.dtype, q.device.type))


@_on_device
def attention_backward(q: Tensor, k: Tensor, v: Tensor, params: list[Tensor], spec: MethodSpec, scale: float,
                       grad_out: Tensor, grad_state: list[Tensor | None] | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Gradients (dq, dk, dv, dparams of the trainable params) of a causal prefill from the initial state, given
    its output's gradient and (optionally, None for none) its returned state's, by the generated backward kernels
    (see `codegen_bwd`); the caller checks `backward_applies`."""
    batch, heads, t, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[3]
    parts = _Parts(spec, [], params, q, k, v)
    plan = Plan(spec, dk, dv, _DTYPES[q.dtype], block(dv))  # the backward takes all of DV per program
    module = gen.load_backward(plan)
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.to(q.dtype).contiguous()
    f32 = torch.float32
    dq = _alloc((batch, heads, t, dk), f32, q.device)
    dnum = _alloc((batch, heads, t, dv), f32, q.device)
    dden = _alloc((batch, heads, t), f32, q.device)
    dalpha = _alloc((batch * heads,), f32, q.device)
    dk_heads = _alloc((batch, heads, t, dk), f32, q.device)
    dv_heads = _alloc((batch, heads, t, dv), f32, q.device)
    dtaps = (torch.zeros(batch * heads, spec.conv_kernel, dtype=f32, device=q.device)  # taps > K//2 stay 0
             if spec.conv != "none" else parts.dummy)
    zeros = reference.init_state(spec, batch, kv_heads, dk, dv, q.device, torch.float32)
    grad_state = grad_state or [None] * len(zeros)
    given = unpack_state(spec, [z if g is None else g.to(torch.float32).contiguous()
                                for g, z in zip(grad_state, zeros)])
    state_grads = [given.get(name, parts.dummy)
                   for name in ("state", "normalizer", "group_keys", "group_values", "conv")]
    grid = (batch * heads,)
    features = spec.feature_dim(dk)
    dfeat = (torch.zeros(batch * heads, dk * features + features, dtype=f32, device=q.device)
             if spec.feature_map == "hedgehog" else parts.dummy)  # hedgehog's W and b gradients per program
    outs = (dq, dnum, dden, dalpha, dk_heads, dv_heads, dtaps, dfeat)
    if not spec.decay and triton_cdiv(t, plan.chunk) >= PARALLEL_MIN_CHUNKS:
        _parallel_backward(module, plan, parts, (q, k, v, grad_out), outs, state_grads, scale, heads, kv_heads)
    else:
        module.bwd_dq[grid](q, k, v, grad_out, dq, dnum, dden, dalpha, parts.alpha, parts.features, dfeat,
                            state_grads[0], state_grads[1], scale, math.sqrt(scale), t, heads, kv_heads,
                            num_stages=STAGES["bwd_dq"])
        module.bwd_dkv[grid](q, k, v, grad_out, dnum, dden, dk_heads, dv_heads, dtaps, dalpha, parts.alpha,
                             parts.conv_weight, parts.features, dfeat, *state_grads, scale, math.sqrt(scale), t,
                             heads, kv_heads, num_stages=STAGES["bwd_dkv"])
    per_kv = (batch, kv_heads, heads // kv_heads, t)
    grads = {}
    if spec.global_branch == "grouped":
        grads["alpha"] = dalpha.sum().reshape(())
    if spec.conv != "none":
        grads["conv_weight"] = dtaps.reshape(batch, heads, -1).sum(0)
    if spec.decay:  # dalpha holds d log(gamma) per program; d logsigmoid(x) / dx = sigmoid(-x)
        decay = named_params(spec, params, torch.float32)["decay"]
        grads["decay"] = dalpha.view(batch, kv_heads, -1).sum((0, 2)) * torch.sigmoid(-decay)
    if spec.feature_map == "hedgehog":  # dfeat: d(logits) x^T as [DK (i), 2 * DK (j)], then d(bias) [2 * DK]
        per_kv_feat = dfeat.view(batch, kv_heads, heads // kv_heads, -1).sum((0, 2))
        weight = per_kv_feat[:, :dk * features].view(kv_heads, dk, 2, dk).sum(2)
        grads["hedgehog_weight"] = weight.transpose(1, 2)
        grads["hedgehog_bias"] = per_kv_feat[:, dk * features:].view(kv_heads, 2, dk).sum(1)
    dparams = [grads[name].to(p.dtype).reshape(p.shape)
               for name, p, trainable in zip(param_names(spec), params, param_trainable(spec)) if trainable]
    return (dq.to(q.dtype), dk_heads.view(*per_kv, dk).sum(2).to(k.dtype),
            dv_heads.view(*per_kv, dv).sum(2).to(v.dtype), dparams)


def _parallel_backward(module: Any, plan: Plan, parts: _Parts, inputs: tuple[Tensor, ...], outs: tuple[Tensor, ...],
                       state_grads: list[Tensor], scale: float, heads: int, kv_heads: int) -> None:
    """`bwd_dq` then `bwd_dkv`'s contract by the chunk-parallel kernels (`codegen_bwd_parallel`): the chunks' sums,
    their exclusive prefix (S_c, z_c) and the reverse state's exclusive suffix are summed here in fp32; the
    per-chunk partials of alpha's, the taps' and hedgehog's gradients are summed into `outs`' per-head ones."""
    q, k, v, grad_out = inputs
    dq, dnum, dden, dalpha, dk_heads, dv_heads, dtaps, dfeat = outs
    batch, t = q.shape[0], q.shape[2]
    f, dv, nc = plan.spec.feature_dim(plan.dk), plan.dv, triton_cdiv(t, plan.chunk)
    dev, dummy, f32 = q.device, parts.dummy, torch.float32
    norm = plan.spec.normalizer == "denominator"
    glob = plan.spec.global_branch != "none"
    prefix, addition = [dummy, dummy], [dummy, dummy]
    if glob:
        sums = [_alloc((batch, kv_heads, nc, f, dv), f32, dev), _alloc((batch, kv_heads, nc, f), f32, dev)
                if norm else dummy]
        forward = plan_for(plan.spec, plan.dk, dv, q.dtype)  # its chunk_sums, from position 0 with no padding
        gen.load(forward).chunk_sums[(triton_cdiv(dv, forward.block_v), batch * kv_heads, nc)](
            k, v, parts.r0, _constant_for(batch, 0, torch.int32, dev), dummy, dummy, sums[0], sums[1],
            parts.features, math.sqrt(scale), t, kv_heads, nc, num_stages=STAGES["chunk_sums"])
        prefix = [_exclusive_scan(x) if x is not dummy else dummy for x in sums]
        addition = [_alloc((batch, heads, nc, f, dv), f32, dev), _alloc((batch, heads, nc, f), f32, dev)
                    if norm else dummy]
    rows = batch * heads
    slots = {"alpha": _alloc((rows, nc), f32, dev) if plan.spec.global_branch == "grouped" else dummy,
             "taps": torch.zeros(rows, nc, dtaps.shape[1], dtype=f32, device=dev) if dtaps is not dummy else dummy,
             "features": _alloc((rows, nc, dfeat.shape[1]), f32, dev) if dfeat is not dummy else dummy}
    scales = (scale, math.sqrt(scale), t, heads, kv_heads, nc)
    module.bwd_dq_chunks[(rows, nc)](q, k, v, grad_out, dq, dnum, dden, slots["alpha"], parts.alpha,
                                     parts.features, slots["features"], *prefix, *addition, *scales,
                                     num_stages=STAGES["bwd_dq_chunks"])
    suffix = [dummy, dummy]
    for i, (part, given) in enumerate(zip(addition, state_grads[:2])):
        if part is not dummy:
            later = _exclusive_scan(part.view(batch, kv_heads, heads // kv_heads, *part.shape[2:]).sum(2), True)
            suffix[i] = later.add_(given.unsqueeze(2)) if given is not dummy else later
    module.bwd_dkv_chunks[(rows, nc)](q, k, v, grad_out, dnum, dden, dk_heads, dv_heads, slots["taps"],
                                      parts.alpha, parts.conv_weight, parts.features, slots["features"], *suffix,
                                      *state_grads[2:], *scales, num_stages=STAGES["bwd_dkv_chunks"])
    for slot, total in zip(slots.values(), (dalpha, dtaps, dfeat)):  # taps > K // 2 stay 0
        if slot is not dummy:
            total.copy_(slot.sum(1))


def _exclusive_scan(x: Tensor, reverse: bool = False) -> Tensor:
    """Along dim 2 (chunks): each chunk's sum over the chunks before it (after it, when `reverse`), added in chunk
    order (reverse order); the first (last) chunk's is exactly 0."""
    out = torch.zeros_like(x)
    if reverse:
        out[:, :, :-1] = torch.cumsum(x[:, :, 1:].flip(2), 2).flip(2)
    else:
        out[:, :, 1:] = torch.cumsum(x[:, :, :-1], 2)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
