"""Calls longer than the chunk size run in chunks inside the ONNX graph (`onnx_chunks`): one site against the
reference, and whole exports against the torch model and the export without chunks."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lincompile
from lincompile.backends import onnx as lo
from lincompile.backends import onnx_chunks, onnx_sites
from lincompile.backends.ort import OrtModel
from lincompile.kernels.linear_attention import reference
from lincompile.methods.spec import MethodSpec
from lincompile.testing.kernels import rel, state_rel
from lincompile.testing.tiny import perturb_new_parameters, tiny_model

from .conftest import CAPPED, B, D, H, HKV, renamed, site_template

CHUNK = 8
#: every state part and weighting: groups + conv + position counter, normalizer, decay, learned features,
#: the local branch alone, position-dependent features, the global cap
METHODS = ["augmented", "linear-elu", "retnet", "hedgehog", "local", "cosformer", CAPPED]


def _site_session(method: str | MethodSpec, with_mask: bool):
    """An onnxruntime session of one spliced site (chunked every CHUNK tokens) and its spec and params."""
    import onnxruntime as ort

    template, spec, params, state = site_template(method, CHUNK)
    proto = lo.export_template(template, "test site", torch.export.Dim("batch"), torch.export.Dim("seq"), None)
    names = [i.name for i in proto.graph.input]
    rename = {name: f"param{i}" for i, name in enumerate(names[4 + len(state):])}
    rename.update({init.name: f"t/{init.name}" for init in proto.graph.initializer})
    args = ["q", "k", "v", "mask" if with_mask else ""] + [f"state{j}" for j in range(len(state))]
    nodes = []
    if not with_mask:
        nodes, args[3] = onnx_chunks.all_true_mask("q", "site/all_true/")  # as `onnx_sites.splice` names it
    results = ["out"] + [f"new{j}" for j in range(len(state))]
    nodes += onnx_chunks.chunked_site(proto.graph, args, rename, results, "site/", CHUNK)

    inputs = [renamed(proto.graph.input[i], name) for i, name in enumerate(["q", "k", "v", "mask"][:3 + with_mask])]
    inputs += [renamed(proto.graph.input[4 + j], f"state{j}") for j in range(len(state))]
    outputs = [renamed(o, name) for o, name in zip(proto.graph.output, results)]
    inits = [numpy_helper.from_array(p.numpy(), f"param{i}") for i, p in enumerate(params)]
    inits += [renamed(init, f"t/{init.name}") for init in proto.graph.initializer]
    model = helper.make_model(helper.make_graph(nodes, "site", inputs, outputs, initializer=inits),
                              opset_imports=proto.opset_import)
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), spec, params


@pytest.mark.parametrize("method", METHODS, ids=lambda m: getattr(m, "name", m))
def test_a_chunked_site_matches_the_reference(method):
    """Fresh random inputs, GQA, B > 1 with a left-padded row, a non-initial state, T from 1 (decode) through the
    chunk size to past it by a remainder; the output and every state part against the reference (the chunked
    form the torch path takes past the chunk size, and the parallel form)."""
    session, spec, params = _site_session(method, with_mask=True)
    gen = torch.Generator().manual_seed(METHODS.index(method))
    _, state = reference.attention(*(torch.randn(B, h, 11, D, generator=gen) for h in (H, HKV, HKV)), None, None,
                                   [], params, spec, D ** -0.5, True)
    for t in (1, 3, CHUNK, CHUNK + 1, 3 * CHUNK + 5):
        q, k, v = (torch.randn(B, h, t, D, generator=gen) for h in (H, HKV, HKV))
        mask = torch.ones(B, t, dtype=torch.bool)
        mask[1, :min(2, t - 1)] = False
        feed = {"q": q, "k": k, "v": v, "mask": mask, **{f"state{j}": s for j, s in enumerate(state)}}
        out, *new = session.run(None, {name: value.numpy() for name, value in feed.items()})
        args = (q, k, v, mask, None, list(state), params, spec, D ** -0.5, True)
        ref, ref_state = reference.chunked(*args, chunk_size=CHUNK)
        assert rel(torch.from_numpy(out), ref) <= 1e-5, t
        assert state_rel([torch.from_numpy(x) for x in new], ref_state) <= 1e-5, t
        parallel, _ = reference.attention(*args)
        assert rel(torch.from_numpy(out), parallel) <= 1e-5, t
        state = [torch.from_numpy(x) for x in new]


def test_a_site_without_a_key_mask_reads_every_token():
    session, spec, params = _site_session("augmented", with_mask=False)
    gen = torch.Generator().manual_seed(3)
    for t in (1, 2 * CHUNK + 3):
        q, k, v = (torch.randn(B, h, t, D, generator=gen) for h in (H, HKV, HKV))
        state = reference.init_state(spec, B, HKV, D, D)
        feed = {"q": q, "k": k, "v": v, **{f"state{j}": s for j, s in enumerate(state)}}
        out, *new = session.run(None, {name: value.numpy() for name, value in feed.items()})
        ref, ref_state = reference.attention(q, k, v, None, None, state, params, spec, D ** -0.5, True)
        assert rel(torch.from_numpy(out), ref) <= 1e-5
        assert state_rel([torch.from_numpy(x) for x in new], ref_state) <= 1e-5


def test_implicit_inputs_are_the_outer_values_subgraphs_read():
    inner = helper.make_graph([helper.make_node("Add", ["a", "x"], ["y"])], "inner",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    branch = helper.make_graph([helper.make_node("Scan", ["s", "xs"], ["t", "ys"], body=inner, num_scan_inputs=1),
                                helper.make_node("Identity", ["b"], ["c"])], "branch", [],
                               [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)
    assert onnx_chunks.implicit_inputs(node) == {"a", "s", "xs", "b"}
    assert onnx_chunks.implicit_inputs(helper.make_node("Relu", ["a"], ["b"])) == set()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny augmented llama exported with chunks of 4 tokens and without."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented"))
    root = tmp_path_factory.mktemp("chunks")
    return model, lo.export_onnx(model, root / "chunked", chunk_size=4), lo.export_onnx(model, root / "whole")


def test_a_chunked_export_matches_torch_and_the_export_without_chunks(exports):
    """Prefill past the chunk size with a left-padded row, a second long call from that state, then decode;
    einsums in the subgraphs are lowered too."""
    model, chunked, whole = exports
    meta = json.loads((chunked / lo.META_FILE).read_text())
    assert (meta["chunk_size"], meta["chunked_sites"], meta["einsum"]["left"]) == (4, 2, 0)
    assert json.loads((whole / lo.META_FILE).read_text())["chunk_size"] is None
    runners = [OrtModel.from_dir(d, providers=["CPUExecutionProvider"]) for d in (chunked, whole)]
    assert [r.prefill_chunk_size for r in runners] == [512, 128]
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    outs = [[r(ids[:, :10], mask[:, :10])] for r in runners]
    for out, runner in zip(outs, runners):
        out.append(runner(ids[:, 10:], mask[:, 10:], past_state=out[0].past_state))
        out.append(runner(ids[:, -1:], past_state=out[1].past_state))
    for got in (outs[0], outs[1]):
        assert torch.allclose(torch.cat([got[0].logits, got[1].logits], 1), expected, atol=1e-5)
    for a, b in zip(outs[0], outs[1]):
        assert torch.allclose(a.logits, b.logits, atol=1e-5)


def _assert_same_logits(model, export):
    """The export's logits on a batch of 11 tokens (past the chunk size) are the torch graph's."""
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
    got = OrtModel.from_dir(export, providers=["CPUExecutionProvider"])(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_site_without_a_key_mask_exports_chunked(tmp_path):
    """Sites whose graph passes no key mask (every key real) get an all-True one in the export: the same logits
    as the torch graph on a call past the chunk size."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented"))
    for node in model.graph.graph.nodes:
        if node.target is onnx_sites.ATTENTION:
            node.args = (*node.args[:3], None, *node.args[4:])
    model.graph.recompile()
    out = lo.export_onnx(model, tmp_path / "export", chunk_size=4)
    _assert_same_logits(model, out)


@pytest.mark.parametrize("chunk_size", [0, 16.5, "64", True])
def test_chunk_size_must_be_a_positive_integer(tmp_path, chunk_size):
    model = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        lo.export_onnx(model, tmp_path / "out", chunk_size=chunk_size)
    assert not (tmp_path / "out").exists()


def test_a_chunk_size_that_chunks_nothing_is_reported(tmp_path):
    """Softmax sites keep their KV cache, and split_sites=False traces calls in one piece: a warning says so and the
    metadata records no chunking."""
    softmax = lincompile.optimize(tiny_model("llama"), "softmax")
    with pytest.warns(UserWarning, match="chunks nothing: the model has no causal linear attention site"):
        out = lo.export_onnx(softmax, tmp_path / "softmax", chunk_size=16)
    assert json.loads((out / lo.META_FILE).read_text())["chunk_size"] is None
    linear = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.warns(UserWarning, match="chunks nothing: split_sites=False"):
        lo.export_onnx(linear, tmp_path / "whole", chunk_size=16, split_sites=False)


def test_a_centered_conv_is_not_cut_into_chunks(tmp_path):
    """A centered conv looks ahead (non-causal, so no state either): cutting its calls into chunks would cut the
    look-ahead at every chunk's end, so the export takes them whole and gives the torch graph's logits."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented-centered"))
    with pytest.warns(UserWarning, match="chunks nothing: .*a centered conv looks ahead"):
        out = lo.export_onnx(model, tmp_path / "export", chunk_size=4)
    _assert_same_logits(model, out)


def test_hoist_static_moves_what_reads_only_sizes_and_parameters():
    """Out of a branch go a Shape of a site input (reading the same-shaped input named in `sizes`) and arithmetic
    on parameters; what reads a site value, a Shape of a branch value or of an input not in `sizes`, a node with a
    subgraph and a node making a branch result stay, in order."""
    branch = helper.make_graph([helper.make_node("Identity", ["q"], ["inner"])], "b", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Shape", ["q"], ["size"], name="size"),
             helper.make_node("ReduceL2", ["param"], ["norm"], name="norm"),
             helper.make_node("Mul", ["q", "norm"], ["scaled"], name="scaled"),
             helper.make_node("Shape", ["scaled"], ["scaled_size"], name="scaled_size"),
             helper.make_node("Shape", ["k"], ["k_size"], name="k_size"),
             helper.make_node("Reshape", ["scaled", "size"], ["out"], name="out"),
             helper.make_node("Identity", ["norm"], ["result"], name="result"),
             helper.make_node("If", ["cond"], ["chosen"], name="chosen", then_branch=branch, else_branch=branch)]
    hoisted, kept = onnx_chunks.hoist_static(nodes, ["q", "k"], ["out", "result"], {"q": "first_q"})
    assert [n.name for n in hoisted] == ["size", "norm"]
    assert [n.name for n in kept] == ["scaled", "scaled_size", "k_size", "out", "result", "chosen"]
    assert list(hoisted[0].input) == ["first_q"]
