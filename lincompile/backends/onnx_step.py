"""A decode step's own form of a causal linear attention site inside the ONNX graph (`export_onnx(decode_step=True)`).

A site template computes the parallel form from a state: masks over the group buffer, the conv window and the new
tokens, about 180 nodes per site once onnxruntime has optimized SmolLM2's graph. At a decode step (one token)
every node costs microseconds whatever its size, so those nodes cost far more than the step's arithmetic. The
step form is the same site traced from the recurrent reference on the call's first token (`first_token`: about 70
nodes there). A site with it runs

  the nodes of either form that read no values of the site's inputs, only sizes (`onnx_chunks.hoist_static`);
  If(T == 1)
    then: the rest of the step template's nodes;
    else: the rest of the site's general nodes (the parallel template, or `onnx_chunks`' If(T > C)).

Each call runs one form. Session 21 kept the whole step in the main graph, run on every call's first token,
for fear that branch nodes run more slowly. They do, but only because onnxruntime neither folds the parameters'
arithmetic nor shares the size arithmetic among sites inside a branch, which hoisting leaves it in the main
graph to do. `bench/onnx_decode_step.py` measures the layouts against the export without the step form.
The recurrent and parallel references are forms of the same math (tests/kernels check them against each other on
every causal linear method), so the graph's numbers do not depend on which form ran, up to fp32 rounding.
"""
from __future__ import annotations

from typing import Any

from lincompile.backends.onnx_chunks import Nodes, copy_nodes, hoist_static
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
              results: list[str], prefix: str, condition: str, sizes: dict[str, str]) -> list[Any]:
    """The nodes of one site: what `hoist_static` moves out of its branches, then `If(condition)`. Its
    then-branch runs the `step` template (a graph: inputs q, k, v[, key_mask], *state, *params; outputs out,
    *new_state) over the outer values `args`, its else-branch the nodes `general` producing `general_results`
    (in the same order). `rename` maps the step template's parameter and initializer names to outer names;
    `results` names the site's outputs; `sizes` is `hoist_static`'s."""
    from onnx import helper

    step_prefix = f"{prefix}step/"
    names = dict(rename, **dict(zip((i.name for i in step.input), args)))
    names.update({o.name: f"{step_prefix}{o.name}" for o in step.output})

    def branch(nodes: list[Any], name: str, outputs: list[str]) -> Any:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            result, o.type.tensor_type.elem_type, None) for result, o in zip(outputs, step.output)])

    step_results = [names[o.name] for o in step.output]
    hoisted, step_nodes = hoist_static(copy_nodes(step.node, names, step_prefix), args, step_results, sizes)
    hoisted_general, general = hoist_static(general, args, general_results, sizes)
    return hoisted + hoisted_general + [helper.make_node(
        "If", [condition], results, name=f"{prefix}step_if", then_branch=branch(step_nodes, "step", step_results),
        else_branch=branch(general, "general", general_results))]
