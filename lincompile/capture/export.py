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

    def fork(self) -> "CapturedGraph":
        """A copy whose graph passes may rewrite freely; parameters and buffers stay shared."""
        graph = fx.Graph()
        graph._codegen = self.gm.graph._codegen
        out = graph.graph_copy(self.gm.graph, {})
        graph.output(out)
        return CapturedGraph(fx.GraphModule(self.gm, graph), list(self.input_names), list(self.output_names),
                             dict(self.example_inputs), self.seconds, dict(self.constants))

    def __call__(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"missing graph inputs {missing}; the graph takes {self.input_names}")
        return self.gm(*[inputs[n] for n in self.input_names])


def _dynamic_shapes(example: dict[str, object], named: bool = True) -> dict[str, object]:
    """Batch and sequence dims: named, bounded `Dim`s (export proves every guard over their range), or, with
    `named=False`, `Dim.DYNAMIC` (export records what it cannot prove instead of refusing)."""
    batch = Dim("batch", min=1, max=1024) if named else Dim.DYNAMIC
    seq = Dim("seq", min=1, max=1 << 17) if named else Dim.DYNAMIC
    dec_seq = Dim("decoder_seq", min=1, max=1 << 17) if named else Dim.DYNAMIC
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


def _still_dynamic(ep: torch.export.ExportedProgram, shapes: dict[str, object]) -> bool:
    """Whether every dim `shapes` made dynamic is symbolic in `ep`'s inputs (none was specialised)."""
    inputs = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    for name, dims in shapes.items():
        val = inputs.get(name)
        if dims and val is not None and any(isinstance(val.shape[d], int) for d in dims):
            return False
    return True


def _export(model: torch.nn.Module, example_inputs: dict[str, object], dynamic: bool) -> torch.export.ExportedProgram:
    """`torch.export` with dynamic batch and sequence. Some torch releases (2.11 with a GQA model's `repeat_kv`) fail
    to prove a guard that holds for every size, e.g. Min(64*seq, 192*seq) == 64*seq, and refuse the named dims:
    then export again with `Dim.DYNAMIC`, and keep that graph only if no dim was specialised."""
    if not dynamic:
        return torch.export.export(model, (), dict(example_inputs), strict=False)
    try:
        return torch.export.export(model, (), dict(example_inputs), strict=False,
                                   dynamic_shapes=_dynamic_shapes(example_inputs))
    except torch._dynamo.exc.UserError as exc:
        if exc.error_type != torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION:
            raise
        shapes = _dynamic_shapes(example_inputs, named=False)
        ep = torch.export.export(model, (), dict(example_inputs), strict=False, dynamic_shapes=shapes)
        if not _still_dynamic(ep, shapes):
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
        ep = _export(model, example_inputs, dynamic)
    finally:
        model.train(was_training)
    out_spec = ep.call_spec.out_spec
    context = out_spec.context if isinstance(out_spec.context, list) else None
    output_names = list(context) if context else [f"output_{i}" for i in range(out_spec.num_leaves)]
    gm, input_names = _flatten_interface(ep.module(), output_names)
    tensors = {k: v for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)}
    return CapturedGraph(gm, input_names, output_names, tensors, time.perf_counter() - start, constants)
