"""The check every execution form must pass: prefill then single steps equals one full forward."""
from __future__ import annotations

import torch

from lincompile.runtime.state import RecurrentState


@torch.no_grad()
def prefill_then_steps(model: object, ids: torch.Tensor, prefill: int) -> tuple[float, float, RecurrentState]:
    """(max |stepped - full| logit difference, max |full logit|, final state) for `ids` [B, T]:
    the first `prefill` tokens in one call, then one token per call through `past_state`."""
    full = model(ids).logits
    out = model(ids[:, :prefill])
    logits, state = [out.logits], out.past_state
    for i in range(prefill, ids.shape[1]):
        out = model(ids[:, i:i + 1], past_state=state)
        logits.append(out.logits)
        state = out.past_state
    return (torch.cat(logits, 1) - full).abs().max().item(), full.abs().max().item(), state
