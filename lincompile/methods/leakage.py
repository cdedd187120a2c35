"""Information-leakage check: does a method's output at position t depend on tokens after t?

For each method, run its parallel form on random inputs with nonzero parameters (every conv tap random,
alpha 1), replace every token after t by fresh random q, k, v, and measure the largest change of the outputs
at positions <= t. A causal method changes nothing (exactly, in fp64); the centered conv (the paper's leaking
augmentation) does. Methods that are not causal-capable (Linformer) are measured through their only,
bidirectional form, which shows why they cannot serve a causal LM.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from lincompile.kernels.linear_attention import reference
from lincompile.methods.params import random_params
from lincompile.methods.spec import get_method, methods

#: fp64 outputs that differ by more than this count as a leak.
LEAK_TOLERANCE = 1e-9


class LeakageResult(NamedTuple):
    name: str
    leaks: bool
    max_change: float

    @property
    def causal_capable(self) -> bool:
        """False when the method has no causal form (its row was measured bidirectionally)."""
        return get_method(self.name).causal_capable


def _measure(name: str, seed: int) -> LeakageResult:
    spec = get_method(name)
    heads, kv_heads, head_dim = 2, 1, 8
    tokens = max(2 * spec.group_size + 8, spec.conv_kernel + 8)
    cut = tokens // 2  # outputs at positions 0..cut must not move
    generator = torch.Generator().manual_seed(seed)
    draw = lambda h, t: torch.randn(1, h, t, head_dim, generator=generator, dtype=torch.float64)  # noqa: E731
    q, k, v = draw(heads, tokens), draw(kv_heads, tokens), draw(kv_heads, tokens)
    later = cut + 1
    q2, k2, v2 = (torch.cat([x[:, :, :later], draw(x.shape[1], tokens - later)], 2) for x in (q, k, v))
    params = [p.to(torch.float64) for p in random_params(spec, heads, kv_heads, head_dim, head_dim, seed)]
    scale = head_dim ** -0.5
    causal = spec.causal_capable
    out, _ = reference.attention(q, k, v, None, None, [], params, spec, scale, causal)
    out2, _ = reference.attention(q2, k2, v2, None, None, [], params, spec, scale, causal)
    change = (out[:, :, :later] - out2[:, :, :later]).abs().max().item()
    return LeakageResult(name, not change <= LEAK_TOLERANCE, change)  # a NaN change is a leak


def leakage_report(method_names: list[str] | None = None, seed: int = 0) -> list[LeakageResult]:
    """(name, leaks, max_change) for each method (default: every registered one), in the given order."""
    return [_measure(name, seed) for name in (methods() if method_names is None else method_names)]
