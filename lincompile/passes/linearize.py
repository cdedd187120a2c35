"""`linearize`: replace each selected attention site by one call of `lincompile::attention`.

Sites picked by the config get its method; the others (a hybrid) get exact `softmax` with a KV cache.
Causal self-attention sites become stateful: the graph gains inputs `past_key_values.{i}.{part}` and outputs
`present.{i}.{part}` (i = site index, parts from `MethodSpec.state_parts`). `fuel` stops rewriting
after that many sites; the rest keep their original nodes (for bisecting a bad rewrite).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from lincompile.capture.check import attention_op
from lincompile.capture.normalize import eliminate_dead_code
from lincompile.methods.spec import MethodSpec, get_method
from lincompile.passes.base import Pass, PassContext, register_pass
from lincompile.passes.detect_attention import AttentionSite

aten = torch.ops.aten


@dataclass(frozen=True)
class RewrittenSite:
    """What linearize did to one site: which method, and the names of its state inputs."""

    index: int
    path: str
    method: str
    state_inputs: tuple[str, ...]
    state_outputs: tuple[str, ...]


class UnsupportedSiteError(RuntimeError):
    """A site the chosen method cannot express (named, with what to do)."""


#: Interface names of the state (DESIGN.md section 6); graph placeholders use "_" for ".".
STATE_INPUT = "past_key_values"
STATE_OUTPUT = "present"


def state_name(prefix: str, site: int, part: str) -> str:
    return f"{prefix}.{site}.{part}"


def _bias_node(graph: fx.Graph, site: AttentionSite) -> fx.Node:
    terms = site.match.mask_terms
    if any(kind != "additive" for _, kind, _ in terms):
        raise UnsupportedSiteError(f"site {site.index} ({site.path}): a custom mask mixing boolean and additive "
                                   "terms is not supported; export with attn_implementation='sdpa'")
    bias = None
    for node, _, coefficient in terms:
        term = node if coefficient == 1.0 else graph.call_function(aten.mul.Tensor, (node, coefficient))
        bias = term if bias is None else graph.call_function(aten.add.Tensor, (bias, term))
    return bias


def _rewrite(ctx: PassContext, site: AttentionSite, spec: MethodSpec, output: fx.Node) -> RewrittenSite:
    graph = ctx.gm.graph
    match = site.match
    stateful = site.stateful
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    state_in: list[fx.Node] = []
    in_names: list[str] = []
    if stateful:
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_input):
            for part in reversed(spec.state_parts()):
                name = state_name(STATE_INPUT, site.index, part)
                state_in.insert(0, graph.placeholder(name.replace(".", "_")))
                in_names.insert(0, name)
    use_bias = spec.kind == "softmax" and site.mask_kind == "custom"
    with graph.inserting_before(match.output):
        bias = _bias_node(graph, site) if use_bias else None
        key_mask = placeholders[site.key_mask_input] if site.key_mask_input and not use_bias else None
        causal = site.causal and not use_bias
        call = graph.call_function(attention_op(), (
            match.q, match.k, match.v, key_mask, bias, state_in, [], spec.to_json(), float(site.scale), causal))
        out = graph.call_function(operator.getitem, (call, 0))
        new_state = graph.call_function(operator.getitem, (call, 1))
        original_dtype = match.output.meta["val"].dtype
        result = out
        if match.q.meta["val"].dtype != original_dtype:
            result = graph.call_function(aten.to.dtype, (out, original_dtype))
    call.meta["nn_module_stack"] = match.output.meta.get("nn_module_stack", {})
    match.output.replace_all_uses_with(result)
    out_names: list[str] = []
    if stateful:
        with graph.inserting_before(output):
            parts = [graph.call_function(operator.getitem, (new_state, j)) for j in range(len(state_in))]
        output.args = (tuple(output.args[0]) + tuple(parts),)
        out_names = [state_name(STATE_OUTPUT, site.index, p) for p in spec.state_parts()]
    ctx.captured.input_names.extend(in_names)
    ctx.captured.output_names.extend(out_names)
    return RewrittenSite(site.index, site.path, spec.name, tuple(in_names), tuple(out_names))


@register_pass
class Linearize(Pass):
    """Options: method, which sites (`layers`, None = all), `fuel` (max sites to rewrite)."""

    name = "linearize"
    description = "replace each attention site by one lincompile::attention op (chosen method; softmax for the rest)"

    def __init__(self, method: str | MethodSpec = "softmax", layers: tuple[int, ...] | None = None,
                 fuel: int | None = None) -> None:
        self.spec = get_method(method)
        self.layers = None if layers is None else tuple(layers)
        self.fuel = fuel

    def run(self, ctx: PassContext) -> list[str]:
        graph = ctx.gm.graph
        output = next(n for n in graph.nodes if n.op == "output")
        softmax = get_method("softmax")
        notes = []
        if self.layers is not None:
            unknown = sorted(set(self.layers) - {s.index for s in ctx.sites})
            if unknown:
                raise ValueError(f"layers {unknown} are not attention sites; the sites are 0..{len(ctx.sites) - 1}")
        for site in ctx.sites:
            if self.fuel is not None and len(ctx.rewritten) >= self.fuel:
                notes.append(f"fuel exhausted: {len(ctx.sites) - len(ctx.rewritten)} sites left as they were")
                break
            chosen = self.layers is None or site.index in self.layers
            spec = self.spec if chosen else softmax
            if spec.kind == "linear" and site.mask_kind == "custom":
                notes.append(f"site {site.index} ({site.path}): its additive bias (e.g. relative positions) "
                             f"has no linear form and is dropped by {spec.name}")
            ctx.rewritten.append(_rewrite(ctx, site, spec, output))
        eliminate_dead_code(ctx.gm)
        notes.insert(0, f"rewrote {len(ctx.rewritten)} of {len(ctx.sites)} sites")
        return notes
