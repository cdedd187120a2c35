"""`linearize`: replace each selected attention site by one call of `lincompile::attention`.

Sites picked by the config get its method; the others (a hybrid) get exact `softmax` with a KV cache.
Causal self-attention sites become stateful: the graph gains inputs `past_key_values.{i}.{part}` and outputs
`present.{i}.{part}` (i = site index, parts from `MethodSpec.state_parts`). `fuel` stops rewriting
after that many sites; the rest keep their original nodes (for bisecting a bad rewrite).

For speculative decoding a stateful graph also outputs, for the last `VERIFY_WINDOW` tokens of a call,
`draft.{i}.keys` / `draft.{i}.values` (the op's k and v, after RoPE) and `hidden_states` (the input of
the final LM-head linear, when there is one). These always hold VERIFY_WINDOW tokens, right-aligned: a call
of T < VERIFY_WINDOW tokens has its tokens in the last T entries. `kernels.linear_attention.reference.commit`
absorbs an accepted prefix of a verified chain from these keys and values, so rejected drafts never need a rerun
of the model.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from lincompile.capture.check import attention_op
from lincompile.diagnostics import warn
from lincompile.methods.params import init_params
from lincompile.methods.spec import MethodSpec, get_method
from lincompile.passes.base import Pass, PassContext, PassResult, register_pass
from lincompile.passes.detect_attention import AttentionSite
from lincompile.passes.patterns.common import SiteMatch

aten = torch.ops.aten


@dataclass(frozen=True)
class RewrittenSite:
    """What linearize did to one site: which method, and the names of its state inputs."""

    index: int
    path: str
    method: str
    state_inputs: tuple[str, ...]
    state_outputs: tuple[str, ...]
    node: fx.Node | None = field(default=None, compare=False, repr=False)  # the lincompile::attention call

    @property
    def spec(self) -> MethodSpec:
        """The op's own spec (a custom spec has no registry name; a softmax site's carries its softcap and sinks)."""
        return MethodSpec.from_json(self.node.args[7])


class UnsupportedSiteError(RuntimeError):
    """A site the chosen method cannot express (named, with what to do)."""


#: Interface names of the state (DESIGN.md section 6); graph placeholders use "_" for ".".
STATE_INPUT = "past_key_values"
STATE_OUTPUT = "present"
DRAFT_OUTPUT = "draft"
HIDDEN_OUTPUT = "hidden_states"
#: A call's last this-many tokens get `draft.*` and `hidden_states` outputs: the most tokens one verify may score.
VERIFY_WINDOW = 64


def state_name(prefix: str, site: int, part: str) -> str:
    return f"{prefix}.{site}.{part}"


def _bias_node(graph: fx.Graph, site: AttentionSite) -> fx.Node:
    """The site's mask terms as one additive bias; a boolean term adds 0 where it keeps a key and float32's
    minimum where it drops one (as Hugging Face's eager masks do; MPT mixes such a term with ALiBi). A sum of
    several terms is clamped there: two minima would make -inf, and a query with every key dropped (a padding row)
    would turn to NaN and reach the real rows through its values."""
    bias = None
    low = torch.finfo(torch.float32).min
    for node, kind, coefficient in site.match.mask_terms:
        if kind == "additive":
            term = node if coefficient == 1.0 else graph.call_function(aten.mul.Tensor, (node, coefficient))
        else:
            kept, dropped = (low, 0.0) if kind == "deny_bool" else (0.0, low)
            if kind == "allow_01":
                node = graph.call_function(aten.ne.Scalar, (node, 0))
            term = graph.call_function(aten.where.Scalar, (node, kept, dropped))
        bias = term if bias is None else graph.call_function(aten.add.Tensor, (bias, term))
    if len(site.match.mask_terms) > 1:
        bias = graph.call_function(aten.clamp_min.default, (bias, low))
    return bias


_LAYOUT_MOVES = {aten.transpose.int, aten.permute.default, aten.reshape.default, aten.unsqueeze.default,
                 aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints, aten.clone.default, aten.alias.default,
                 aten._to_copy.default, aten.to.dtype}  # each keeps (or moves) the layout a view may depend on
_VIEWS = {aten.view.default, aten._unsafe_view.default}


def _views_to_reshapes(node: fx.Node) -> None:
    """Views of the site's output (through transposes and reshapes) become reshapes: the op's output is contiguous,
    while the attention it replaced may have had another layout that a model viewed directly (CPU SDPA's
    [B, T, H, D] storage, which JetMoE views without `.contiguous()`). Same values; a copy only where the view was
    invalid."""
    for user in list(node.users):
        if user.op != "call_function" or user.target not in _LAYOUT_MOVES | _VIEWS:
            continue
        if user.target in _VIEWS:
            user.target = aten.reshape.default
        _views_to_reshapes(user)


#: Submodule of the graph that owns the parameters linearization adds: `lincompile_params.site_{i}.<name>`.
PARAMS_MODULE = "lincompile_params"


def _add_parameters(ctx: PassContext, site: AttentionSite, spec: MethodSpec, seed: int) -> list[fx.Node]:
    """Create the method's parameters for this site (trainable ones as nn.Parameter, fixed ones as
    buffers) in the model's dtype and on its device, and return get_attr nodes in the op's order."""
    if spec.sinks:  # the model's own parameter [heads], shared (exact softmax has no parameters of its own)
        return [ctx.gm.graph.get_attr(site.sinks)]
    values = init_params(spec, site.heads, site.kv_heads, site.head_dim, site.v_head_dim, seed=seed + site.index)
    if not values:
        return []
    gm = ctx.gm
    if not hasattr(gm, PARAMS_MODULE):
        gm.add_submodule(PARAMS_MODULE, torch.nn.Module())
    holder = torch.nn.Module()
    getattr(gm, PARAMS_MODULE).add_module(f"site_{site.index}", holder)
    dtype, device = site.match.q.meta["val"].dtype, site.match.q.meta["val"].device
    nodes = []
    for name, value, trainable in values:
        value = value.to(device=device, dtype=dtype)
        if trainable:
            holder.register_parameter(name, torch.nn.Parameter(value))
            ctx.new_parameters[f"{PARAMS_MODULE}.site_{site.index}.{name}"] = getattr(holder, name)
        else:
            holder.register_buffer(name, value)
        nodes.append(ctx.gm.graph.get_attr(f"{PARAMS_MODULE}.site_{site.index}.{name}"))
    return nodes


def _queries(graph: fx.Graph, match: SiteMatch) -> fx.Node:
    """The op's queries: `match.q`, or for queries the model multiplied by a constant (`match.q_scaled`, whose
    constant `site.scale` holds) the same moves replayed on the queries before it (inserted here)."""
    if not match.q_scaled:
        return match.q
    q, *moves = match.q_scaled
    for move in moves:  # a view as a reshape: the unscaled queries may be strided where the product was dense
        target = aten.reshape.default if move.target in _VIEWS else move.target
        q = graph.call_function(target, (q, *move.args[1:]), dict(move.kwargs))
        q.meta["val"] = move.meta.get("val")
    return q


def _rewrite(ctx: PassContext, site: AttentionSite, spec: MethodSpec, output: fx.Node, seed: int,
             windows: dict[str, fx.Node], allow_state: bool = True) -> RewrittenSite:
    graph = ctx.gm.graph
    match = site.match
    stateful = allow_state and site.decodable(spec)
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
    # exact softmax keeps a custom mask, and without a state (a whole-sequence forward) a sliding window too, as the
    # graph's own mask turned into a bias (with a state the window is kept by limiting the length instead)
    use_bias = spec.kind == "softmax" and (site.mask_kind == "custom" or (site.window is not None and not stateful))
    with graph.inserting_before(match.output):
        bias = _bias_node(graph, site) if use_bias else None
        key_mask = placeholders[site.key_mask_input] if site.key_mask_input and not use_bias else None
        causal = site.causal and not use_bias
        params = _add_parameters(ctx, site, spec, seed)
        call = graph.call_function(attention_op(), (
            _queries(graph, match), match.k, match.v, key_mask, bias, state_in, params, spec.to_json(),
            float(site.scale), causal))
        out = graph.call_function(operator.getitem, (call, 0))
        new_state = graph.call_function(operator.getitem, (call, 1))
        original_dtype = match.output.meta["val"].dtype
        result = out
        if match.q.meta["val"].dtype != original_dtype:
            result = graph.call_function(aten.to.dtype, (out, original_dtype))
    call.meta["nn_module_stack"] = match.output.meta.get("nn_module_stack", {})
    match.output.replace_all_uses_with(result)
    _views_to_reshapes(result)
    out_names: list[str] = []
    draft_names: list[str] = []
    if stateful:
        with graph.inserting_before(call.next):  # k and v are freed here, not kept whole to the graph's end
            drafts = [_last_tokens(graph, match.k, 2, windows), _last_tokens(graph, match.v, 2, windows)]
        with graph.inserting_before(output):
            parts = [graph.call_function(operator.getitem, (new_state, j)) for j in range(len(state_in))]
        parts += drafts
        output.args = (tuple(output.args[0]) + tuple(parts),)
        out_names = [state_name(STATE_OUTPUT, site.index, p) for p in spec.state_parts()]
        draft_names = [state_name(DRAFT_OUTPUT, site.index, p) for p in ("keys", "values")]
    ctx.captured.input_names.extend(in_names)
    ctx.captured.output_names.extend(out_names + draft_names)
    return RewrittenSite(site.index, site.path, spec.name, tuple(in_names), tuple(out_names), call)


def _last_tokens(graph: fx.Graph, node: fx.Node, dim: int, windows: dict[str, fx.Node]) -> fx.Node:
    """The last VERIFY_WINDOW entries of `node` along `dim`, always VERIFY_WINDOW long: entry j is token
    size - VERIFY_WINDOW + j, clamped to token 0 for shorter calls (a fixed shape keeps export guard-free).
    Inserted at the graph's insertion point; the index is `_window_index`'s (shared by sizes that are equal)."""
    return graph.call_function(aten.index_select.default, (node, dim, _window_index(graph, node, dim, windows)))


def _window_index(graph: fx.Graph, node: fx.Node, dim: int, windows: dict[str, fx.Node]) -> fx.Node:
    """The index `_last_tokens` gathers for a size of `node[dim]`, built once per size in `windows` (keyed by the
    size's expression, so sizes known equal share one: every stateful site's tokens and the hidden states') from a
    graph input of that size, right after the inputs; from `node` itself where no input has that size."""
    size = node.meta["val"].shape[dim]
    key = str(size)
    if key in windows:
        return windows[key]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    source = next(((p, i) for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)
                   for i, d in enumerate(p.meta["val"].shape) if str(d) == key), None)
    with graph.inserting_before(placeholders[-1].next) if source is not None else contextlib.nullcontext():
        source = source or (node, dim)
        ones = graph.call_function(aten.new_ones.default, (source[0], [VERIFY_WINDOW]), {"dtype": torch.int64})
        offset = graph.call_function(operator.sub, (graph.call_function(aten.sym_size.int, source),
                                                    VERIFY_WINDOW + 1))
        index = graph.call_function(aten.add.Tensor, (graph.call_function(aten.cumsum.default, (ones, 0)), offset))
        index = graph.call_function(aten.clamp_min.default, (index, 0))
    if source[0] is not node:  # reusable: it comes before every node
        windows[key] = index
    return index


def _add_hidden_output(ctx: PassContext, output: fx.Node, windows: dict[str, fx.Node]) -> bool:
    """Output the LM head's input as `hidden_states` (last VERIFY_WINDOW tokens); False if logits do not come
    from a linear layer (e.g. an encoder without an LM head)."""
    logits = output.args[0][0]
    if not (isinstance(logits, fx.Node) and logits.target == aten.linear.default):
        return False
    with ctx.gm.graph.inserting_before(logits.args[0].next):
        hidden = _last_tokens(ctx.gm.graph, logits.args[0], 1, windows)
    output.args = (tuple(output.args[0]) + (hidden,),)
    ctx.captured.output_names.append(HIDDEN_OUTPUT)
    return True


def warn_rewrite_notes(results: list[PassResult]) -> None:
    """Warn about what the rewrite changed beyond attention's form, one warning per kind naming the sites: terms
    a method has no form for, attention dropout (no method has it), causal sites whose method reads later tokens."""
    notes = [note for result in results for note in result.notes]
    for phrase, what in (
            (" dropped by ", "attention terms have no linear form and are dropped (training can recover part of "
                             "what they did; layers= converts only the sites it lists and keeps the rest exact)"),
            (" attention dropout ", "sites lose their attention dropout: the rewritten op has none (it acts in "
                                    "training only)"),
            (" reads later tokens", "causal sites run a method that reads later tokens: their outputs see the "
                                    "future, and they keep no state (whole sequences only)")):
        chosen = [note for note in notes if phrase in note]
        if chosen:
            warn(f"{len(chosen)} {what}:\n  " + "\n  ".join(chosen[:4])
                 + (f"\n  ... {len(chosen) - 4} more in the returned model's .report" if len(chosen) > 4 else ""))


@register_pass
class Linearize(Pass):
    """Options: method, which sites (`layers`, None = all), `fuel` (max sites to rewrite), `seed` (random
    features of site i are drawn from seed + i), `stateful` (False: no state inputs/outputs; every site
    starts from the initial state, a full-sequence forward, as the torch.compile backend needs)."""

    name = "linearize"
    description = "replace each attention site by one lincompile::attention op (chosen method; softmax for the rest)"
    requires = ("detect_attention",)
    not_after = ("linearize",)

    def __init__(self, method: str | MethodSpec = "softmax", layers: tuple[int, ...] | None = None,
                 fuel: int | None = None, seed: int = 0, stateful: bool = True) -> None:
        self.spec = get_method(method)
        self.stateful = stateful
        self.seed = seed
        self.layers = None if layers is None else tuple(layers)
        self.fuel = fuel

    def run(self, ctx: PassContext) -> list[str]:
        graph = ctx.gm.graph
        output = next(n for n in graph.nodes if n.op == "output")
        softmax = get_method("softmax")
        windows: dict[str, fx.Node] = {}  # `_window_index`'s, shared by the sites
        # an encoder-decoder graph keeps custom-bias sites (T5's decoder) stateless: it is run on whole sequences
        encoder_decoder = any(s.cross for s in ctx.sites)
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
            if spec.kind == "softmax":  # cap and sinks are the site's, as the scale is
                spec = replace(spec, softcap=site.softcap, sinks=site.sinks is not None)
            else:
                if site.softcap:
                    notes.append(f"site {site.index} ({site.path}): its logit softcap ({site.softcap:g}) has no "
                                 f"linear form and is dropped by {spec.name}")
                if site.sinks:
                    notes.append(f"site {site.index} ({site.path}): its attention sinks ({site.sinks}) have no "
                                 f"linear form and are dropped by {spec.name}")
            if spec.kind != "softmax" and site.mask_kind == "custom":
                notes.append(f"site {site.index} ({site.path}): its additive bias (e.g. relative positions) "
                             f"has no linear form and is dropped by {spec.name}")
            if site.window is not None:
                kept = ("kept by the mask, as a bias" if not self.stateful or site.mask_kind == "custom" else
                        "kept by limiting sequences to that many tokens (the exact op has no window)")
                notes.append(f"site {site.index} ({site.path}): its sliding window of {site.window} keys is "
                             + (f"dropped by {spec.name}, which reads the whole past" if spec.kind != "softmax"
                                else kept))
            if site.causal and not spec.causal_capable:
                raise UnsupportedSiteError(
                    f"site {site.index} ({site.path}) is causal, but {spec.name} projects along the sequence and "
                    "cannot be causal; use it on bidirectional (encoder) models, or pick another method")
            if site.causal and not spec.causal_safe:
                notes.append(f"site {site.index} ({site.path}) is causal, but {spec.name} reads later tokens")
            if site.dropout_p:
                notes.append(f"site {site.index} ({site.path}): its attention dropout (p={site.dropout_p:g}) is "
                             f"not applied by {spec.name}")
            allow_state = self.stateful and (site.mask_kind != "custom" or not encoder_decoder)
            ctx.rewritten.append(_rewrite(ctx, site, spec, output, self.seed, windows, allow_state))
        if self.stateful and any(r.state_inputs for r in ctx.rewritten):
            _add_hidden_output(ctx, output, windows)
        notes.insert(0, f"rewrote {len(ctx.rewritten)} of {len(ctx.sites)} sites")
        return notes

    def pictures(self, ctx: PassContext) -> list[tuple[str, list[fx.Node], str]]:
        out = []
        for r in ctx.rewritten:
            inputs = [n for n in r.node.all_input_nodes]
            outputs = [u for u in r.node.users] + [uu for u in r.node.users for uu in u.users]
            out.append((f"site_{r.index}_after", [*inputs, r.node, *outputs], f"site {r.index} {r.path} -> {r.method}"))
        return out
