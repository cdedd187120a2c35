"""Weight-only quantization of an export's linear layers (`export_onnx(..., quantize="int8")`).

Every `nn.Linear` of the model (attention projections, MLP, the LM head; LoRA adapters too) becomes onnxruntime's
`MatMulNBits` (domain com.microsoft): weights in 8 bits, asymmetric, one scale and zero point per block of 32
inputs, and `accuracy_level` 4, under which onnxruntime's CPU kernel quantizes each block of activations to int8
on the fly and multiplies in integers. What stays in float: the attention sites (their method parameters, the
recurrent state and every product of activations), the norms, the embedding table.

torch.onnx writes a linear layer as MatMul(x, Transpose(W)) with W an initializer; `fold_transposed_weights`
stores W^T instead, which is the form the quantizer reads. It writes GPT-2's Conv1D (an `addmm`) as Gemm(x, W, b):
that becomes MatMul(x, W) then Add(b). Only those MatMuls are quantized (named to the quantizer one by one), never
a MatMul of two activations, and never one whose weight is a linearization parameter (`PARAMS_MODULE`, e.g.
Hedgehog's feature map).

The export then runs in onnxruntime only (the op is a contrib op), with `onnxruntime>=MIN_ORT`.
`python bench/onnx_quantize.py` measures perplexity, decode speed and size against the float export.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lincompile.backends.onnx_chunks import drop_unused_initializers, read_names
from lincompile.passes.linearize import PARAMS_MODULE

#: scheme -> MatMulNBits settings
SCHEMES: dict[str, dict[str, int]] = {"int8": {"bits": 8, "block_size": 32, "accuracy_level": 4}}
#: The first onnxruntime whose quantizer writes, and whose CPU kernel runs, 8-bit MatMulNBits.
MIN_ORT = (1, 22)


def _gemm_as_matmul(node: Any, initializers: dict[str, Any], index: int) -> list[Any] | None:
    """[MatMul(x, W)] or [MatMul(x, W), Add(b)] computing `node`, a Gemm(x, W[, b]) with W a 2-D initializer (not a
    linearization parameter), x not transposed and alpha = beta = 1 (what torch.onnx writes for `addmm`); None for
    any other Gemm. The MatMul is named, for the quantizer; a transposed W is stored transposed back."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight_name = node.input[1]
    if (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
            or weight_name not in initializers or PARAMS_MODULE in weight_name):
        return None
    weight = numpy_helper.to_array(initializers[weight_name])
    if weight.ndim != 2:
        return None
    if attrs.get("transB", 0):
        weight_name = f"{weight_name}/folded"
        initializers[weight_name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), weight_name)
    name = node.name or f"lc_linear_{index}"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    product = f"{node.output[0]}/matmul" if bias else node.output[0]
    nodes = [helper.make_node("MatMul", [node.input[0], weight_name], [product], name=name)]
    if bias:
        nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}/bias"))
    return nodes


def fold_transposed_weights(graph: Any) -> list[Any]:
    """Rewrite MatMul(x, Transpose(W)) with W an initializer (not a linearization parameter) as MatMul(x, W^T),
    and Gemm(x, W[, b]) as MatMul(x, W)[ + b] (`_gemm_as_matmul`), in `graph` in place; returns those MatMul
    nodes (named, for the quantizer). Transposes left unused and initializers nothing reads any more are
    dropped."""
    from onnx import numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    known = set(initializers)
    folded: dict[str, str] = {}
    matmuls = []
    rewritten = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Gemm":
            nodes = _gemm_as_matmul(node, initializers, index)
            if nodes is not None:
                matmuls.append(nodes[0])
            rewritten += nodes or [node]
            continue
        rewritten.append(node)
        transpose = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        if PARAMS_MODULE in transpose.input[0]:
            continue
        if transpose.output[0] not in folded:
            weight = numpy_helper.to_array(initializers[transpose.input[0]])
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            if weight.ndim != 2 or perm not in (None, [1, 0]):
                continue
            name = f"{transpose.output[0]}/folded"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
            folded[transpose.output[0]] = name
        node.input[1] = folded[transpose.output[0]]
        if not node.name:
            node.name = f"lc_linear_{index}"
        matmuls.append(node)
    graph.initializer.extend(init for name, init in initializers.items() if name not in known)
    del graph.node[:]
    graph.node.extend(rewritten)
    read = read_names(graph)
    kept = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in folded
                                          and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(kept)
    drop_unused_initializers(graph)
    return matmuls


def check_scheme(scheme: str) -> None:
    """Refuse an unknown scheme, or an onnxruntime too old for 8-bit MatMulNBits, with what to do."""
    import onnxruntime

    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r}: known schemes are {sorted(SCHEMES)} (or None for float weights)")
    version = tuple(int(x) for x in onnxruntime.__version__.split(".")[:2])
    if version < MIN_ORT:
        raise RuntimeError(f"quantize={scheme!r} needs onnxruntime >= {'.'.join(map(str, MIN_ORT))} (8-bit "
                           f"MatMulNBits); this is {onnxruntime.__version__}: pip install -U onnxruntime")


def quantize_weights(model: Any, scheme: str) -> tuple[Any, int]:
    """(the quantized onnx.ModelProto, number of linear layers quantized) for `model` (an onnx.ModelProto, whose
    graph is rewritten by `fold_transposed_weights`) under `scheme` (a key of `SCHEMES`)."""
    check_scheme(scheme)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:  # importing the quantizer calls logging.basicConfig(level=INFO): undo that in the user's process
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    matmuls = fold_transposed_weights(model.graph)
    settings = SCHEMES[scheme]
    quantizer = MatMulNBitsQuantizer(model, bits=settings["bits"], block_size=settings["block_size"],
                                     is_symmetric=False, accuracy_level=settings["accuracy_level"],
                                     nodes_to_include=[node.name for node in matmuls])
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs a line per node
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    quantized = quantizer.model.model
    count = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    return quantized, count
