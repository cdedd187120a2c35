"""8-bit weights in an ONNX export (`export_onnx(quantize="int8")`): which MatMuls become MatMulNBits, and the
quantized export against the float one."""
from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lincompile
from lincompile.backends import onnx as lo
from lincompile.backends import onnx_quantize
from lincompile.backends.ort import OrtModel
from lincompile.diagnostics import LincompileWarning
from lincompile.runtime.speculative import speculative_generate
from lincompile.testing.tiny import perturb_new_parameters, tiny_model


def test_only_linear_weights_are_folded():
    """MatMul(x, Transpose(W)) with W a weight folds to MatMul(x, W^T), the same numbers; a product of two
    activations and a linearization parameter (`lincompile_params...`) stay as they are."""
    gen = np.random.default_rng(0)
    weight, param = gen.standard_normal((6, 4)).astype(np.float32), gen.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="linear"),
             helper.make_node("Transpose", ["lincompile_params.site_0.proj"], ["pt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "pt"], ["z"], name="feature_map"),
             helper.make_node("MatMul", ["y", "x2"], ["u"], name="activations")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in [("x", [2, 4]), ("x2", [6, 3])]]
    graph = helper.make_graph(
        nodes, "g", inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "u")],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(param, "lincompile_params.site_0.proj")])
    folded = onnx_quantize.fold_transposed_weights(graph)
    assert [n.name for n in folded] == ["linear"]
    assert [n.op_type for n in graph.node] == ["MatMul", "Transpose", "MatMul", "MatMul"]
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert "w" not in inits and np.array_equal(inits[folded[0].input[1]], weight.T)


def test_gemms_with_a_weight_become_named_matmuls():
    """Gemm(x, W, b) (GPT-2's Conv1D) becomes MatMul(x, W) + b, transB stored transposed back, the same numbers;
    a Gemm scaled by alpha, or whose B is an activation, stays a Gemm."""
    import onnxruntime as ort

    gen = np.random.default_rng(1)
    w, wt, b = (gen.standard_normal(s).astype(np.float32) for s in ((4, 6), (6, 4), (6,)))
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="conv1d"),
             helper.make_node("Gemm", ["x", "wt"], ["z"], transB=1),
             helper.make_node("Gemm", ["x", "w"], ["scaled"], alpha=0.5),
             helper.make_node("Gemm", ["x", "x2"], ["u"], name="activations")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in [("x", [2, 4]), ("x2", [4, 3])]]
    graph = helper.make_graph(
        nodes, "g", inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "scaled", "u")],
        [numpy_helper.from_array(v, n) for v, n in ((w, "w"), (wt, "wt"), (b, "b"))])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feed = {"x": gen.standard_normal((2, 4)).astype(np.float32), "x2": gen.standard_normal((4, 3)).astype(np.float32)}
    expected = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    folded = onnx_quantize.fold_transposed_weights(after.graph)
    assert [n.name for n in folded] == ["conv1d", "lc_linear_1"]
    assert [n.op_type for n in after.graph.node] == ["MatMul", "Add", "MatMul", "Gemm", "Gemm"]
    got = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


def test_gpt2_conv1d_layers_are_quantized(tmp_path):
    model = perturb_new_parameters(lincompile.optimize(tiny_model("gpt2"), "augmented"))
    linears = sum(1 for n in model.graph.graph.nodes if str(n.target) in ("aten.linear.default", "aten.addmm.default"))
    out = lo.export_onnx(model, tmp_path / "int8", quantize="int8")
    assert json.loads((out / lo.META_FILE).read_text())["quantize"]["linear_layers"] == linears > 8
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    got = OrtModel.from_dir(out, providers=["CPUExecutionProvider"])(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() <= 3e-2


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny hedgehog llama (a learned feature map: a parameter MatMul inside each site) exported with float and
    with 8-bit weights."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "hedgehog"))
    root = tmp_path_factory.mktemp("quantize")
    before = (list(logging.getLogger().handlers), logging.getLogger().level)
    quantized = lo.export_onnx(model, root / "int8", quantize="int8")
    assert (list(logging.getLogger().handlers), logging.getLogger().level) == before  # no basicConfig left behind
    return model, quantized, lo.export_onnx(model, root / "float")


def test_every_linear_layer_and_nothing_else_is_quantized(exports):
    model, quantized, _ = exports
    linears = sum(1 for n in model.graph.graph.nodes if "linear" in str(n.target))
    meta = json.loads((quantized / lo.META_FILE).read_text())
    assert meta["quantize"] == {"scheme": "int8", "bits": 8, "block_size": 32, "accuracy_level": 4,
                                "linear_layers": linears}
    proto = onnx.load(str(quantized / lo.MODEL_FILE))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == linears and all(n.domain == "com.microsoft" for n in nbits)
    assert not any(n.name.startswith("lc") for n in nbits)  # attention sites keep float
    assert json.loads((exports[2] / lo.META_FILE).read_text())["quantize"] is None


def test_quantized_export_stays_close_to_the_float_export(exports):
    """Logits within 3% (relative norm) of the float export's on a left-padded batch, after the prompt and after
    decode steps from the state; the state has the float export's layout."""
    _, quantized, floating = exports
    runners = [OrtModel.from_dir(d, providers=["CPUExecutionProvider"]) for d in (quantized, floating)]
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outs = [r(ids, mask) for r in runners]
    for _ in range(3):
        token = outs[1].logits[:, -1:].argmax(-1)
        outs = [r(token, past_state=o.past_state) for r, o in zip(runners, outs)]
        got, ref = outs[0].logits, outs[1].logits
        assert ((got - ref).norm() / ref.norm()).item() <= 3e-2
    assert ({n: tuple(v.shape()) for n, v in outs[0].past_state.tensors.items()}
            == {n: tuple(v.shape()) for n, v in outs[1].past_state.tensors.items()})


def test_an_unknown_scheme_is_refused_before_writing(tmp_path):
    model = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.raises(ValueError, match="known schemes are \\['int8'\\]"):
        lo.export_onnx(model, tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists()


def test_8_bit_weights_combine_with_chunks_in_the_graph(tmp_path):
    """The chunked sites' subgraphs read parameters from the main graph: quantizing must keep them."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented"))
    out = lo.export_onnx(model, tmp_path / "both", chunk_size=4, quantize="int8")
    meta = json.loads((out / lo.META_FILE).read_text())
    assert meta["chunked_sites"] == 2 and meta["quantize"]["linear_layers"] == 15
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    got = OrtModel.from_dir(out, providers=["CPUExecutionProvider"])(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() <= 3e-2


def test_speculative_decoding_warns_for_8_bit_weights_only(exports):
    """An int8 export's verify calls and one-token calls round differently and its 8-bit activations magnify that,
    so speculative decoding says its output can differ from plain greedy decoding (at the caller's line, however
    it was called); a float export's stays silent and gives plain greedy decoding's output."""
    _, quantized, floating = exports
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    target = OrtModel.from_dir(quantized, providers=["CPUExecutionProvider"])
    match = "8-bit weights: its verify calls and one-token calls round differently"
    with pytest.warns(LincompileWarning, match=match) as direct:
        speculative_generate(target, ids, 6, "prompt-lookup", 3)
    with pytest.warns(LincompileWarning, match=match) as through_generate:
        target.generate(ids, 6, draft="prompt-lookup", num_draft_tokens=3)
    assert [w.filename for w in (*direct, *through_generate)] == [__file__] * 2  # the caller's line, not lincompile's
    runner = OrtModel.from_dir(floating, providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = speculative_generate(runner, ids, 6, "prompt-lookup", 3)
    assert torch.equal(out, runner.generate(ids, 6, eos_token_id=None))
