"""`export_onnx`: one standard-ONNX graph (opset >= 18, default domain only) for prefill, decode and verify.

Interface (DESIGN.md section 6): inputs `input_ids`, `attention_mask`, `position_ids` [batch, seq] (int64; the
mask covers the new tokens only), per stateful site `past_key_values.{i}.{part}` and, where the LM head can be
forked (`runtime.graphs.logits_fork`), `logits_index` [keep] (int64: the tokens whose logits are computed);
outputs `logits` [batch, keep, vocab] and `present.{i}.{part}`. Dims are named `batch`, `seq`, `keep` and, for
state that grows with context (a softmax site's KV cache), `past_seq`; linear-method state shapes are constants.

Lowering: in a copy of `model.graph` (sharing its weights) every custom op call is bound to its entry in
`DECOMPOSITIONS` (for `lincompile::attention`: the plain-PyTorch `reference.attention`, looked up at call time;
for transformers' grouped matmul of Mixture-of-Experts layers: a traceable form),
so `torch.export` traces the reference into aten ops and any method the reference covers lowers with no
per-method ONNX; `torch.onnx.export(ep, dynamo=True)` translates the aten graph. (Exporting with the op intact
and then `ep.run_decompositions(DECOMPOSITIONS)` gives the same graph but costs one more full retrace.) Limit:
the reference must be traceable, i.e. no Python branch on tensor values.

Speed: tracing the reference is nearly all of the work and every site of a model traces the same code, so
by default (`split_sites=True`) each distinct site signature is exported once and spliced into the graph per
site (`onnx_sites`; SmolLM2 in `lincompile demo`: 84-98 s instead of 333 s; with `decode_step=False` the same
outputs bit for bit, with the decode step form the same up to fp32 rounding at one-token calls).

By default one-token calls of causal linear sites run their recurrent form (`onnx_step`; `decode_step=False` leaves
it out). Options beyond the default graph: `chunk_size` runs long calls of causal linear sites in chunks inside the
graph (`onnx_chunks`), `quantize="int8"` stores the linear layers' weights in 8 bits (`onnx_quantize`).

Invariant: the target directory is either the complete previous content or the complete new export
(model.onnx, lincompile_onnx.json, lincompile_params.safetensors, tokenizer files), never a mix; on failure
nothing is left behind.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, fx

from lincompile.atomic import atomic_directory
from lincompile.backends import onnx_chunks, onnx_sites, onnx_step
from lincompile.backends.eager import LinearizedModel
from lincompile.backends.onnx_einsum import lower_einsums
from lincompile.backends.onnx_quantize import SCHEMES, check_scheme, quantize_weights
from lincompile.backends.onnx_simplify import simplify as simplify_graph
from lincompile.capture.export import export_dynamic
from lincompile.diagnostics import warn
from lincompile.kernels.linear_attention import reference
from lincompile.kernels.linear_attention.reference_recurrent import first_token
from lincompile.methods.spec import MethodSpec
from lincompile.pretrained import trained
from lincompile.runtime.graphs import LOGITS_INDEX

MODEL_FILE = "model.onnx"
META_FILE = "lincompile_onnx.json"
FORMAT = "lincompile-onnx"
FORMAT_VERSION = 2  # 2: `logits_index` (session 35); this runner reads 1 too
MIN_OPSET = 18
#: Weights past this many bytes go to model.onnx.data (protobuf cannot hold 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000
STANDARD_DOMAINS = ("", "ai.onnx")
INTERFACE_INPUTS = ("input_ids", "attention_mask", "position_ids")
#: Example sizes for capture: distinct and >= 2, so export keeps them symbolic and never confuses them.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_KEEP = 2, 5, 3, 4
#: Op namespaces torch.onnx translates itself; an op of any other namespace left after decomposition cannot be.
_TRANSLATED_NAMESPACES = ("aten", "prims")


class OnnxLoweringError(RuntimeError):
    """A node or op could not be lowered to standard ONNX (the message names it)."""


def _attention_decomposition(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
                             state: list[Tensor], params: list[Tensor], spec: str, scale: float,
                             causal: bool) -> tuple[Tensor, list[Tensor]]:
    """`lincompile::attention` as its plain-PyTorch reference (no kernel registry: the graph must stay aten)."""
    out, new_state = reference.attention(q, k, v, key_mask, bias, list(state), list(params),
                                         MethodSpec.from_json(spec), scale, causal)
    return out.contiguous(), [s.contiguous() for s in new_state]


def _step_decomposition(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
                        state: list[Tensor], params: list[Tensor], spec: str, scale: float,
                        causal: bool) -> tuple[Tensor, list[Tensor]]:
    """`lincompile::attention` on the call's first token through the recurrent reference (`first_token`): a decode
    step's form (`onnx_step`; traced for any T, its outputs used only when T == 1). `bias` is None at cut sites."""
    out, new_state = first_token(q, k, v, key_mask, list(state), list(params), MethodSpec.from_json(spec), scale)
    return out.contiguous(), [s.contiguous() for s in new_state]


def _grouped_mm_decomposition(input: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """transformers' `grouped_mm_fallback` (Mixture-of-Experts layers: rows sorted by expert, `offs` the cumulative
    row count per expert) in traceable ops, with no branch on the counts: every expert's product for every row,
    then each row's own (num_experts / top_k times the grouped product's work). Rows past offs[-1] are zero, as in
    the fallback."""
    experts = weight.shape[0]
    rows = torch.arange(input.shape[0], device=input.device)
    expert = (rows[:, None] >= offs[None, :]).sum(1)  # the first expert whose cumulative count passes the row
    every = torch.einsum("si,eio->seo", input, weight)
    index = expert.clamp(max=experts - 1)[:, None, None].expand(-1, 1, weight.shape[2])
    return torch.where((expert < experts)[:, None], every.gather(1, index)[:, 0], 0.0).to(input.dtype)


#: Decomposition into plain PyTorch of every custom op a linearized graph may hold, by qualified name: lincompile's
#: own and the ones Hugging Face models call; a new op needs an entry here (and nothing else).
DECOMPOSITIONS: dict[str, Callable[..., Any]] = {
    "lincompile.attention.default": _attention_decomposition,
    "transformers.grouped_mm_fallback.default": _grouped_mm_decomposition,
}


class _Positional(torch.nn.Module):
    """`model.graph` behind flat positional inputs, returning a tuple (what torch.export wants)."""

    def __init__(self, graph: fx.GraphModule) -> None:
        super().__init__()
        self.net = graph  # not "graph": the unlifted GraphModule has its own .graph

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.net(*inputs))


def check_interface(model: LinearizedModel) -> None:
    """Refuse a graph with inputs beyond the decoder-only interface and its state (an encoder-decoder's)."""
    extra = [n for n in model.input_names
             if n not in INTERFACE_INPUTS and n != LOGITS_INDEX and n not in model.state_inputs]
    if extra:
        raise OnnxLoweringError(f"export_onnx handles decoder-only graphs with inputs {INTERFACE_INPUTS} plus "
                                f"state; this graph also takes {extra}: run it in PyTorch (the LinearizedModel, "
                                "or model.compile())")


def _example_inputs(model: LinearizedModel) -> tuple[tuple[Tensor, ...], tuple[dict[int, Any], ...]]:
    """Example inputs and dynamic shapes: batch/seq on the interface, `past_seq` where the initial state is empty."""
    from torch.export import Dim

    check_interface(model)
    batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past_seq", min=0)
    gen = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.hf_config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=gen)
    interface = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(EXAMPLE_SEQ).expand(EXAMPLE_BATCH, -1).contiguous()}
    state = model.initial_state(EXAMPLE_BATCH, device="cpu").tensors
    args: list[Tensor] = []
    shapes: list[dict[int, Any]] = []
    for name in model.input_names:
        if name == LOGITS_INDEX:  # the last EXAMPLE_KEEP tokens
            args.append(torch.arange(EXAMPLE_SEQ - EXAMPLE_KEEP, EXAMPLE_SEQ, device=model.device))
            shapes.append({0: Dim("keep", min=1)})
            continue
        if name in interface:
            args.append(interface[name].to(model.device))
            shapes.append({0: batch, 1: seq})
            continue
        init = state[name]
        grow = [axis for axis, size in enumerate(init.shape) if size == 0]
        size = [EXAMPLE_PAST if axis in grow else n for axis, n in enumerate(init.shape)]
        value = (torch.rand(size, generator=gen) if init.is_floating_point() else torch.ones(size)).to(init.dtype)
        args.append(value.to(model.device))
        shapes.append({0: batch, **{axis: past for axis in grow}})
    return tuple(args), tuple(shapes)


def _spec_json(node: fx.Node) -> str | None:
    return next((a for a in node.args if isinstance(a, str) and a.startswith("{")), None)


def _describe(node: fx.Node) -> str:
    """'<op> node 'name' (module path, method)' for a lincompile op call, for error messages."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    path = stack[-1][0] if stack else "?"
    spec = _spec_json(node)
    method = json.loads(spec).get("name", "?") if spec else "?"
    return f"{node.target} node {node.name!r} ({path}, method {method!r})"


def _lower_call(op: str, where: str, *args: Any, decompositions: dict[str, Callable[..., Any]] | None = None,
                **kwargs: Any) -> Any:
    """Stands in for one lincompile op call while torch.export traces (through `decompositions`, by default
    `DECOMPOSITIONS`); names the node if tracing fails."""
    decomposition = (decompositions or DECOMPOSITIONS)[op]
    try:
        return decomposition(*args, **kwargs)
    except Exception as error:
        hint = (" (Python control flow on a tensor value: not exportable; use torch.where / masks, or "
                "torch._check for sizes)" if "DataDependent" in type(error).__name__ else "")
        raise OnnxLoweringError(f"could not lower {where} to standard ONNX ops: tracing its plain-PyTorch "
                                f"decomposition failed{hint}: {type(error).__name__}: {_first_lines(error)}"
                                ) from error


def bind_decompositions(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of `graph` (sharing its weights) in which every lincompile op call runs its decomposition.

    Raises `OnnxLoweringError` naming a custom-op node that has no entry in `DECOMPOSITIONS`.
    """
    copied = copy.deepcopy(graph.graph)
    for node in copied.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if str(target) in DECOMPOSITIONS:
            node.args = (str(target), _describe(node), *node.args)
            node.target = _lower_call
        elif target.namespace not in _TRANSLATED_NAMESPACES:
            raise OnnxLoweringError(f"{_describe(node)} has no decomposition to standard ops; add one to "
                                    "lincompile.backends.onnx.DECOMPOSITIONS")
    return fx.GraphModule(graph, copied)


def capture_and_lower(model: LinearizedModel,
                      example: tuple[tuple[Tensor, ...], tuple[dict[int, Any], ...]] | None = None,
                      graph: fx.GraphModule | None = None) -> torch.export.ExportedProgram:
    """torch.export `graph` (default `model.graph`) with dynamic dims, every lincompile op traced as its
    reference: aten only."""
    args, shapes = example if example is not None else _example_inputs(model)
    return _trace(_Positional(bind_decompositions(model.graph if graph is None else graph)), args, shapes)


def _trace(module: torch.nn.Module, args: tuple[Tensor, ...], shapes: tuple[Any, ...]
           ) -> torch.export.ExportedProgram:
    """torch.export `module`; the `OnnxLoweringError` of a failed decomposition, or one naming the failure."""
    try:
        with torch.no_grad():
            ep = export_dynamic(module, args, None, (shapes,))
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, OnnxLoweringError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from error
        raise OnnxLoweringError(f"torch.export of the linearized graph failed: {type(error).__name__}: "
                                f"{_first_lines(error)}") from error
    for node in ep.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace not in _TRANSLATED_NAMESPACES:
            raise OnnxLoweringError(f"exported node {node.name} still calls {target}, which torch.onnx cannot "
                                    "translate to standard ops")
    return ep


def _first_lines(error: BaseException, n: int = 6) -> str:
    return "\n".join(str(error).strip().splitlines()[:n])


def _rename_dims(ir_model: Any, dims: dict[str, str]) -> None:
    """Rename exporter symbols (s12, s34 + s56) to interface names everywhere in the graph, in place."""
    import onnx_ir as ir

    if not dims:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(dims, key=len, reverse=True))) + r")\b")
    graphs = [ir_model.graph, *(g for node in ir.traversal.RecursiveGraphIterator(ir_model.graph)
                                for attr in node.attributes.values() if attr.type == ir.AttributeType.GRAPH
                                for g in [attr.value])]
    values = [v for g in graphs for v in (*g.inputs, *g.outputs)]
    values += [v for node in ir.traversal.RecursiveGraphIterator(ir_model.graph) for v in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        new = [d if not isinstance(d, ir.SymbolicDim) or d.value is None
               else ir.SymbolicDim(pattern.sub(lambda m: dims[m.group(1)], d.value)) for d in value.shape.dims]
        value.shape = ir.Shape(new)


def _interface_dims(ir_model: Any, shapes: tuple[dict[int, Any], ...]) -> dict[str, str]:
    """Exporter symbol -> Dim name, read off the ONNX graph inputs at the axes we declared dynamic (the names
    torch.export gave, or, after `export_dynamic`'s retry, its own symbols)."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for value, declared in zip(ir_model.graph.inputs, shapes):
        for axis, dim in declared.items():
            actual = value.shape.dims[axis] if value.shape is not None else None
            if isinstance(actual, ir.SymbolicDim) and actual.value and actual.value not in mapping:
                mapping[actual.value] = dim.__name__
    return mapping


def _check_standard(ir_model: Any, opset: int) -> None:
    import onnx_ir as ir

    version = ir_model.opset_imports.get("", 0)
    if version < MIN_OPSET:
        raise OnnxLoweringError(f"exported default-domain opset {version} < {MIN_OPSET} (asked for {opset})")
    for node in ir.traversal.RecursiveGraphIterator(ir_model.graph):
        if node.domain not in STANDARD_DOMAINS:
            raise OnnxLoweringError(f"ONNX node {node.name} is {node.domain}::{node.op_type}, not a standard op")
    custom = [d for d in ir_model.opset_imports if d not in STANDARD_DOMAINS]
    if custom or ir_model.functions:
        raise OnnxLoweringError(f"the exported graph imports custom domains {custom} / has local functions "
                                f"{list(ir_model.functions)}")


def _io_spec(ir_model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def describe(value: Any) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else str(d.value) for d in value.shape.dims]
        return {"name": value.name, "dtype": str(value.dtype.numpy()), "shape": dims}

    return [describe(v) for v in ir_model.graph.inputs], [describe(v) for v in ir_model.graph.outputs]


def _metadata(model: LinearizedModel, ir_model: Any, tokenizer: object | None, opset: int) -> dict[str, Any]:
    """Everything a runner needs besides model.onnx: interface, state layout, methods, tokenizer, ids."""
    inputs, outputs = _io_spec(ir_model)
    by_name = {v["name"]: v for v in inputs}
    specs = {}
    for node in model.graph.graph.nodes:
        if node.op == "call_function" and str(node.target) in DECOMPOSITIONS and _spec_json(node):
            spec = MethodSpec.from_json(_spec_json(node))
            specs[spec.name] = spec.to_dict()
    site_info = {s.index: s for s in model.sites}
    sites = []
    for r in model.rewritten:
        site = site_info.get(r.index)
        layer = re.search(r"\.(\d+)\.", f".{r.path}.")
        sites.append({"index": r.index, "path": r.path, "layer": int(layer.group(1)) if layer else None,
                      "method": r.method, "heads": getattr(site, "heads", None),
                      "kv_heads": getattr(site, "kv_heads", None), "head_dim": getattr(site, "head_dim", None),
                      "scale": float(r.node.args[8]), "window": getattr(site, "window", None),
                      "softcap": r.spec.softcap, "sinks": site.sinks if r.spec.sinks else None,
                      "params": [n.target for n in r.node.args[6]],
                      "state_inputs": list(r.state_inputs), "state_outputs": list(r.state_outputs)})
    hf = model.hf_config
    dtype = next(model.parameters()).dtype
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "model_file": MODEL_FILE, "opset": opset,
        "dtype": str(dtype).replace("torch.", ""),
        "input_names": [v["name"] for v in inputs], "output_names": [v["name"] for v in outputs],
        "inputs": inputs, "outputs": outputs,
        "state": {name: {"shape": by_name[name]["shape"], "dtype": by_name[name]["dtype"]}
                  for name in model.state_inputs},
        "dims": {"batch": "rows", "seq": "new tokens this call",
                 "past_seq": "tokens already absorbed by a growing (softmax KV-cache) state; 0 initially"},
        "conventions": {"attention_mask": "[batch, seq] int64, 1 = real token, covers the new tokens only",
                        "position_ids": "past length + arange(seq) unless given; for a position_padding model, "
                                        "past length + position_padding + the count of ids != position_padding "
                                        "(those ids: position_padding); for a positions_from_mask model, the "
                                        "count of real tokens of attention_mask before each, + past length",
                        "state": "present.{i}.{part} of one call feeds past_key_values.{i}.{part} of the next",
                        LOGITS_INDEX: "[keep] int64, where the model takes it: the tokens of this call whose "
                                      "logits are computed (arange(seq): all; [seq - 1]: the last only)"},
        "supports_state": model.supports_state, "max_positions": model.max_positions,
        "position_padding": model.position_padding, "positions_from_mask": model.positions_from_mask,
        "limit_reason": model.limit_reason,
        "methods": specs, "sites": sites, "linearize": model.config.to_dict(),
        "trained": trained(model),  # whether trained tensors were loaded; null: not known
        "vocab_size": getattr(hf, "vocab_size", None), "eos_token_id": getattr(hf, "eos_token_id", None),
        "pad_token_id": getattr(hf, "pad_token_id", None), "model_type": getattr(hf, "model_type", None),
        "tokenizer": None if tokenizer is None else {"class": type(tokenizer).__name__, "dir": "."},
    }


def _write_site_params(model: LinearizedModel, directory: Path) -> None:
    """Every site's method parameters, which committing a speculative step needs (`runtime.verify`)."""
    from safetensors.torch import save_file

    from lincompile.runtime.verify import PARAMS_FILE

    tensors = {n.target: operator.attrgetter(n.target)(model.graph).detach().contiguous()
               for r in model.rewritten for n in r.node.args[6]}
    save_file(tensors, directory / PARAMS_FILE)


def _to_onnx(program: torch.export.ExportedProgram, input_names: list[str], output_names: list[str],
             opset: int | None, optimize: bool) -> Any:
    """torch.onnx.export of an aten-only program, without its notes about torchvision ops it cannot register
    (4 warning lines per call) or torch's own deprecation warnings."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=output_names,
                                     opset_version=opset, optimize=optimize, verbose=False)
    except Exception as error:
        raise OnnxLoweringError(f"torch.onnx could not translate the lowered graph: {type(error).__name__}: "
                                f"{_first_lines(error, 12)}") from error
    finally:
        registration.setLevel(level)


def export_template(template: onnx_sites.Template, where: str, batch: Any, seq: Any, opset: int | None,
                    optimize: bool = False, step: bool = False) -> Any:
    """One attention site signature alone as a standard-ONNX proto: inputs in0.. (q, k, v[, key_mask], *state,
    *params), outputs out0.. (out, *new_state); `batch` and `seq` are its dynamic dims, `where` names the site
    in errors. `step`: the decode step's form (`_step_decomposition`) instead of the parallel one."""
    op = str(onnx_sites.ATTENTION)
    decomposition = functools.partial(_lower_call, op, where,
                                      decompositions={op: _step_decomposition} if step else None)
    traced = _trace(template.module(decomposition), template.inputs, template.dynamic_shapes(batch, seq))
    inputs = [f"in{i}" for i in range(len(template.inputs))]
    outputs = [f"out{i}" for i in range(1 + template.num_state)]
    exported = _to_onnx(traced, inputs, outputs, opset, optimize)
    _check_standard(exported.model, opset)
    return exported.model_proto


def _step_template(template: onnx_sites.Template, where: str, batch: Any, seq: Any, opset: int,
                   optimize: bool) -> Any:
    """`template`'s decode step form, or None (with a warning) when it does not export or splice: its sites then
    run one-token calls through the general form, as with decode_step=False."""
    try:
        proto = export_template(template, where, batch, seq, opset, optimize, step=True)
    except OnnxLoweringError as error:
        warn(f"export_onnx: no decode step form for {where} ({_first_lines(error, 1)}); its one-token calls "
             "run the general form")
        return None
    if any(True for node in proto.graph.node for _ in onnx_chunks.subgraphs(node)):
        warn(f"export_onnx: the decode step form of {where} holds a subgraph, which the splicer cannot "
             "copy; its one-token calls run the general form")
        return None
    return proto


def _export_split(model: LinearizedModel, opset: int | None, optimize: bool, chunk_size: int | None,
                  decode_step: bool) -> tuple[Any, int, dict[str, int]]:
    """The ONNX proto of `model.graph` with each distinct attention site exported once and spliced per site
    (`onnx_sites`; causal linear sites in chunks past `chunk_size` tokens and, with `decode_step`, through their
    step form at one-token calls), its opset and the numbers of sites spliced, chunked and with a step form."""
    args, shapes = _example_inputs(model)
    placeholders = [n.name for n in model.graph.graph.nodes if n.op == "placeholder"]
    onnx_names = dict(zip(placeholders, model.input_names, strict=True))
    state = {ph: arg for ph, arg in zip(placeholders, args) if onnx_names[ph] in model.state_inputs}
    parts = onnx_sites.split(model.graph, state, onnx_names, EXAMPLE_BATCH, EXAMPLE_SEQ, chunk_size)
    dims = shapes[model.input_names.index("input_ids")]
    named = {"batch": dims[0], "seq": dims[1]}
    extra_args = tuple(example for _, example, _ in parts.extra_inputs)
    extra_shapes = tuple({axis: named[dim] for axis, dim in axes.items()} for _, _, axes in parts.extra_inputs)
    lowered = capture_and_lower(model, (args + extra_args, shapes + extra_shapes), graph=parts.graph)
    program = _to_onnx(lowered, list(model.input_names) + [name for name, _, _ in parts.extra_inputs],
                       list(model.output_names) + parts.extra_outputs, opset, optimize)
    outer = program.model
    version = outer.opset_imports.get("", 0)
    _check_standard(outer, version)
    _rename_dims(outer, _interface_dims(outer, shapes + extra_shapes))
    proto = program.model_proto
    sites = [n for n in model.graph.graph.nodes if n.op == "call_function" and n.target is onnx_sites.ATTENTION]
    templates, steps = [], []
    for index, template in enumerate(parts.templates):
        where = _describe(sites[next(cut.site for cut in parts.cuts if cut.template == index)])
        templates.append(export_template(template, where, named["batch"], named["seq"], version, optimize))
        takes_step = decode_step and onnx_step.takes_step(template.spec, template.causal)
        steps.append(_step_template(template, where, named["batch"], named["seq"], version, optimize)
                     if takes_step else None)
    params = {p: operator.attrgetter(p)(model.graph) for cut in parts.cuts for p in cut.params}
    onnx_sites.splice(proto, templates, parts, params, len(model.input_names), len(model.output_names),
                      {"batch": ("input_ids", 0), "seq": ("input_ids", 1)}, steps)
    counts = {"spliced": len(parts.cuts),
              "chunked": sum(parts.templates[cut.template].chunk is not None for cut in parts.cuts),
              "step": sum(steps[cut.template] is not None for cut in parts.cuts)}
    return proto, version, counts


def _write(model: LinearizedModel, directory: Path, opset: int | None, tokenizer: object | None,
           optimize: bool, split_sites: bool, chunk_size: int | None, quantize: str | None,
           decode_step: bool, simplify: bool) -> None:
    """Export into `directory` (a fresh temp dir): model.onnx, the JSON, the tokenizer; then check. The graph
    exported is `model.logits_fork()` where the model has one: it takes `logits_index` (the tokens to score)."""
    import onnx
    import onnx_ir as ir

    fork = model.logits_fork()
    if fork is not None:
        model = model.with_graph(fork, [*model.input_names, LOGITS_INDEX])
    proto, fell_back = None, False
    counts = {"spliced": 0, "chunked": 0, "step": 0}
    if split_sites:
        try:
            proto, version, counts = _export_split(model, opset, optimize, chunk_size, decode_step)
        except (onnx_sites.SpliceError, OnnxLoweringError) as error:  # the whole graph computes the same ops
            lost = ", and one-token calls skip the decode step's own form" if decode_step else ""
            warn(f"export_onnx: exporting each attention site once failed ({_first_lines(error, 2)}); "
                 f"tracing the whole graph instead (same ops, slower; calls run in one piece{lost})")
            proto, fell_back = None, True
    if proto is None:
        example = _example_inputs(model)
        program = _to_onnx(capture_and_lower(model, example), list(model.input_names), list(model.output_names),
                           opset, optimize)
        version = program.model.opset_imports.get("", 0)
        _check_standard(program.model, version)
        _rename_dims(program.model, _interface_dims(program.model, example[1]))
        proto = program.model_proto
    if opset is not None and version != opset:
        raise OnnxLoweringError(f"asked for opset {opset}, torch.onnx wrote opset {version}; leave the opset out "
                                "(opset=None, no --opset) for its default")
    path = directory / MODEL_FILE
    lowered, left = lower_einsums(proto)
    simplified = simplify_graph(proto) if simplify else None
    quantized = 0
    if quantize is not None:
        proto, quantized = quantize_weights(proto, quantize)
    large = sum(init.ByteSize() for init in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(proto, str(path), save_as_external_data=large, location=f"{MODEL_FILE}.data")
    onnx.checker.check_model(str(path))  # path form: works with external data too
    meta = _metadata(model, ir.serde.deserialize_model(proto), tokenizer, version)
    meta["einsum"] = {"lowered_to_matmul": lowered, "left": left}
    meta["simplified"] = simplified
    meta["sites_spliced"] = counts["spliced"]
    chunked = counts["chunked"]
    if chunk_size is not None and not chunked:
        why = ("split_sites=False traces the whole graph, which takes each call in one piece" if not split_sites
               else "the export traced the whole graph (see the warning above)" if fell_back
               else "the model has no causal linear attention site that decodes causally (softmax sites keep a KV "
               "cache; a centered conv looks ahead, so its calls cannot be cut)")
        warn(f"export_onnx: chunk_size={chunk_size} chunks nothing: {why}")
    meta["chunked_sites"] = chunked
    meta["chunk_size"] = chunk_size if chunked else None
    meta["decode_step_sites"] = counts["step"]
    meta["quantize"] = None if quantize is None else {"scheme": quantize, **SCHEMES[quantize],
                                                      "linear_layers": quantized}
    _write_site_params(model, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def check_export_options(opset: int | None, chunk_size: int | None, quantize: str | None) -> None:
    """Refuse options `export_onnx` cannot honour, naming the fix (callers check before any long work)."""
    import onnx

    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise TypeError(f"opset must be an integer or None, got {type(opset).__name__}; a tokenizer goes in as "
                        "tokenizer=")
    if opset is not None and not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} is outside {MIN_OPSET}..{onnx.defs.onnx_opset_version()}: the lowering "
                         f"needs opset >= {MIN_OPSET}, and this onnx {onnx.__version__} knows none later")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 (or None for calls in one piece), got {chunk_size!r}")
    if quantize is not None:
        check_scheme(quantize)


def export_onnx(model: LinearizedModel, out_dir: str | os.PathLike[str], opset: int | None = None,
                tokenizer: object | None = None, *, optimize: bool = False, split_sites: bool = True,
                chunk_size: int | None = None, quantize: str | None = None, decode_step: bool = True,
                simplify: bool = True) -> Path:
    """Export `model` to `out_dir`/model.onnx + lincompile_onnx.json (+ tokenizer files); returns `out_dir`.

    `opset`: default-domain opset (>= 18; None = torch.onnx's default). `optimize`: also run the onnxscript
    graph optimizer (about 3x fewer nodes, but +60 s on SmolLM2 and no speedup under onnxruntime, which
    optimizes at session load anyway). `split_sites`: export each distinct attention site once and splice
    it per site (the default; same graph outputs, a fraction of the time); False traces the whole graph.
    `chunk_size`: with `split_sites`, causal linear sites run calls longer than this in chunks of it inside the
    graph (`onnx_chunks`; 64 is what the torch path takes): time and memory linear in a call's length, for
    callers who send long prompts in one call, at the price of a slightly slower decode step (an `If` per site:
    2% on SmolLM2 beside the decode step form, 7% without it; `bench/onnx_decode_step.py`, `onnx_prefill.py`).
    None (the default): every call in one piece, quadratic in its length; `OrtModel`'s prefill then feeds
    prompts in calls of 128 tokens.
    `quantize`: "int8" stores every linear layer's weights in 8 bits (onnxruntime's MatMulNBits, blocks of 32,
    int8 compute; `onnx_quantize`): about half the file and a faster CPU decode, for onnxruntime only; None
    (the default): float weights, standard ONNX.
    `decode_step`: with `split_sites`, causal linear sites run one-token calls through their recurrent form
    (`onnx_step`; the default; on SmolLM2 a decode step then runs a quarter of the nodes): a faster decode step, a
    little more work per call of more tokens (see `bench/onnx_decode_step.py`); False: every call through the
    parallel form.
    `simplify`: share repeated constants and nodes and drop no-op slices and reshape/unsqueeze chains
    (`onnx_simplify`: exact, the same outputs bit for bit; onnxruntime does not do it inside the sites' `If`
    branches), counted in the JSON's `simplified`; False: the graph as torch.onnx wrote it.

    Atomic: built in a temp dir beside `out_dir`, checked with `onnx.checker`, then renamed over it.
    Raises `OnnxLoweringError` naming the node/op that could not be lowered; then nothing is written.
    """
    if not isinstance(model, LinearizedModel):
        raise TypeError(f"export_onnx takes a linearized model, got {type(model).__name__}: run "
                        "lincompile.optimize(model, method) first (method='softmax' keeps exact attention)")
    check_export_options(opset, chunk_size, quantize)
    model.require_float("export_onnx", "export the float model; export_onnx(..., quantize='int8') stores 8-bit "
                        "weights for onnxruntime")
    check_interface(model)
    if model.captured_dtype == torch.bfloat16:
        warn("export_onnx: this model runs in bfloat16, which onnxruntime's CPU provider has no kernels for: the "
             "export needs a provider that has them (such as CUDA); for a CPU export, optimize the float32 (or "
             "float16) model")
    target = Path(out_dir)
    with atomic_directory(target, META_FILE) as tmp:
        _write(model, tmp, opset, tokenizer, optimize, split_sites, chunk_size, quantize, decode_step, simplify)
    return target
