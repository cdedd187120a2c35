"""Exact peephole rewrites of an exported graph (`onnx_simplify.simplify`): each rewrite against onnxruntime on a
small graph, and a tiny model's export with and without them, bit for bit."""
from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lincompile
from lincompile.backends import onnx as lo
from lincompile.backends.onnx_simplify import _graphs, _merged_axes, simplify
from lincompile.backends.ort import OrtModel
from lincompile.testing.tiny import perturb_new_parameters, tiny_model

ort = pytest.importorskip("onnxruntime")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None,
                                                                                                           feeds)


def _count(graph: onnx.GraphProto, op: str) -> int:
    """Nodes of type `op` in `graph` and its subgraphs."""
    return sum(node.op_type == op for g in _graphs(graph) for node in g.node)


def test_merged_axes_insert_the_same_dims_as_two_unsqueezes():
    """One Unsqueeze with the merged axes gives the same shape (and layout) as the two, for random axes."""
    rng = random.Random(0)
    for _ in range(300):
        shape = [2, 3, 4][:rng.randint(0, 3)]
        x = np.arange(int(np.prod(shape))).reshape(shape)
        first = rng.sample(range(x.ndim + 2), 2)[:rng.randint(1, 2)]  # axes of the output: < rank + count
        first = first if max(first) < x.ndim + len(first) else [max(first) - 1]
        twice = np.expand_dims(x, first)
        second = rng.sample(range(twice.ndim + 2), 2)[:rng.randint(1, 2)]
        second = second if max(second) < twice.ndim + len(second) else [max(second) - 1]
        twice = np.expand_dims(twice, second)
        once = np.expand_dims(x, _merged_axes(np.array(first), np.array(second)))  # unsorted axes too
        assert once.shape == twice.shape and np.array_equal(once, twice), (x.shape, first, second)
    assert _merged_axes(np.array([-1]), np.array([0])) is None  # a negative axis needs the rank


def _const(name: str, values: list, dtype: int = TensorProto.INT64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=helper.tensor_dtype_to_np_dtype(dtype)), name)


def _graph_with_every_rewrite() -> onnx.ModelProto:
    """x [2, 3] float, n [2] int64: repeated `n % 64` (each reading its own 64, one a Constant node), a whole-axis
    Slice, Unsqueeze and Reshape chains, and an If whose branches repeat the outer graph's constants and nodes."""
    nodes = [
        helper.make_node("Constant", [], ["sixty_four_node"], value=_const("v", 64)),
        helper.make_node("Mod", ["n", "sixty_four"], ["mod_a"]),
        helper.make_node("Mod", ["n", "sixty_four_node"], ["mod_b"]),
        helper.make_node("Add", ["mod_a", "mod_b"], ["mods"]),
        helper.make_node("Slice", ["x", "zero", "longest", "zero", "one"], ["whole"]),
        helper.make_node("Unsqueeze", ["whole", "one"], ["u1"]),
        helper.make_node("Unsqueeze", ["u1", "three"], ["u2"]),  # [2, 1, 3, 1]
        helper.make_node("Reshape", ["u2", "flat"], ["r1"]),
        helper.make_node("Reshape", ["r1", "three_by_two"], ["reshaped"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero_f"], ["positive"]),
    ]
    branch_nodes = [helper.make_node("Constant", [], ["inner_64"], value=_const("w", 64)),
                    helper.make_node("Mod", ["n", "inner_64"], ["inner_mod"]),
                    helper.make_node("Mod", ["n", "sixty_four"], ["inner_mod_2"]),
                    helper.make_node("Mul", ["inner_mod", "inner_mod_2"], ["branch_out"])]
    then = helper.make_graph(branch_nodes, "then", [], [helper.make_tensor_value_info("branch_out", 7, [2])])
    other = helper.make_graph([helper.make_node("Identity", ["mods"], ["other_out"])], "else", [],
                              [helper.make_tensor_value_info("other_out", 7, [2])])
    nodes.append(helper.make_node("If", ["positive"], ["chosen"], then_branch=then, else_branch=other))
    inits = [_const("sixty_four", 64), _const("zero", [0]), _const("longest", [2**63 - 1]), _const("one", [1]),
             _const("three", [3]), _const("flat", [-1]), _const("three_by_two", [3, 2]),
             _const("zero_f", 0.0, TensorProto.FLOAT)]
    outputs = [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in
               [("mods", 7, [2]), ("reshaped", 1, [3, 2]), ("chosen", 7, [2]), ("whole", 1, [2, 3])]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3]),
                                           helper.make_tensor_value_info("n", 7, [2])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_every_rewrite_keeps_every_output_the_same():
    model = _graph_with_every_rewrite()
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 1, "n": np.array([70, 130], dtype=np.int64)}
    before = _run(model, feeds)
    counts = simplify(model)
    after = _run(model, feeds)
    for a, b in zip(before, after, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    # the Constant node and the branch's own 64 share `sixty_four`; the If's Mods then repeat one another
    assert counts == {"shared_constant": 2, "repeated_node": 2, "noop_slice": 0, "unsqueeze_chain": 1,
                      "reshape_chain": 1}
    assert _count(model.graph, "Mod") == 2 and _count(model.graph, "Unsqueeze") == 1
    assert _count(model.graph, "Slice") == 1  # its output is a graph output: it keeps its name and producer


def test_a_slice_of_a_whole_axis_goes_and_random_nodes_stay():
    """The whole-axis Slice is removed when nothing outside reads it by name; two equal random nodes stay two."""
    nodes = [helper.make_node("Slice", ["x", "zero", "longest", "zero"], ["whole"]),
             helper.make_node("Relu", ["whole"], ["y"]),
             helper.make_node("RandomUniformLike", ["x"], ["r1"], seed=1.0),
             helper.make_node("RandomUniformLike", ["x"], ["r2"], seed=1.0),
             helper.make_node("Sub", ["r1", "r2"], ["d"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3])],
                              [helper.make_tensor_value_info(name, 1, [2, 3]) for name in ("y", "d")],
                              [_const("zero", [0]), _const("longest", [2**63 - 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.array([[-1, 2, -3], [4, -5, 6]], dtype=np.float32)
    assert simplify(model)["noop_slice"] == 1 and [n.op_type for n in model.graph.node].count("RandomUniformLike") == 2
    assert np.array_equal(_run(model, {"x": x})[0], np.maximum(x, 0))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny augmented llama (GQA, trained-like parameters) exported with and without `simplify`."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented"))
    root = tmp_path_factory.mktemp("simplify")
    return model, lo.export_onnx(model, root / "simplified"), lo.export_onnx(model, root / "plain", simplify=False)


def test_a_simplified_export_computes_the_same_bits(exports):
    """Prefill of a left-padded batch, a decode step and a 3-token call: logits and every state part equal bit for
    bit; the JSON counts the rewrites, and the graph holds fewer nodes."""
    _, simplified, plain = exports
    runners = [OrtModel.from_dir(d, providers=["CPUExecutionProvider"]) for d in (simplified, plain)]
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    outs = [r(ids, attention_mask=mask) for r in runners]
    for width in (1, 3):
        nxt = torch.randint(3, 128, (2, width), generator=torch.Generator().manual_seed(width))
        calls = [r(nxt, past_state=o.past_state, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1))
                 for r, o in zip(runners, outs)]
        for a, b in ((outs[0], outs[1]), (calls[0], calls[1])):
            assert torch.equal(a.logits, b.logits)
            states = [OrtModel.state_to_torch(s.past_state).tensors for s in (a, b)]
            assert states[0].keys() == states[1].keys()
            assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    counts = json.loads((simplified / lo.META_FILE).read_text())["simplified"]
    assert counts["shared_constant"] > 0 and counts["repeated_node"] > 0
    assert json.loads((plain / lo.META_FILE).read_text())["simplified"] is None
    sizes = [sum(len(g.node) for g in _graphs(onnx.load(str(d / lo.MODEL_FILE)).graph)) for d in (simplified, plain)]
    assert sizes[0] < sizes[1]



def _same_after_simplify(model: onnx.ModelProto, *feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Simplify `model` and check every output against the original's on each of `feeds`; returns the counts."""
    before = [_run(model, f) for f in feeds]
    counts = simplify(model)
    for old, f in zip(before, feeds):
        for a, b in zip(old, _run(model, f), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (f, a, b)
    return counts


def _vi(name: str, dtype: int, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def test_a_name_defined_twice_and_an_overridable_initializer_are_left_alone():
    """ONNX lets sibling branches each define `c` (here 64 and 5, beside an outer 64), and a graph input override
    an initializer of its name: renames by name must not reach either."""
    branches = {side: helper.make_graph([helper.make_node("Constant", [], ["c"], value=_const("v", value)),
                                         helper.make_node("Mod", ["n", "c"], [f"{side}_out"])],
                                        side, [], [_vi(f"{side}_out", 7, [2])])
                for side, value in (("then", 64), ("else", 5))}
    nodes = [helper.make_node("Mod", ["n", "k64"], ["m"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=branches["then"], else_branch=branches["else"])]
    graph = helper.make_graph(nodes, "g", [_vi("n", 7, [2]), _vi("flag", TensorProto.BOOL, [])],
                              [_vi("y", 7, [2]), _vi("m", 7, [2])], [_const("k64", 64)])
    n = np.array([70, 130], dtype=np.int64)
    _same_after_simplify(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                         {"n": n, "flag": np.array(False)}, {"n": n, "flag": np.array(True)})
    graph = helper.make_graph([helper.make_node("Constant", [], ["c"], value=_const("v", 64)),
                               helper.make_node("Mod", ["n", "c"], ["y"])],
                              "g", [_vi("k", 7, []), _vi("n", 7, [2])], [_vi("y", 7, [2])], [_const("k", 64)])
    counts = _same_after_simplify(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                                  {"n": n, "k": np.array(3, dtype=np.int64)}, {"n": n})
    assert counts["shared_constant"] == 0


@pytest.mark.parametrize("first_mean", ["", "mean"])
def test_repeated_nodes_with_optional_outputs_left_out(first_mean):
    """A repeat whose optional output is left out reads the earlier node's; one that needs an output the earlier
    node left out stays; an input left out ("") is never renamed."""
    x, scale = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "s"], ["y1", first_mean]),
             helper.make_node("LayerNormalization", ["x", "s"], ["y2", ""]),
             helper.make_node("LayerNormalization", ["x", "s"], ["y3", "mean3"]),
             helper.make_node("Clip", ["y2", "", "top"], ["z"])]
    outputs = [_vi("z", 1, [2, 3]), _vi("y1", 1, [2, 3]), _vi("y3", 1, [2, 3]), _vi("mean3", 1, [2, 1])]
    graph = helper.make_graph(nodes, "g", [_vi("x", 1, [2, 3])], outputs,
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.float32(0.5), "top")])
    counts = _same_after_simplify(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), {"x": x})
    assert counts["repeated_node"] == 1  # y2 reads y1 either way; y3 (an output) and mean3 stay


def test_constants_of_different_types_with_the_same_bytes_stay_apart():
    """int4 -1 and uint4 15 (and two float8 types) hold the same byte, under numpy's one void dtype."""
    for kinds, values in (((TensorProto.INT4, TensorProto.UINT4), (-1, 15)),
                          ((TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ), (1.0, 0.5))):
        tensors = [helper.make_tensor(name, kind, [1], [value])
                   for name, kind, value in zip("ab", kinds, values)]
        nodes = [helper.make_node("Cast", [name], [f"y{name}"], to=TensorProto.FLOAT) for name in "ab"]
        graph = helper.make_graph(nodes, "g", [], [_vi("ya", 1, [1]), _vi("yb", 1, [1])], tensors)
        counts = _same_after_simplify(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), {})
        assert counts["shared_constant"] == 0


def test_a_loop_body_input_hides_an_outer_constant_of_its_name():
    """The body's input `s` (1 on every pass) is not the outer `s` = Identity(0): its Slice is no no-op."""
    body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"]),
                              helper.make_node("Identity", ["s"], ["s_out"]),
                              helper.make_node("Slice", ["x", "s", "end"], ["sliced"]),
                              helper.make_node("Identity", ["sliced"], ["scan_out"])],
                             "body", [_vi("i", 7, []), _vi("cond", TensorProto.BOOL, []), _vi("s", 7, [1])],
                             [_vi("cond_out", TensorProto.BOOL, []), _vi("s_out", 7, [1]), _vi("scan_out", 7, [2])])
    nodes = [helper.make_node("Identity", ["zero"], ["s"]),
             helper.make_node("Loop", ["trip", "", "one"], ["s_final", "ys"], body=body)]
    graph = helper.make_graph(nodes, "g", [_vi("x", 7, [3])], [_vi("ys", 7, [1, 2]), _vi("s", 7, [1])],
                              [_const("zero", [0]), _const("end", [2**63 - 1]), _const("trip", 1), _const("one", [1])])
    counts = _same_after_simplify(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                                  {"x": np.array([10, 20, 30], dtype=np.int64)})
    assert counts["noop_slice"] == 0


def test_merged_unsqueeze_axes_get_a_name_of_their_own():
    """The merged axes' new initializer must not take a name in use (here `u/axes`, what it would be called), nor
    does an Unsqueeze without axes get merged."""
    nodes = [helper.make_node("Unsqueeze", ["x", "zero"], ["a"]), helper.make_node("Unsqueeze", ["a", "zero"], ["u"]),
             helper.make_node("Unsqueeze", ["x", "u/axes"], ["w"]), helper.make_node("Unsqueeze", ["x", "none"], ["v"]),
             helper.make_node("Unsqueeze", ["v", "none"], ["vv"])]
    graph = helper.make_graph(nodes, "g", [_vi("x", 7, [3])],
                              [_vi("u", 7, [1, 1, 3]), _vi("w", 7, [3, 1]), _vi("vv", 7, [3])],
                              [_const("zero", [0]), _const("u/axes", [1]), _const("none", [])])
    counts = _same_after_simplify(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                                  {"x": np.array([70, 130, 9], dtype=np.int64)})
    assert counts["unsqueeze_chain"] == 1
