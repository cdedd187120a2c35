"""Export each distinct attention site once and splice a copy per site into the ONNX graph (`export_onnx`).

Tracing the plain-PyTorch reference of `lincompile::attention` through torch.export and torch.onnx is nearly
all of an export's time (SmolLM2: 30 copies of one traced reference, ~95% of the nodes). So the graph is cut:

- *outer*: a copy of the graph in which each cut site's call is replaced by new placeholders (its output and
  new state parts) and its computed tensor arguments become extra graph outputs; exported as before;
- *templates*: per distinct site signature (spec, scale, causal, argument shapes and dtypes), the site's
  decomposition alone, exported once with dynamic `batch` and `seq`;
- `splice` puts one renamed copy of its template per site into the outer ONNX graph: template inputs read the
  site's arguments (outer outputs, or graph inputs such as the state), its parameters become initializers,
  its outputs take the placeholders' names; the cut inputs and outputs disappear and the nodes are re-sorted.

Invariant: each site computes the same ONNX ops on the same values as exporting the whole graph at once
would (the same decomposition, traced alone); tests/backends/test_onnx_sites.py compares both exports.
Sites whose sizes relate across the cut (a KV cache that grows, an additive bias) stay in the outer graph.
"""
from __future__ import annotations

import copy
import heapq
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, fx

from lincompile.backends import onnx_chunks, onnx_step
from lincompile.kernels import ops  # noqa: F401  (registers lincompile::attention)
from lincompile.methods.spec import MethodSpec

ATTENTION = torch.ops.lincompile.attention.default


class SpliceError(RuntimeError):
    """A template the splicer cannot copy (a node with a subgraph attribute); the caller exports unsplit."""


@dataclass(frozen=True)
class Template:
    """One exportable site signature: `inputs` are example tensors (q, k, v[, key_mask], *state, *params)."""

    spec: str
    scale: float
    causal: bool
    has_key_mask: bool
    num_state: int
    num_params: int
    inputs: tuple[Tensor, ...]
    chunk: int | None = None  # calls longer than this run in chunks of it (`onnx_chunks`); None: one call

    def module(self, decomposition: Callable[..., Any]) -> torch.nn.Module:
        return _TemplateModule(self, decomposition)

    def dynamic_shapes(self, batch: Any, seq: Any) -> tuple[dict[int, Any] | None, ...]:
        """torch.export dynamic shapes of `inputs`: q, k, v [batch, heads, seq, dim], key_mask [batch, seq],
        state [batch, ...], params static."""
        shapes: list[dict[int, Any] | None] = [{0: batch, 2: seq}] * 3
        if self.has_key_mask:
            shapes.append({0: batch, 1: seq})
        return tuple(shapes + [{0: batch}] * self.num_state + [None] * self.num_params)


class _TemplateModule(torch.nn.Module):
    def __init__(self, template: Template, decomposition: Callable[..., Any]) -> None:
        super().__init__()
        self.template, self.decomposition = template, decomposition

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        t = self.template
        q, k, v = inputs[:3]
        key_mask = inputs[3] if t.has_key_mask else None
        start = 4 if t.has_key_mask else 3
        state = list(inputs[start:start + t.num_state])
        params = list(inputs[start + t.num_state:])
        out, new_state = self.decomposition(q, k, v, key_mask, None, state, params, t.spec, t.scale, t.causal)
        return (out, *new_state)


@dataclass(frozen=True)
class Cut:
    """One site taken out of the outer graph. `args`: the outer value names its template inputs read (extra
    outer outputs, or graph inputs for state), `params`: the graph attributes of its parameters, `results`:
    the outer placeholder names its outputs (out, *new_state) replace ("" where nothing used one)."""

    site: int
    template: int
    args: tuple[str, ...]
    params: tuple[str, ...]
    results: tuple[str, ...]


@dataclass
class Split:
    """The outer graph and what `splice` needs; `extra_inputs`/`extra_outputs` follow the graph's own."""

    graph: fx.GraphModule
    templates: list[Template]
    cuts: list[Cut]
    extra_inputs: list[tuple[str, Tensor, dict[int, str]]]  # name, example, dynamic axes ("batch"/"seq")
    extra_outputs: list[str]


def _cuttable(node: fx.Node) -> bool:
    q, k, v, key_mask, bias, state, params, spec, scale, causal = node.args
    return (bias is None and not MethodSpec.from_json(spec).has_kv_cache
            and all(isinstance(t, fx.Node) and "val" in t.meta for t in (q, k, v))
            and (key_mask is None or (isinstance(key_mask, fx.Node) and "val" in key_mask.meta)))


def _example(like: Tensor, shape: list[int], generator: torch.Generator) -> Tensor:
    if like.is_floating_point():
        return torch.rand(shape, generator=generator).to(like.dtype)
    return torch.ones(shape, dtype=like.dtype)


def split(graph: fx.GraphModule, state_examples: dict[str, Tensor], placeholder_names: dict[str, str],
          batch: int, seq: int, chunk: int | None = None) -> Split:
    """Cut every cuttable attention site out of a copy of `graph` (sharing its weights).

    `state_examples`: example state tensors of batch `batch` by graph placeholder name; `placeholder_names`:
    graph placeholder name -> ONNX input name. Example tensors use `batch` and `seq` for the dynamic axes.
    `chunk`: causal linear sites run calls longer than this in chunks of it (their templates then always take
    a key mask; a site without one reads "" there and is fed all-True); None: every call in one.
    """
    copied = copy.deepcopy(graph.graph)
    gen = torch.Generator().manual_seed(0)
    templates: list[Template] = []
    keys: dict[tuple[Any, ...], int] = {}
    cuts: list[Cut] = []
    extra_inputs: list[tuple[str, Tensor, dict[int, str]]] = []
    extra_outputs: dict[fx.Node, str] = {}
    site = 0
    for node in list(copied.nodes):
        if node.op != "call_function" or node.target is not ATTENTION:
            continue
        index, site = site, site + 1
        if not _cuttable(node):
            continue
        q, k, v, key_mask, _, state, params, spec, scale, causal = node.args
        method = MethodSpec.from_json(spec)  # a centered conv looks ahead: cutting its calls would cut that off
        site_chunk = chunk if causal and method.kind == "linear" and method.causal_safe else None
        tensors = [q, k, v] + ([key_mask] if key_mask is not None else [])
        vals = [t.meta["val"] for t in tensors]
        examples = [_example(vals[0], [batch, vals[0].shape[1], seq, vals[0].shape[3]], gen),
                    *(_example(x, [batch, x.shape[1], seq, x.shape[3]], gen) for x in vals[1:3])]
        if key_mask is not None:
            examples.append(_example(vals[3], [batch, seq], gen))
        elif site_chunk is not None:
            examples.append(torch.ones(batch, seq, dtype=torch.bool))
        has_key_mask = len(examples) == 4
        state_ex = [state_examples[s.name] for s in state]
        param_ex = [operator.attrgetter(p.target)(graph).detach() for p in params]
        key = (spec, scale, causal, has_key_mask, site_chunk,
               tuple((tuple(x.shape[1:]), x.dtype) for x in (*examples, *state_ex)),
               tuple((tuple(p.shape), p.dtype) for p in param_ex))
        if key not in keys:
            keys[key] = len(templates)
            templates.append(Template(spec, scale, causal, has_key_mask, len(state), len(params),
                                      tuple(examples + state_ex + param_ex), site_chunk))
        args = []
        for t in [*tensors, *state]:
            if t.op == "placeholder":
                args.append(placeholder_names[t.name])
            else:
                args.append(extra_outputs.setdefault(t, f"lc_arg_{len(extra_outputs)}"))
        if has_key_mask and key_mask is None:
            args.insert(3, "")
        results = [""] * (1 + len(state))
        out_example = _example(vals[0], [batch, vals[0].shape[1], seq, vals[2].shape[3]], gen)
        for user in list(node.users):
            if user.args[1] == 0:
                results[0] = _replace(copied, user, f"lc_site{index}_out", out_example,
                                      {0: "batch", 2: "seq"}, extra_inputs)
                continue
            for part in list(user.users):
                j = part.args[1]
                results[1 + j] = _replace(copied, part, f"lc_site{index}_state{j}", state_ex[j].clone(),
                                          {0: "batch"}, extra_inputs)
            copied.erase_node(user)
        copied.erase_node(node)
        cuts.append(Cut(index, keys[key], tuple(args), tuple(p.target for p in params), tuple(results)))
    output = next(n for n in copied.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) + tuple(extra_outputs),)  # dicts keep insertion order
    copied._codegen = fx.graph.CodeGen()  # flat positional inputs and a flat tuple of outputs
    module = fx.GraphModule(graph, copied)
    return Split(module, templates, cuts, extra_inputs, list(extra_outputs.values()))


def _replace(graph: fx.Graph, node: fx.Node, name: str, example: Tensor, axes: dict[int, str],
             extra_inputs: list[tuple[str, Tensor, dict[int, str]]]) -> str:
    """Replace `node` (a getitem of the cut call) by a new last placeholder `name`; record its example."""
    with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
        placeholder = graph.placeholder(name)
    placeholder.meta["val"] = example
    node.replace_all_uses_with(placeholder)
    graph.erase_node(node)
    extra_inputs.append((name, example, axes))
    return name


def splice(outer: Any, templates: list[Any], split_: Split, params: dict[str, Tensor], num_inputs: int,
           num_outputs: int, dim_sources: dict[str, tuple[str, int]], steps: list[Any] | None = None) -> None:
    """Copy each cut's template (an onnx.ModelProto per `split_.templates` entry) into `outer` in place.

    `outer`'s first `num_inputs` inputs and `num_outputs` outputs are the interface; the rest are, in order,
    `split_.extra_inputs` and `split_.extra_outputs` (matched by position: torch.onnx renames a value that is
    both an input and an output). Template inputs are (q, k, v[, key_mask], *state, *params), outputs
    (out, *new_state). torch.onnx may read a dynamic size (batch, seq) off any input that has it, a cut
    output included, which upstream nodes must not depend on: such reads are redirected to the interface
    input and axis `dim_sources` names for that dim. `steps`: per template, its decode step's form (a ModelProto,
    `onnx_step`) or None; a site whose template has one runs it for one-token calls.
    """
    from onnx import AttributeProto

    graph = outer.graph
    if (len(graph.input), len(graph.output)) != (num_inputs + len(split_.extra_inputs),
                                                 num_outputs + len(split_.extra_outputs)):
        raise SpliceError("the outer export's inputs/outputs do not match the cut")
    actual = dict(zip((name for name, _, _ in split_.extra_inputs), (i.name for i in graph.input[num_inputs:])))
    actual.update(zip(split_.extra_outputs, (o.name for o in graph.output[num_outputs:])))
    _redirect_size_reads(graph, {actual[name]: axes for name, _, axes in split_.extra_inputs}, dim_sources)
    kept_inputs, kept_outputs = list(graph.input[:num_inputs]), list(graph.output[:num_outputs])
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.output[:]
    graph.output.extend(kept_outputs)
    steps = steps or [None] * len(templates)
    for kind, protos in (("t", templates), ("s", steps)):
        for t_index, template in enumerate(protos):
            if template is None:
                continue
            for node in template.graph.node:
                if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
                    raise SpliceError(f"template {t_index} has a {node.op_type} node with a subgraph")
            for init in template.graph.initializer:
                copy_ = graph.initializer.add()
                copy_.CopyFrom(init)
                copy_.name = f"lc_{kind}{t_index}/{init.name}"
    nodes = list(graph.node)
    condition = ""
    if any(steps[cut.template] is not None for cut in split_.cuts):
        condition_nodes, condition = onnx_step.one_token(dim_sources["seq"][0], "lc_step/")
        nodes.extend(condition_nodes)
    first_args: dict[int, list[str]] = {}  # per template, its first site's arguments
    for cut in split_.cuts:
        template = templates[cut.template].graph
        prefix = f"lc{cut.site}/"
        names = {i.name for i in template.initializer}
        rename = {init: f"lc_t{cut.template}/{init}" for init in names}
        inputs = [i.name for i in template.input]
        for name, param in zip(inputs[len(cut.args):], cut.params):
            init = _initializer(params[param].detach().cpu(), f"{prefix}{param}")
            graph.initializer.append(init)
            rename[name] = init.name
        args = [actual.get(arg, arg) for arg in cut.args]
        results = [actual[result] if result else f"{prefix}{output.name}"
                   for output, result in zip(template.output, cut.results)]
        step = steps[cut.template]
        general = [f"{prefix}general/{output.name}" for output in template.output] if step else results
        chunk = split_.templates[cut.template].chunk
        if chunk is not None and not args[3]:
            mask_nodes, args[3] = onnx_chunks.all_true_mask(args[0], f"{prefix}all_true/")
            nodes.extend(mask_nodes)
        sizes = _same_sizes(template, args, first_args.setdefault(cut.template, args)) if step else None
        if chunk is not None:
            site_nodes = onnx_chunks.chunked_site(template, args, dict(rename), general, prefix, chunk, sizes)
        else:
            names = dict(rename, **dict(zip(inputs, args)))
            names.update(zip((o.name for o in template.output), general))
            site_nodes = onnx_chunks.copy_nodes(template.node, names, prefix)
        if step is None:
            nodes.extend(site_nodes)
            continue
        step_names = {init.name: f"lc_s{cut.template}/{init.name}" for init in step.graph.initializer}
        step_names.update({name: rename[name] for name in inputs[len(cut.args):]})  # the site's parameters
        nodes.extend(onnx_step.step_site(step.graph, site_nodes, general, args, step_names, results, prefix,
                                         condition, sizes))
    del graph.node[:]
    graph.node.extend(_toposort(nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    onnx_chunks.drop_unused_initializers(graph)


def _same_sizes(template: Any, args: list[str], first: list[str]) -> dict[str, str]:
    """`args` of a site mapped to `first`, the same template's first site's: those whose inputs have no symbolic
    dims but the call's (`q`'s batch and sequence), so that the two have the same shape at every call."""
    def symbols(value: Any) -> set[str]:
        return {dim.dim_param for dim in value.type.tensor_type.shape.dim if dim.dim_param}

    call = symbols(template.input[0])
    return {arg: other for arg, other, value in zip(args, first, template.input) if arg and symbols(value) <= call}


def _initializer(tensor: Tensor, name: str) -> Any:
    """An ONNX initializer holding `tensor` (NumPy has no bfloat16: those go in as raw bits)."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.dtype == torch.bfloat16:
        bits = tensor.contiguous().view(torch.int16).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(tensor.shape), bits, raw=True)
    return numpy_helper.from_array(tensor.numpy(), name)


def _redirect_size_reads(graph: Any, cut_axes: dict[str, dict[int, str]],
                         dim_sources: dict[str, tuple[str, int]]) -> None:
    """Point `Shape(x, start=a, end=a+1)` of a cut input x at `dim_sources[dim]` when axis a is that dim."""
    from onnx import helper

    for node in graph.node:
        if node.op_type != "Shape" or node.input[0] not in cut_axes:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start = attrs.get("start")
        dim = cut_axes[node.input[0]].get(start) if start is not None and attrs.get("end") == start + 1 else None
        if dim is None:
            continue  # a read the splicer cannot redirect: a cycle, if it feeds the site, fails the sort
        source, axis = dim_sources[dim]
        node.input[0] = source
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("start", axis), helper.make_attribute("end", axis + 1)])


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Nodes in an order where every input is produced before use (stable for already-ordered nodes)."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    reads = [{name for name in node.input if name} | onnx_chunks.implicit_inputs(node) for node in nodes]
    waiting = [sum(1 for name in names if name in producer) for names in reads]
    consumers: dict[str, list[int]] = {}
    for i, names in enumerate(reads):
        for name in names:
            if name in producer:
                consumers.setdefault(name, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for name in nodes[i].output:
            for j in consumers.get(name, ()):
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise SpliceError("the spliced graph has a cycle")
    missing = {name for names in reads for name in names if name not in producer} - available
    if missing:
        raise SpliceError(f"spliced nodes read values nothing produces: {sorted(missing)[:5]}")
    return order
