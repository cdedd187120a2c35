"""Which implementation serves `lincompile::attention` for a given spec and device.

Each entry is (name, impl, supports, priority); the plain PyTorch reference is always registered with
the lowest priority and supports everything, so every device always has an implementation.
The generated Triton kernels (`lincompile.kernels.triton`) serve the specs they cover on CUDA, and on CPU under
`LINCOMPILE_KERNELS=triton` with TRITON_INTERPRET=1. Elsewhere causal linear sites go through `recurrent-step`:
single-token calls (decode) take the recurrent form, as `decode.step` where it applies (every row real: the same
math in fewer ops) and as the reference's otherwise; calls of up to `CHUNK` tokens (a speculative verify) take
`chain.run` where it applies (every row real, at one position, within one group) and the parallel form otherwise;
longer ones (prefill, training) in chunks through the state, linear in T: at inference chunks cut at group
boundaries, each through `chain.run` where it applies (a prefill of real rows in step); under autograd the
reference's chunked form.
`LINCOMPILE_KERNELS=reference` forces the parallel reference for every call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from lincompile.kernels.linear_attention import chain, decode, reference
from lincompile.kernels.linear_attention.state import unpack_state
from lincompile.kernels.triton import launch as triton_launch
from lincompile.methods.spec import MethodSpec

AttentionImpl = Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]

#: `recurrent-step` runs causal calls longer than this in chunks of this many tokens (`reference.chunked`: the
#: parallel form is quadratic in T; `python bench/attention_kernels.py` on this CPU, augmented with 4 heads: the
#: chunked form 2.4x faster at 512 tokens, 13x at 2K).
CHUNK = 64


@dataclass(frozen=True)
class Backward:
    """An implementation's own backward for causal prefills from the initial state with every key real (the op
    checks those from the values). `applies(q, k, v, bias, spec, causal)` decides from shapes and types only;
    `impl(q, k, v, params, spec, scale, grad_out, grad_state)` returns (dq, dk, dv, dparams)."""

    applies: Callable[..., bool]
    impl: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]]


@dataclass(frozen=True)
class KernelEntry:
    """An implementation of the op. Without a `backward` (or where it does not apply) the op's backward
    recomputes the forward through this implementation under autograd."""

    name: str
    impl: AttentionImpl
    supports: Callable[[MethodSpec, torch.device], bool]
    priority: int
    backward: Backward | None = None


_ENTRIES: list[KernelEntry] = [
    KernelEntry("reference", reference.attention, lambda spec, device: True, priority=-1_000_000),
]


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                   bias: torch.Tensor | None, state: list[torch.Tensor], params: list[torch.Tensor],
                   spec: MethodSpec, scale: float, causal: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One causal token: `decode.step` where it applies, else `reference.recurrent`; more than `CHUNK` causal
    tokens: `_chunks` (inference) or `reference.chunked` (under autograd or tracing); fewer: `chain.run` where it
    applies; anything else: `reference.attention` (the forms agree: tests/kernels/test_registry.py,
    test_decode.py and test_chain.py check it on every causal linear method)."""
    if causal and q.shape[2] == 1:
        if decode.applies(q, key_mask, state, spec, causal):
            return decode.step(q, k, v, state, params, spec, scale)
        return reference.recurrent(q, k, v, key_mask, state, params, spec, scale)
    if causal and q.shape[2] > CHUNK:
        if torch.is_grad_enabled() or is_fake(q) or k.shape[2] != q.shape[2]:
            return reference.chunked(q, k, v, key_mask, bias, state, params, spec, scale, causal, CHUNK)
        return _chunks(q, k, v, key_mask, state, params, spec, scale)
    if k.shape[2] == q.shape[2] and chain.applies(q, key_mask, state, spec, causal):
        return chain.run(q, k, v, state, params, spec, scale)
    return reference.attention(q, k, v, key_mask, bias, state, params, spec, scale, causal)


def _chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
            state: list[torch.Tensor], params: list[torch.Tensor], spec: MethodSpec,
            scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A long causal call in chunks of at most `CHUNK` tokens through the state, each through `recurrent_step`
    (so `chain.run` where it applies: a prefill of real rows in step). With group buffers the chunks are cut at
    row 0's group boundaries, so that each can stay within one group. The chunks of `reference.chunked`, cut
    elsewhere: the same numbers to rounding."""
    start = 0
    if spec.uses_groups and state:
        position = unpack_state(spec, state).get("position")
        start = 0 if position is None or not position.numel() else int(position[0])
    outs, done, total = [], 0, q.shape[2]
    while done < total:
        size = min(CHUNK, total - done)
        if spec.uses_groups:
            size = min(size, spec.group_size - (start + done) % spec.group_size)
        end = done + size
        out, state = recurrent_step(q[:, :, done:end], k[:, :, done:end], v[:, :, done:end],
                                    None if key_mask is None else key_mask[:, done:end], None, state, params, spec,
                                    scale, True)
        outs.append(out)
        done = end
    return torch.cat(outs, 2), state


def _serves_recurrent_step(spec: MethodSpec, device: torch.device) -> bool:
    return spec.kind == "linear" and spec.causal_safe


def register_kernel(entry: KernelEntry) -> None:
    """Add an implementation; higher priority wins among those that support the call."""
    if any(e.name == entry.name for e in _ENTRIES):
        raise ValueError(f"kernel {entry.name!r} is already registered")
    _ENTRIES.append(entry)
    _ENTRIES.sort(key=lambda e: -e.priority)


def select(spec: MethodSpec, device: torch.device) -> KernelEntry:
    """The highest-priority implementation that supports this spec on this device (the reference alone under
    LINCOMPILE_KERNELS=reference)."""
    forced = triton_launch.kernel_mode() == "reference"
    for entry in _ENTRIES:
        if forced and entry.name != "reference":
            continue
        if entry.supports(spec, device):
            return entry
    raise RuntimeError("no attention kernel registered")  # unreachable: the reference supports all


register_kernel(KernelEntry("triton", triton_launch.attention, triton_launch.supports, priority=100,
                            backward=Backward(triton_launch.backward_applies, triton_launch.attention_backward)))
register_kernel(KernelEntry("recurrent-step", recurrent_step, _serves_recurrent_step, priority=0))
