"""The fast form of an 8-bit linear layer on the CPU: `torch._int_mm` (int8 x int8 -> int32, oneDNN).

Same scheme and quantization steps as `reference.int8_linear_reference`; the integer sums are exact, so the two
differ only by the float32 rounding of the two scale products. tests/kernels/test_int8.py checks it on fresh
random inputs, row by row against one-row calls (bit for bit), and against the float product within the
quantization error bound.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lincompile.kernels.int8.reference import quantize_rows


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y [..., N] in x's dtype for x [..., K] (float, on the CPU) and a `quantize_weight` pair (w_q [N, K],
    w_scale [N]). Inference only: x may not require grad (the integer product has no gradient)."""
    if x.device.type != "cpu":
        raise RuntimeError(f"8-bit linear layers run on the CPU (torch._int_mm), not on {x.device}: quantize a "
                           "model that runs on the CPU, or keep float weights on a GPU (bf16 there)")
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("8-bit linear layers have no gradient: train the float model, then quantize it")
    xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._int_mm(xq, weight.t()).float() * scale * x_scale
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
