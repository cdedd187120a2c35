"""Capture a Hugging Face model as a flat FX graph with `torch.export` (non-strict).

The captured `GraphModule` has plain positional placeholders (one per tensor input, named after the
forward keyword) and returns a tuple of tensors named by `CapturedGraph.output_names`; parameters and
buffers are attributes. Batch and sequence dims are dynamic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.export import Dim

from lincompile.runtime.state import position_tables

#: Inputs whose dims 0 and 1 are (batch, tokens) in HF models.
_SEQUENCE_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask", "decoder_position_ids")


@dataclass
class CapturedGraph:
    """A flat graph of a model plus what is needed to call it and to test it."""

    gm: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    example_inputs: dict[str, torch.Tensor]
    seconds: float = 0.0
    constants: dict[str, object] = field(default_factory=dict)
    max_tokens: int | None = None  # the longest sequence the graph takes (a position table's length)
    #: the model's parameter dtypes when it was traced (its graph keeps casts for them), in `parameters()` order
    dtypes: tuple[torch.dtype, ...] | None = None

    def fork(self) -> "CapturedGraph":
        """A copy whose graph passes may rewrite freely; parameters and buffers stay shared."""
        graph = fx.Graph()
        graph._codegen = self.gm.graph._codegen
        out = graph.graph_copy(self.gm.graph, {})
        graph.output(out)
        return CapturedGraph(fx.GraphModule(self.gm, graph), list(self.input_names), list(self.output_names),
                             dict(self.example_inputs), self.seconds, dict(self.constants), self.max_tokens,
                             self.dtypes)

    def __call__(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"missing graph inputs {missing}; the graph takes {self.input_names}")
        return self.gm(*[inputs[n] for n in self.input_names])


def _dynamic_shapes(example: dict[str, object], max_seq: int | None = None) -> dict[str, object]:
    """Batch and sequence dims; `max_seq` caps the sequence (a position table's length: a model may compute with
    it, as GPT-Neo's masks and XGLM's table regrowth do, and export refuses a range the model cannot take)."""
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=max(max_seq or 1 << 17, 2))
    dec_seq = Dim("decoder_seq", min=1, max=1 << 17)
    shapes: dict[str, object] = {}
    for name, value in example.items():
        if not isinstance(value, torch.Tensor):
            shapes[name] = None
        elif name in _SEQUENCE_INPUTS and value.dim() >= 2:
            shapes[name] = {0: batch, 1: seq}
        elif name in _DECODER_INPUTS and value.dim() >= 2:
            shapes[name] = {0: batch, 1: dec_seq}
        else:
            shapes[name] = {0: batch} if value.dim() >= 1 else None
    return shapes


def _flatten_interface(gm: fx.GraphModule, output_names: list[str]) -> tuple[fx.GraphModule, list[str]]:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            graph.erase_node(node)  # export's input guards; LinearizedModel validates its own inputs
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    input_names = []
    for node in placeholders:
        if node.users:
            input_names.append(node.target)
        else:
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    flat, _ = torch.utils._pytree.tree_flatten(output.args[0])
    output.args = (tuple(flat),)
    graph._codegen = fx.graph.CodeGen()
    graph.lint()
    return fx.GraphModule(gm, graph), input_names


def _is_tensor_spec(spec: object) -> bool:
    return spec is None or (isinstance(spec, dict) and all(isinstance(axis, int) for axis in spec))


def _keeps_declared_dims(ep: torch.export.ExportedProgram, dynamic_shapes: object) -> bool:
    """Whether every axis `dynamic_shapes` declared is, in `ep`, a symbol of its own Dim's (not specialised, not
    merged with another Dim's, its range not narrowed below the Dim's)."""
    user = [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    if isinstance(dynamic_shapes, dict):
        pairs = [(values.get(name), spec) for name, spec in dynamic_shapes.items()]
    else:
        specs = torch.utils._pytree.tree_flatten(dynamic_shapes, is_leaf=_is_tensor_spec)[0]
        if len(specs) != len(user):
            return False
        pairs = [(values[name], spec) for name, spec in zip(user, specs)]
    owner: dict[object, str] = {}
    for val, spec in pairs:
        for axis, dim in (spec or {}).items():
            size = val.shape[axis] if isinstance(val, torch.Tensor) else None
            symbol = size.node.expr if isinstance(size, torch.SymInt) else None
            if symbol is None or not symbol.is_Symbol or owner.setdefault(symbol, dim.__name__) != dim.__name__:
                return False
            bounds = ep.range_constraints.get(symbol)
            if bounds is None or bounds.lower > max(dim.min, 2) or bounds.upper < dim.max:
                return False
    return True


def export_dynamic(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object] | None,
                   dynamic_shapes: object) -> torch.export.ExportedProgram:
    """Non-strict `torch.export` with the named `Dim`s of `dynamic_shapes`. Some torch releases (2.11, on a GQA
    model's `repeat_kv`) cannot prove a guard that holds for every size, e.g. Min(64*seq, 192*seq) == 64*seq, and
    refuse the named dims: then export again with `Dim.DYNAMIC` in their place, and keep that program only if
    every declared axis kept its own Dim's symbol and range (else the first error stands)."""
    try:
        return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except torch._dynamo.exc.UserError as exc:
        if exc.error_type != torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION:
            raise
        hints = torch.utils._pytree.tree_map(lambda d: Dim.DYNAMIC if isinstance(d, Dim) else d, dynamic_shapes)
        try:
            ep = torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=hints)
        except Exception:
            raise exc from None
        if not _keeps_declared_dims(ep, dynamic_shapes):
            raise exc
        return ep


def capture(model: torch.nn.Module, example_inputs: dict[str, object], *, dynamic: bool = True) -> CapturedGraph:
    """Export `model(**example_inputs)` and return it as a flat graph.

    Non-tensor inputs (e.g. `use_cache=False`) are specialised. Use batch and sequence sizes >= 2 in
    the example so that those dims stay symbolic.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        max_tokens = (position_tables(model) or (None, None))[0]
        shapes = _dynamic_shapes(example_inputs, max_tokens)
        ep = (export_dynamic(model, (), dict(example_inputs), shapes) if dynamic
              else torch.export.export(model, (), dict(example_inputs), strict=False))
    finally:
        model.train(was_training)
    out_spec = ep.call_spec.out_spec
    context = out_spec.context if isinstance(out_spec.context, list) else None
    output_names = list(context) if context else [f"output_{i}" for i in range(out_spec.num_leaves)]
    gm, input_names = _flatten_interface(ep.module(), output_names)
    tensors = {k: v for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)}
    return CapturedGraph(gm, input_names, output_names, tensors, time.perf_counter() - start, constants,
                         max_tokens, tuple(p.dtype for p in model.parameters()))
