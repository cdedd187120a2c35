"""A decode step's own form of a causal linear attention site inside the ONNX graph (`export_onnx(decode_step=True)`).

A site template computes the parallel form from a state: masks over the group buffer, the conv window and the new
tokens, about 180 nodes per site once onnxruntime has optimized SmolLM2's graph. At a decode step (one token)
every node costs microseconds whatever its size, so those nodes cost far more than the step's arithmetic. The
step form is the same site traced from the recurrent reference on the call's first token (`first_token`: about 70
nodes there). A site with it runs

  step:  the step template's nodes in the main graph, on the call's first token (whatever the call's length);
  If(T == 1)
    then: the step's output and state (Identity);
    else: the site's general nodes (the parallel template, or `onnx_chunks`' head and chunks).

The step stays in the main graph because onnxruntime runs a subgraph's nodes more slowly (`If` branches holding
both forms were slower than this layout in an unscripted trial, session 21). A call of more tokens pays for the
unused step and for running its general nodes inside a branch; `bench/onnx_decode_step.py` measures both sides.
The recurrent and parallel references are forms of the same math (tests/kernels check them against each other on
every causal linear method), so the graph's numbers do not depend on which form ran, up to fp32 rounding.
"""
from __future__ import annotations

from typing import Any

from lincompile.backends.onnx_chunks import Nodes, copy_nodes
from lincompile.methods.spec import MethodSpec


def takes_step(spec_json: str, causal: bool) -> bool:
    """Whether a site of this method has a step form: causal linear attention with a recurrent state."""
    spec = MethodSpec.from_json(spec_json)
    return causal and spec.kind == "linear" and spec.causal_safe


def one_token(input_ids: str, prefix: str) -> tuple[list[Any], str]:
    """Nodes computing the bool scalar `input_ids.shape[1] == 1` (a decode step), and its name."""
    emit = Nodes(prefix)
    seq = emit("Shape", [input_ids], "seq", start=1, end=2)
    return emit.nodes, emit("Squeeze", [emit("Equal", [seq, emit.const("one", [1])], "is_one")], "one_token")


def step_site(step: Any, general: list[Any], general_results: list[str], args: list[str], rename: dict[str, str],
              results: list[str], prefix: str, condition: str) -> list[Any]:
    """Nodes for one site: the `step` template (a graph: inputs q, k, v[, key_mask], *state, *params; outputs
    out, *new_state) over the outer values `args` in the main graph, then `If(condition)` choosing its outputs or
    those of `general` (nodes producing `general_results`, in the same order). `rename` maps the step template's
    parameter and initializer names to outer names; `results` names the site's outputs."""
    from onnx import helper

    inputs = [i.name for i in step.input]
    outputs = [o.name for o in step.output]
    step_prefix = f"{prefix}step/"
    names = dict(rename, **dict(zip(inputs, args)))
    names.update({o: f"{step_prefix}{o}" for o in outputs})
    nodes = copy_nodes(step.node, names, step_prefix)
    chosen = Nodes(f"{prefix}step_out/")
    for o in outputs:
        chosen("Identity", [names[o]], o)
    typed = [helper.make_tensor_value_info(chosen.prefix + o.name, o.type.tensor_type.elem_type, None)
             for o in step.output]
    then_graph = helper.make_graph(chosen.nodes, "step", [], typed)
    else_graph = helper.make_graph(general, "general", [], [
        helper.make_tensor_value_info(name, o.type.tensor_type.elem_type, None)
        for name, o in zip(general_results, step.output)])
    nodes.append(helper.make_node("If", [condition], results, name=f"{prefix}step_if", then_branch=then_graph,
                                  else_branch=else_graph))
    return nodes
