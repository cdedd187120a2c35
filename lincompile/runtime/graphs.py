"""The target's LM head and last hidden states, as Medusa heads and their training need them.

A stateful linearized graph outputs `hidden_states`: the input of its final LM-head linear for the call's last
VERIFY_WINDOW tokens (right-aligned; see `lincompile.passes.linearize`).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

from lincompile.passes.linearize import HIDDEN_OUTPUT, VERIFY_WINDOW

aten = torch.ops.aten


def lm_head_weight(model: Any) -> Tensor:
    """The [vocab, hidden] weight of a `LinearizedModel`'s final LM-head linear (shared, not copied)."""
    output = next(n for n in model.graph.graph.nodes if n.op == "output")
    logits = output.args[0][0]
    if getattr(model, "quantized", None) and getattr(logits, "target", None) != aten.linear.default:
        raise ValueError(f"this model's LM head is {model.quantized} (LinearizedModel.quantize), and Medusa heads "
                         "read its float weights: quantize with skip=['lm_head'] (the head's name), or keep the "
                         "model float")
    if getattr(logits, "target", None) != aten.linear.default or logits.args[1].op != "get_attr":
        raise ValueError("this model's logits do not come from a linear LM head")
    return operator.attrgetter(logits.args[1].target)(model.graph)


def forward_with_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None,
                        past_state: Any = None, position_ids: Tensor | None = None) -> tuple[Any, Tensor]:
    """(the model's output, last hidden states [B, T, H]) for a call of T <= VERIFY_WINDOW tokens; longer
    calls are split into windows through the recurrent state, so any T works."""
    if HIDDEN_OUTPUT not in model.output_names:
        raise ValueError("this model has no hidden_states output (not a stateful causal LM with a linear head)")
    tokens = input_ids.shape[1]
    hidden, logits = [], []
    out = None
    state = past_state
    for start in range(0, tokens, VERIFY_WINDOW):
        end = min(start + VERIFY_WINDOW, tokens)
        out = model(input_ids[:, start:end], attention_mask=None if attention_mask is None else
                    attention_mask[:, start:end], past_state=state,
                    position_ids=None if position_ids is None else position_ids[:, start:end])
        state = out.past_state
        hidden.append(out.extras[HIDDEN_OUTPUT][:, VERIFY_WINDOW - (end - start):])
        logits.append(out.logits)
    out.logits = torch.cat(logits, 1)
    return out, torch.cat(hidden, 1)
