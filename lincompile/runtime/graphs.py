"""The LM head of a linearized graph: its weight and last hidden states (as Medusa heads and their training need
them), and a fork that computes the logits of chosen tokens only (as prefill needs the last token's).

A stateful linearized graph outputs `hidden_states`: the input of its final LM-head linear for the call's last
VERIFY_WINDOW tokens (right-aligned; see `lincompile.passes.linearize`).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

from torch import fx

from lincompile.kernels.int8.linear import int8_linear
from lincompile.passes.linearize import HIDDEN_OUTPUT, VERIFY_WINDOW

aten = torch.ops.aten

#: The input a `logits_fork` takes besides its graph's: the positions [k] (int64) of the call's tokens to score.
LOGITS_INDEX = "logits_index"
_HEADS = (aten.linear.default, int8_linear)  # per-token products: row t of the output reads row t of the input
_CASTS = (aten._to_copy.default, aten.to.dtype)


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


def _head(logits: object) -> fx.Node | None:
    """The LM-head product (float or 8-bit linear) `logits` come from through pointwise ops of logits alone (a
    softcap's div, tanh, mul; a cast); None if anything else makes them (a sum, a reshape, two tensors)."""
    node = logits
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target not in _HEADS:
        pointwise = node.target in _CASTS or (isinstance(node.target, torch._ops.OpOverload)
                                              and torch.Tag.pointwise in node.target.tags)
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if not pointwise or len(tensors) != 1:
            return None
        node = tensors[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and isinstance(node.args[0], fx.Node)):
        return None
    rows = node.meta.get("val")  # the head's own: a calibrated 8-bit head's input is a new, unannotated product
    return node if isinstance(rows, torch.Tensor) and rows.dim() == 3 else None


def logits_fork(graph: fx.GraphModule) -> fx.GraphModule | None:
    """A fork of `graph` sharing its weights, taking `LOGITS_INDEX` [k] after its inputs: its first output
    (the logits) holds only those tokens' rows [B, k, V], each equal to the row `graph` computes up to the
    product's rounding (the head's input is gathered before the head, so the head computes k rows, not T). Its
    other outputs are `graph`'s. None where the logits do not come from a linear head through pointwise ops."""
    output = next(n for n in graph.graph.nodes if n.op == "output")
    if _head(output.args[0][0]) is None:
        return None
    fork = fx.Graph()
    fork._codegen = graph.graph._codegen
    mapping: dict[fx.Node, fx.Node] = {}
    fork.output(fork.graph_copy(graph.graph, mapping))
    with fork.inserting_after([n for n in fork.nodes if n.op == "placeholder"][-1]):
        index = fork.placeholder(LOGITS_INDEX)
    head = mapping[_head(output.args[0][0])]
    with fork.inserting_before(head):
        rows = fork.call_function(aten.index_select.default, (head.args[0], 1, index))
    head.args = (rows, *head.args[1:])
    return fx.GraphModule(graph, fork)
