"""One-token calls of a causal linear site run its recurrent form inside the ONNX graph (`onnx_step`): one spliced
site against the reference, and whole exports against torch and the export without it."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lincompile
from lincompile.backends import onnx as lo
from lincompile.backends import onnx_chunks, onnx_step
from lincompile.backends.ort import OrtModel
from lincompile.kernels.linear_attention import reference
from lincompile.methods.spec import MethodSpec, get_method
from lincompile.testing.kernels import rel, state_rel
from lincompile.testing.tiny import perturb_new_parameters, tiny_model

from .conftest import CAPPED, B, D, H, HKV, renamed, site_template
#: groups + conv + position counter, normalizer, decay, learned features, the local branch alone, positions,
#: the global cap
METHODS = ["augmented", "linear-elu", "retnet", "hedgehog", "local", "cosformer", CAPPED]


def _site_session(method: str | MethodSpec):
    """An onnxruntime session of one site spliced as `onnx_sites.splice` does with a step form (inputs input_ids,
    only its length read, q, k, v, mask and the state), the spec and the params."""
    import onnxruntime as ort

    template, spec, params, state = site_template(method)
    dims = torch.export.Dim("batch"), torch.export.Dim("seq")
    protos = [lo.export_template(template, "test site", *dims, None, step=s) for s in (False, True)]
    general, step = (proto.graph for proto in protos)
    names = [i.name for i in general.input]
    params_rename = {name: f"param{i}" for i, name in enumerate(names[4 + len(state):])}
    args = ["q", "k", "v", "mask"] + [f"state{j}" for j in range(len(state))]
    results = ["out"] + [f"new{j}" for j in range(len(state))]
    inner = [f"site/general/{o.name}" for o in general.output]
    rename = dict(params_rename, **{init.name: f"t/{init.name}" for init in general.initializer})
    rename.update(zip(names, args))
    rename.update(zip((o.name for o in general.output), inner))
    nodes, condition = onnx_step.one_token("input_ids", "step_cond/")
    step_rename = dict(params_rename, **{init.name: f"s/{init.name}" for init in step.initializer})
    nodes += onnx_step.step_site(step, onnx_chunks.copy_nodes(general.node, rename, "site/"), inner, args,
                                 step_rename, results, "site/", condition, {arg: arg for arg in args})
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [renamed(general.input[i], name) for i, name in enumerate(args)]
    outputs = [renamed(o, name) for o, name in zip(general.output, results)]
    inits = [numpy_helper.from_array(p.numpy(), f"param{i}") for i, p in enumerate(params)]
    inits += [renamed(init, f"t/{init.name}") for init in general.initializer]
    inits += [renamed(init, f"s/{init.name}") for init in step.initializer]
    model = helper.make_model(helper.make_graph(nodes, "site", inputs, outputs, initializer=inits),
                              opset_imports=protos[0].opset_import)
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), spec, params


@pytest.mark.parametrize("method", METHODS, ids=lambda m: getattr(m, "name", m))
def test_a_site_with_a_step_form_matches_the_reference(method):
    """Fresh random inputs, GQA, B = 2 with the rows at different positions (row 1 left-padded by 2), then 60
    one-token calls (row 0 completes its 64-token group), one with a padding row, a 3-token call (row 1 completes
    its group) and one more token: the output and every state part against the reference."""
    session, spec, params = _site_session(method)
    gen = torch.Generator().manual_seed(METHODS.index(method))
    state = reference.init_state(spec, B, HKV, D, D)
    masks = [[[True] * 5, [False, False, True, True, True]]] + [[[True], [True]]] * 60 + [[[True], [False]]]
    masks += [[[True] * 3, [True] * 3], [[False], [True]]]
    for mask in masks:
        mask = torch.tensor(mask)
        t = mask.shape[1]
        q, k, v = (torch.randn(B, h, t, D, generator=gen) for h in (H, HKV, HKV))
        feed = {"input_ids": torch.zeros(B, t, dtype=torch.int64), "q": q, "k": k, "v": v, "mask": mask,
                **{f"state{j}": s for j, s in enumerate(state)}}
        out, *new = session.run(None, {name: value.numpy() for name, value in feed.items()})
        args = (q, k, v, mask, None, list(state), params, spec, D ** -0.5, True)
        ref, ref_state = reference.attention(*args)
        assert rel(torch.from_numpy(out), ref) <= 1e-5, mask
        assert state_rel([torch.from_numpy(x) for x in new], ref_state) <= 1e-5, mask
        state = [torch.from_numpy(x) for x in new]


def test_one_token_reads_the_call_length():
    import onnxruntime as ort

    nodes, condition = onnx_step.one_token("ids", "c/")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info(condition, TensorProto.BOOL, [])])
    session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    assert [bool(session.run(None, {"ids": torch.zeros(2, t, dtype=torch.int64).numpy()})[0]) for t in (1, 2, 7)] \
        == [True, False, False]


def test_takes_step_only_for_causal_linear_sites():
    assert onnx_step.takes_step(get_method("augmented").to_json(), True)
    assert not onnx_step.takes_step(get_method("augmented").to_json(), False)  # bidirectional
    assert not onnx_step.takes_step(get_method("softmax").to_json(), True)  # a KV cache
    assert not onnx_step.takes_step(get_method("augmented-centered").to_json(), True)  # looks ahead


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny augmented llama exported with the step form (the default), without it, and with it and chunks."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented"))
    root = tmp_path_factory.mktemp("step")
    return (model, lo.export_onnx(model, root / "step"), lo.export_onnx(model, root / "plain", decode_step=False),
            lo.export_onnx(model, root / "chunked", chunk_size=4))


def test_an_export_with_the_step_form_matches_torch_and_the_export_without(exports):
    """A left-padded prefill, then decode steps and a 3-token call across a group's end: the same logits as torch
    and as the export without the step form; with chunks in the graph too (the 3-token call takes the branch
    for calls no longer than a chunk)."""
    model, step, plain, chunked = exports
    metas = [json.loads((d / lo.META_FILE).read_text()) for d in (step, plain, chunked)]
    assert [m["decode_step_sites"] for m in metas] == [2, 0, 2]
    assert metas[2]["chunked_sites"] == 2
    runners = [OrtModel.from_dir(d, providers=["CPUExecutionProvider"]) for d in (step, plain, chunked)]
    ids = torch.randint(3, 128, (2, 72), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    for runner in runners:
        out = runner(ids[:, :60], mask[:, :60])
        logits = [out.logits]
        # the first 64-token group ends at token 63 (row 0) and 66 (row 1); a 3-token call, under the chunk size
        for start, end in [(60, 61), (61, 64)] + [(t, t + 1) for t in range(64, 72)]:
            out = runner(ids[:, start:end], mask[:, start:end], past_state=out.past_state)
            logits.append(out.logits)
        assert torch.allclose(torch.cat(logits, 1), expected, atol=1e-5)


def test_a_softmax_model_has_no_step_form(tmp_path):
    softmax = lincompile.optimize(tiny_model("llama"), "softmax")
    meta = json.loads((lo.export_onnx(softmax, tmp_path / "out") / lo.META_FILE).read_text())
    assert meta["decode_step_sites"] == 0


def test_a_step_form_that_does_not_export_is_dropped_alone(tmp_path, monkeypatch):
    """The step form is an optimization: when it cannot be traced, sites keep their split export without it."""
    def untraceable(*args, **kwargs):
        raise RuntimeError("no")

    monkeypatch.setattr(lo, "_step_decomposition", untraceable)
    model = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.warns(UserWarning, match="no decode step form"):
        out = lo.export_onnx(model, tmp_path / "out")
    meta = json.loads((out / lo.META_FILE).read_text())
    assert (meta["sites_spliced"], meta["decode_step_sites"]) == (2, 0)

