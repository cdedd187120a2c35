"""The fast form of an 8-bit linear layer on the CPU: `torch._int_mm` (int8 x int8 -> int32, oneDNN).

Same scheme and quantization steps as `reference.int8_linear_reference`; the integer sums are exact, so the two
differ only by the float32 rounding of the two scale products. tests/kernels/test_int8.py checks it on fresh
random inputs, row by row against one-row calls (bit for bit), and against the float product within the
quantization error bound.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from lincompile.kernels.int8.reference import quantize_rows

NO_GRADIENT = "8-bit linear layers have no gradient: train the float model, then quantize it"


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y [..., N] in x's dtype for x [..., K] (float, on the CPU, K >= 2) and a `quantize_weight` pair (w_q [N, K],
    w_scale [N]). Inference only: a backward through it raises."""
    if x.device.type != "cpu":
        raise RuntimeError(f"8-bit linear layers run on the CPU (torch._int_mm), not on {x.device}: quantize a "
                           "model that runs on the CPU, or keep float weights on a GPU (bf16 there)")
    if weight.shape[1] < 2:  # torch._int_mm sums wrongly over a single input (torch 2.13, CPU)
        raise ValueError(f"an 8-bit linear layer needs at least 2 inputs, got {weight.shape[1]}: keep it float")
    if x.requires_grad and torch.is_grad_enabled():  # a forward outside no_grad: fine, until a backward
        return _Inference.apply(x, weight, scale, bias)
    return _product(x, weight, scale, bias)


#: Below this `int8_speedup`, `quantize` warns that 8-bit linear layers are slower than float here (a margin
#: under 1, so that timing noise near parity does not make the warning come and go).
SLOW_INT8 = 0.8


@functools.lru_cache(maxsize=None)
def int8_speedup() -> float:
    """How many times faster `torch._int_mm` multiplies than a float32 matmul of the same shape on this CPU
    ([32, 512] x [512, 512], best of 6 calls each on one thread, measured once per process). Above 1 where oneDNN
    has int8 kernels for the CPU (AVX512 VNNI, AMX); far below on others (an AVX2 CPU measured 0.007-0.023). One
    thread: with the other cores busy, a multi-threaded float product of this size waits on the thread pool (28 ms
    instead of 0.3 ms on a loaded 2-core machine in session 35), which made int8 look as fast as float."""
    from lincompile.runtime.timing import best_time

    a, b = torch.ones(32, 512, dtype=torch.int8), torch.ones(512, 512, dtype=torch.int8)
    af, bf = a.float(), b.float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = [best_time(product, 1 + 5)[0] for product in (lambda: af @ bf, lambda: torch._int_mm(a, b))]
    finally:
        torch.set_num_threads(threads)
    return times[0] / times[1]


def _product(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._int_mm(xq, weight.t()).float() * scale * x_scale
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class _Inference(torch.autograd.Function):
    """`_product` in a graph that records gradients: the forward as it is, a backward that raises (the integer
    product has no gradient, and a silent zero would train the rest of the model wrongly)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        return _product(x, weight, scale, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:
        raise RuntimeError(NO_GRADIENT)
