"""8-bit linear layers, plain PyTorch: the truth `linear.int8_linear` is tested against.

Scheme (symmetric, no zero points):
  weights      one scale per output row: w_scale = max|w[n, :]| / 127, w_q = round(w / w_scale) in [-127, 127];
  activations  one scale per token (row of x), computed at each call: x_scale = max|x[m, :]| / 127,
               x_q = round(x / x_scale) in [-127, 127];
  product      y[m, n] = (sum_k x_q[m, k] w_q[n, k]) * w_scale[n] * x_scale[m] (+ bias[n]).
Each row's scale depends on that row alone and the integer sums are exact, so a token's output does not depend on
the other rows of the call (a verify call of k tokens computes what k one-token calls compute). An all-zero row
takes the scale TINY / 127 and quantizes to zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: The largest magnitude of a quantized value (-128 is never used, so the scheme is symmetric).
LEVELS = 127
#: The smallest max|row| a scale is computed from (an all-zero row would otherwise divide by zero).
TINY = 1e-12


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(w_q int8 [N, K], w_scale float32 [N]) of a float weight [N, K]."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"an 8-bit weight is quantized from a float [out, in] matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp_min(TINY) / LEVELS
    return torch.round(w / scale[:, None]).clamp(-LEVELS, LEVELS).to(torch.int8), scale


def quantize_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(x_q int8 [M, K], x_scale float32 [M, 1]) of float rows [M, K] (computed in float32)."""
    x = rows.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(TINY) / LEVELS
    return torch.round(x / scale).to(torch.int8), scale


def int8_linear_reference(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y [..., N] in x's dtype for x [..., K] and a `quantize_weight` pair: the integer product in float64 (exact:
    every partial sum is an integer below 2**53), then the scales."""
    xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = (xq.double() @ weight.double().t()) * scale.double() * x_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
