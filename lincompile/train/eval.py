"""Perplexity on fixed token blocks: the same tokens for every model and method.

`perplexity` works for anything called as `model(input_ids).logits` (an HF causal LM, a `LinearizedModel`,
an `OrtModel`). It scores every token of each block after the first, averages the negative
log-likelihood over all scored tokens, and returns exp of that mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lincompile.runtime.state import check_positions


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens}


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """exp(mean next-token NLL) over `blocks` [N, T] (every block scored on tokens 1..T-1)."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [num_blocks, block_size >= 2], got {tuple(blocks.shape)}")
    check_positions(model, blocks.shape[1], f"a block of {blocks.shape[1]} tokens (--block-size)")
    was_training = getattr(model, "training", False)  # an OrtModel has no training mode
    if was_training:
        model.eval()
    total, count = 0.0, 0
    try:
        starts = range(0, blocks.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            ids = blocks[start:start + batch_size]
            logits = model(ids).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        if was_training:
            model.train()
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError("non-finite loss while computing perplexity (NaN/Inf logits)")
    return PerplexityResult(math.exp(mean), mean, count)
