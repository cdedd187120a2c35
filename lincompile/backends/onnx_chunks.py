"""Long calls of a causal linear attention site run in chunks inside the ONNX graph (`export_onnx(chunk_size=C)`).

A site template computes the parallel form, quadratic in the call's length. As on the torch path (the kernel
registry sends causal calls over `registry.CHUNK` tokens to `reference.chunked`), a chunked site runs

  head:  the template's nodes in the main graph over the call's first C tokens (all of a decode step, a
         speculative verify, a short prompt);
  If(T > C)
    then: the remaining tokens padded with masked tokens to n*C, a `Scan` of the template over the n chunks with
          the state as the carry (from the head's state), the outputs appended to the head's;
    else: the head's output and state (Identity).

Masked tokens take no position and change no state, so the padding changes nothing but its own (dropped)
outputs, and the result is `reference.chunked(..., C)`. A template whose site has no key mask is exported with
one and fed all-True (the same numbers as none). Without the decode step's own form (`decode_step=False`) the head
stays in the main graph, so that a decode step runs no subgraph nodes (both forms inside an `If` was slower still
in an unscripted trial, session 20), and the `If` costs each decode step time (7% on SmolLM2 in session 20,
`bench/onnx_prefill.py`). With it (`onnx_step`, the default) all of this is the general branch that one-token
calls do not take, and the head moves into the `If`'s then-branch: the else-branch runs the template over the
whole call (at most C tokens), so that its sizes and parameter arithmetic can be hoisted to the main graph
(`hoist_static`), as for a site without chunks.
Subgraphs read the main graph's values (the site's arguments, its parameters) by name; `implicit_inputs` lists
such reads for sorting and pruning.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator

import numpy as np


def subgraphs(node: Any) -> Iterator[Any]:
    """The graphs held by `node`'s attributes (If branches, a Scan or Loop body)."""
    from onnx import AttributeProto

    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def implicit_inputs(node: Any) -> set[str]:
    """Names `node`'s subgraphs read from enclosing scopes (values none of them defines)."""
    names: set[str] = set()
    for graph in subgraphs(node):
        defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
        defined |= {out for inner in graph.node for out in inner.output}
        for inner in graph.node:
            names |= {name for name in inner.input if name} | implicit_inputs(inner)
        names |= {o.name for o in graph.output}
        names -= defined
    return names


def read_names(graph: Any) -> set[str]:
    """Every value name `graph`'s nodes (their subgraphs included) or outputs read."""
    names = {name for node in graph.node for name in [*node.input, *implicit_inputs(node)]}
    return names | {o.name for o in graph.output}


def drop_unused_initializers(graph: Any) -> None:
    """Remove the initializers of `graph` that nothing reads (`read_names`)."""
    read = read_names(graph)
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def copy_nodes(nodes: Iterable[Any], rename: dict[str, str], prefix: str) -> list[Any]:
    """Copies of `nodes` with every value name mapped through `rename`, else prefixed."""
    copies = []
    for node in nodes:
        copied = copy.deepcopy(node)
        copied.name = f"{prefix}{node.name}"
        for field in (copied.input, copied.output):
            for i, name in enumerate(field):
                if name:
                    field[i] = rename.get(name, f"{prefix}{name}")
        copies.append(copied)
    return copies


def hoist_static(nodes: list[Any], data: list[str], results: list[str],
                 sizes: dict[str, str]) -> tuple[list[Any], list[Any]]:
    """`nodes` (in order) split into those that read no value of the outer names `data`, which go to the enclosing
    graph, and the rest. A `Shape` of a name in `sizes` goes too, reading the value named there instead: one of the
    same shape at every call there (for a site, the same input of the first site of the same template). Outside
    a branch onnxruntime folds what parameters alone determine, and computes each size once for all the sites
    that read it, not once per site; in a branch it does neither (`bench/onnx_decode_step.py` measures what that
    costs a multi-token call). A node holding a subgraph or producing one of `results` stays."""
    outer_data = set(data)
    dynamic: set[str] = set()
    pending = {out for node in nodes for out in node.output}  # made by nodes not yet placed: `nodes` out of order
    hoisted, kept = [], []
    for node in nodes:
        reads = [name for name in node.input if name]
        sized = node.op_type == "Shape" and reads[0] in sizes
        if (any(True for _ in subgraphs(node)) or any(out in results for out in node.output)
                or any(name in dynamic or name in pending for name in reads)
                or not sized and any(name in outer_data for name in reads)):
            dynamic.update(node.output)
            kept.append(node)
        else:
            if sized:
                node.input[0] = sizes[reads[0]]
            hoisted.append(node)
        pending.difference_update(node.output)
    return hoisted, kept


def _typed(value: Any, name: str) -> Any:
    """A copy of the value info `value` (type and shape) under `name`."""
    copied = copy.deepcopy(value)
    copied.name = name
    return copied


class Nodes:
    """Emits nodes whose outputs are named `prefix + what`."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes = prefix, []

    def __call__(self, op: str, inputs: list[str], what: str, **attrs: Any) -> str:
        from onnx import helper

        output = self.prefix + what
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def const(self, what: str, values: list[int]) -> str:
        from onnx import numpy_helper

        return self("Constant", [], what, value=numpy_helper.from_array(np.array(values, dtype=np.int64)))


def all_true_mask(q: str, prefix: str) -> tuple[list[Any], str]:
    """Nodes making a bool [batch, seq] mask of True from q [batch, heads, seq, dim], and its name."""
    from onnx import TensorProto, helper

    emit = Nodes(prefix)
    shape = emit("Concat", [emit("Shape", [q], "batch", start=0, end=1), emit("Shape", [q], "seq", start=2, end=3)],
                 "mask_shape", axis=0)
    emit.nodes.append(helper.make_node("ConstantOfShape", [shape], [prefix + "mask"], name=prefix + "mask",
                                       value=helper.make_tensor("true", TensorProto.BOOL, [1], [True])))
    return emit.nodes, prefix + "mask"


def chunked_site(template: Any, args: list[str], rename: dict[str, str], results: list[str], prefix: str,
                 chunk: int, sizes: dict[str, str] | None = None) -> list[Any]:
    """Nodes running `template` (a graph: inputs q, k, v, key_mask, *state, *params; outputs out, *new_state)
    over the outer values `args` (q, k, v, key_mask, *state): its first `chunk` tokens in one piece, any rest in
    chunks of `chunk`. `rename` maps the template's parameter and initializer names to outer names; `results`
    names the outputs (out, *new_state). With `sizes` (a site whose decode step has its own form, so that all of
    this runs inside a branch already) the head runs in the `If`'s long branch, and calls of up to `chunk` tokens
    run the template over the whole call in the short one, whose size and parameter arithmetic `hoist_static`
    (with `sizes`) moves out, as for a site without chunks."""
    from onnx import helper

    inputs = [i.name for i in template.input]
    outputs = [o.name for o in template.output]
    num_state = len(outputs) - 1
    q = args[0]
    consts = Nodes(prefix)
    zero, size = consts.const("zero", [0]), consts.const("chunk", [chunk])
    axes = [consts.const("axis2", [2])] * 3 + [consts.const("axis1", [1])]  # the token axis of q, k, v, key_mask
    emit = Nodes(prefix)
    head = {name: emit("Slice", [value, zero, size, axis], f"head/{name}")
            for name, value, axis in zip(inputs[:4], args[:4], axes)}
    head.update(zip(inputs[4:4 + num_state], args[4:4 + num_state]))
    head.update({o: f"{prefix}head/{o}" for o in outputs})
    head_nodes = emit.nodes + copy_nodes(template.node, dict(rename, **head), f"{prefix}head/")
    head_out, head_state = head[outputs[0]], [head[o] for o in outputs[1:]]
    rest = _rest_in_chunks(template, args, rename, head_out, head_state, f"{prefix}rest/", size, axes, chunk)
    if sizes is None:
        nodes = consts.nodes + head_nodes
        short = Nodes(f"{prefix}short/")
        for name, value in zip(outputs, [head_out, *head_state]):
            short("Identity", [value], name)
        else_graph = helper.make_graph(short.nodes, "short", [],
                                       [_typed(o, short.prefix + o.name) for o in template.output])
        then_graph = rest
    else:
        whole = dict(rename, **dict(zip(inputs, args)))
        whole.update({o: f"{prefix}short/{o}" for o in outputs})
        hoisted, short_nodes = hoist_static(copy_nodes(template.node, whole, f"{prefix}short/"), args,
                                            [whole[o] for o in outputs], sizes)
        nodes = consts.nodes + hoisted
        else_graph = helper.make_graph(short_nodes, "short", [],
                                       [_typed(o, whole[o.name]) for o in template.output])
        then_graph = helper.make_graph(head_nodes + list(rest.node), "long", [], list(rest.output))
    tail = Nodes(prefix)
    longer = tail("Greater", [tail("Shape", [q], "seq", start=2, end=3), size], "longer")
    tail.nodes.append(helper.make_node("If", [longer], results, name=f"{prefix}if", then_branch=then_graph,
                                       else_branch=else_graph))
    return nodes + tail.nodes


def _rest_in_chunks(template: Any, args: list[str], rename: dict[str, str], head_out: str, head_state: list[str],
                    prefix: str, size: str, axes: list[str], chunk: int) -> Any:
    """The `If` branch for calls longer than `chunk`: tokens `chunk`.. padded with masked tokens to n chunks,
    a `Scan` of the template over them from the head's state, the outputs after the head's."""
    from onnx import helper

    inputs = [i.name for i in template.input]
    outputs = [o.name for o in template.output]
    num_state = len(outputs) - 1
    emit = Nodes(prefix)
    end = emit.const("end", [2 ** 62])  # past any length: Slice clamps it
    rest = [emit("Slice", [value, size, end, axis], f"{name}_rest")
            for value, axis, name in zip(args[:4], axes, "qkvm")]
    length = emit("Shape", [rest[0]], "length", start=2, end=3)
    count = emit("Div", [emit("Add", [length, emit.const("size_minus_1", [chunk - 1])], "length_up"), size],
                 "count")
    padded = emit("Mul", [count, size], "padded")
    pad = emit("Sub", [padded, length], "pad")
    zero = emit.const("zero", [0])
    scanned = []
    for name, value in zip("qkv", rest[:3]):  # [B, H, T, d] -> [n, B, H, C, d]
        pads = emit("Concat", [zero] * 6 + [pad, zero], f"{name}_pads", axis=0)
        shape = emit("Concat", [emit("Shape", [value], f"{name}_bh", start=0, end=2), count, size,
                                emit("Shape", [value], f"{name}_d", start=3, end=4)], f"{name}_shape", axis=0)
        chunks = emit("Reshape", [emit("Pad", [value, pads], f"{name}_padded"), shape], f"{name}_chunks")
        scanned.append(emit("Transpose", [chunks], f"{name}_scanned", perm=[2, 0, 1, 3, 4]))
    mask_pads = emit("Concat", [zero, zero, zero, pad], "m_pads", axis=0)  # Pad fills bool with False
    mask_shape = emit("Concat", [emit("Shape", [rest[3]], "m_b", start=0, end=1), count, size], "m_shape", axis=0)
    chunks = emit("Reshape", [emit("Pad", [rest[3], mask_pads], "m_padded"), mask_shape], "m_chunks")
    scanned.append(emit("Transpose", [chunks], "m_scanned", perm=[1, 0, 2]))

    body_prefix = f"{prefix}chunk/"
    by_name = {i.name: i for i in [*template.input, *template.output]}
    body_inputs, body_outputs = inputs[4:4 + num_state] + inputs[:4], outputs[1:] + outputs[:1]
    once, per_chunk = hoist_static(copy_nodes(template.node, rename, body_prefix),
                                   [body_prefix + n for n in body_inputs], [body_prefix + n for n in body_outputs], {})
    emit.nodes.extend(once)  # what the parameters alone determine: once per call, not once per chunk
    body = helper.make_graph(per_chunk, "chunk", [_typed(by_name[n], body_prefix + n) for n in body_inputs],
                             [_typed(by_name[n], body_prefix + n) for n in body_outputs])
    final = [f"{prefix}{o}" for o in outputs[1:]]
    stacked = f"{prefix}outs"
    emit.nodes.append(helper.make_node("Scan", head_state + scanned, final + [stacked], name=f"{prefix}scan",
                                       body=body, num_scan_inputs=4))
    ordered = emit("Transpose", [stacked], "outs_ordered", perm=[1, 2, 0, 3, 4])  # [B, H, n, C, dv]
    flat_shape = emit("Concat", [emit("Shape", [ordered], "out_bh", start=0, end=2), padded,
                                 emit("Shape", [ordered], "out_d", start=4, end=5)], "out_shape", axis=0)
    out = emit("Slice", [emit("Reshape", [ordered, flat_shape], "outs_flat"), zero, length, axes[0]], "out_rest")
    out = emit("Concat", [head_out, out], outputs[0], axis=2)
    return helper.make_graph(emit.nodes, "rest", [],
                             [_typed(template.output[0], out)]
                             + [_typed(o, name) for o, name in zip(template.output[1:], final)])
