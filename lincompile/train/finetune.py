"""Stage 2, fine-tuning: next-token loss (plus an optional KL term to the original softmax model).

What trains (`stage2_parameters`): with `full`, every parameter; otherwise the method parameters, the LoRA adapters
and, on request, the norms and the embeddings (the paper's recipe: LoRA on q/k/v/o, with embeddings, norms, conv
taps and alpha trained fully). The KL teacher is the graph with exact softmax at every linearized site
(`softmax_graph`); any base parameter that stage 2 trains is cloned into it first, so the teacher stays the
original model.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from lincompile.backends.eager import LinearizedModel
from lincompile.train.attention_transfer import attention_parameters, graph_inputs, softmax_graph
from lincompile.train.lora import lora_parameters

aten = torch.ops.aten

_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+)\.")


def norm_parameters(gm: fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    """Parameters of normalization layers, by Hugging Face naming (`*norm*`, GPT-2 `ln_*`)."""
    return {n: p for n, p in gm.named_parameters() if _NORM.search(n)}


def embedding_parameters(gm: fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    """Parameters read as the table of an `aten.embedding` (token and learned position embeddings)."""
    names = {str(node.args[0].target) for node in gm.graph.nodes
             if node.op == "call_function" and node.target == aten.embedding.default
             and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"}
    params = dict(gm.named_parameters())
    return {n: params[n] for n in sorted(names) if n in params}


def stage2_parameters(linear: LinearizedModel, full: bool, norms: bool = False,
                      embeddings: bool = False) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} that stage 2 trains (tied parameters appear once, under their first name)."""
    gm = linear.graph
    if full:
        return dict(gm.named_parameters())
    chosen = {**attention_parameters(linear), **lora_parameters(gm)}
    if norms:
        chosen.update(norm_parameters(gm))
    if embeddings:
        chosen.update(embedding_parameters(gm))
    ids = {id(p) for p in chosen.values()}
    return {n: p for n, p in gm.named_parameters() if id(p) in ids}


def frozen_teacher(linear: LinearizedModel, trained: set[str]) -> fx.GraphModule:
    """The softmax graph with private copies of the base parameters in `trained` (tied ones stay tied).

    Its other parameters stay shared with `linear` (frozen in stage 2); run it under `torch.no_grad`."""
    teacher = softmax_graph(linear)
    shared = dict(linear.graph.named_parameters(remove_duplicate=False))
    trained_ids = {id(shared[n]) for n in trained if n in shared}
    clones: dict[int, Tensor] = {}
    for name, param in list(teacher.named_parameters(remove_duplicate=False)):
        if id(param) not in trained_ids:
            continue
        prefix, _, field = name.rpartition(".")
        holder = teacher.get_submodule(prefix)
        if holder is linear.graph.get_submodule(prefix):
            raise RuntimeError(f"teacher module {prefix!r} is shared with the student; cannot freeze {name}")
        delattr(holder, field)
        holder.register_buffer(field, clones.setdefault(id(param), param.detach().clone()))
    return teacher


class FinetuneObjective:
    """Stage-2 loss on a batch: mean next-token cross-entropy + kl_weight * mean per-token KL(teacher || model).

    Invariant: the teacher never receives gradient, and with kl_weight = 0 no teacher forward runs.
    """

    def __init__(self, linear: LinearizedModel, kl_weight: float = 0.0,
                 teacher: fx.GraphModule | None = None) -> None:
        if kl_weight > 0 and teacher is None:
            raise ValueError("kl_weight > 0 needs a teacher (frozen_teacher)")
        self.linear, self.kl_weight, self.teacher = linear, kl_weight, teacher

    def __call__(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(scalar loss, detached [cross-entropy, KL])."""
        inputs = graph_inputs(self.linear, input_ids)
        logits = self.linear.graph(*inputs)[0][:, :-1].float()
        flat = logits.reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(flat, input_ids[:, 1:].reshape(-1))
        kl = ce.new_zeros(())
        if self.kl_weight > 0:
            with torch.no_grad():
                target = self.teacher(*inputs)[0][:, :-1].float().reshape(flat.shape)
            kl = F.kl_div(F.log_softmax(flat, -1), F.log_softmax(target, -1), log_target=True,
                          reduction="sum") / flat.shape[0]
        return ce + self.kl_weight * kl, torch.stack([ce.detach(), kl.detach()])
