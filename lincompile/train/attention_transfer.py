"""Stage 1, attention transfer (LoLCATs-style): teach each site's linear attention to reproduce softmax.

Both graphs here are derived copies of a `LinearizedModel`'s graph that share its parameters:

- `transfer_graph`: at every linearized site the exact softmax output of the SAME q/k/v (the site's scale,
  causal flag and key mask) is computed beside the linear one and fed forward instead of it (teacher forcing),
  so every layer sees the inputs of the original model; the graph returns one MSE per site and stops after the
  last site (the rest of the model is dead code). An additive bias that linearization dropped (relative
  positions) is not in the graph any more, so the teacher lacks it too.
- `softmax_graph`: every linearized site replaced by its softmax teacher; returns the logits of the original
  softmax model (the KL teacher of stage 2).

Sites left as softmax by `optimize(layers=...)` (hybrids) are untouched and produce no loss.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
from torch import Tensor, fx

from lincompile.backends.eager import LinearizedModel
from lincompile.kernels.linear_attention.reference import attention as reference_attention
from lincompile.methods.spec import get_method
from lincompile.passes.detect_attention import AttentionSite
from lincompile.passes.linearize import PARAMS_MODULE
from lincompile.runtime.state import default_positions

_SOFTMAX = get_method("softmax")


def softmax_teacher(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None, scale: float,
                    causal: bool, window: int | None = None, softcap: float = 0.0,
                    sinks: Tensor | None = None) -> Tensor:
    """Exact softmax attention of q/k/v (the reference implementation), as the original model computes it: within
    the site's sliding `window` (each query sees its last `window` keys), with its logit `softcap` and its
    attention `sinks` [H], if any."""
    if window is not None:
        t, s = q.shape[2], k.shape[2]
        outside = ~torch.ones(t, s, dtype=torch.bool, device=q.device).triu(s - t - window + 1)
        band = torch.zeros(t, s, device=q.device).masked_fill(outside, torch.finfo(torch.float32).min)
        bias = band if bias is None else (bias.float() + band).clamp_min(torch.finfo(torch.float32).min)
    spec = replace(_SOFTMAX, softcap=softcap, sinks=sinks is not None)
    out, _ = reference_attention(q, k, v, key_mask, bias, [], [] if sinks is None else [sinks], spec, scale, causal)
    return out


def site_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error in fp32; the teacher carries no gradient."""
    return (student.float() - teacher.detach().float()).pow(2).mean()


def linearized_sites(linear: LinearizedModel) -> list[int]:
    """Indices of the sites with a linear method (the ones attention transfer trains)."""
    return [r.index for r in linear.rewritten if r.spec.kind != "softmax"]


def attention_parameters(linear: LinearizedModel) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the trainable method parameters (`lincompile_params.site_{i}.<name>`)."""
    return {n: p for n, p in linear.graph.named_parameters() if n.startswith(PARAMS_MODULE + ".")}


def _copy(linear: LinearizedModel) -> tuple[fx.Graph, fx.Node, list[tuple[int, fx.Node]]]:
    """A plain-codegen copy of the graph (positional inputs, no output node yet), its logits node, and its
    linearized attention calls by site."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(linear.graph.graph, val_map)
    calls = []
    for index in linearized_sites(linear):
        original = next(r.node for r in linear.rewritten if r.index == index)
        if original is None or original not in val_map:
            raise ValueError(f"site {index}: its attention node is not in the graph")
        calls.append((index, val_map[original]))
    return graph, outputs[0], calls


def _force_teacher(graph: fx.Graph, call: fx.Node, site: AttentionSite) -> tuple[fx.Node, fx.Node]:
    """Insert the softmax teacher (the `site`'s attention as the original computes it: its window, softcap and
    sinks too) after `call` and route the site's output users to it; returns (student output, teacher output)."""
    q, k, v, key_mask, bias, _state, _params, _spec, scale, causal = call.args
    student = next(u for u in call.users if u.target is operator.getitem and u.args[1] == 0)
    with graph.inserting_before(student.next):
        sinks = graph.get_attr(site.sinks) if site.sinks else None
        teacher = graph.call_function(softmax_teacher, (q, k, v, key_mask, bias, scale, causal, site.window,
                                                         site.softcap, sinks))
    student.replace_all_uses_with(teacher)
    return student, teacher


def _site(linear: LinearizedModel, index: int) -> AttentionSite:
    return next(site for site in linear.sites if site.index == index)


def _module(linear: LinearizedModel, graph: fx.Graph) -> fx.GraphModule:
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(linear.graph, graph)


def transfer_graph(linear: LinearizedModel) -> tuple[fx.GraphModule, list[int]]:
    """(graph returning a tuple of per-site MSEs, the site index of each MSE)."""
    graph, _, calls = _copy(linear)
    if not calls:
        raise ValueError("no linearized attention site to transfer (every site is softmax): skip attention "
                         "transfer with --stage1-steps 0 (stage1_steps=0)")
    losses = []
    for index, call in calls:
        student, teacher = _force_teacher(graph, call, _site(linear, index))
        with graph.inserting_after(teacher):
            losses.append(graph.call_function(site_mse, (student, teacher)))
    graph.output(tuple(losses))
    return _module(linear, graph), [index for index, _ in calls]


def softmax_graph(linear: LinearizedModel) -> fx.GraphModule:
    """Graph returning `(logits,)` of the model with every linearized site computed as exact softmax."""
    graph, logits, calls = _copy(linear)
    for index, call in calls:
        _force_teacher(graph, call, _site(linear, index))
    graph.output((logits,))
    return _module(linear, graph)


def graph_inputs(linear: LinearizedModel, input_ids: Tensor) -> list[Tensor]:
    """Positional inputs of `linear.graph` (and its derived copies) for full, unpadded blocks from the first position
    (numbered as the source numbers them)."""
    batch, tokens = input_ids.shape
    values = {"input_ids": input_ids, "position_ids": default_positions(input_ids, 0, linear.position_padding),
              "attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=input_ids.device),
              **linear.initial_state(batch, input_ids.device).tensors}
    missing = [n for n in linear.input_names if n not in values]
    if missing:
        raise ValueError(f"training feeds input_ids only, but this graph also takes {missing}")
    return [values[n] for n in linear.input_names]


class TransferObjective:
    """Stage-1 loss on a batch: the sum over sites of the per-site MSE (each site's mean over its elements).

    Invariant: with the base weights frozen, the loss depends on the method parameters only, and the gradient of
    site i reaches only site i's parameters (teacher forcing cuts every path between sites).
    """

    def __init__(self, linear: LinearizedModel) -> None:
        self.linear = linear
        self.graph, self.sites = transfer_graph(linear)

    def __call__(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(scalar loss, per-site MSE [num sites], detached)."""
        per_site = torch.stack(list(self.graph(*graph_inputs(self.linear, input_ids))))
        return per_site.sum(), per_site.detach()
