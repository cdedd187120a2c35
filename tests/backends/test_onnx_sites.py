"""Splicing one export per distinct attention site gives the same ONNX model as tracing the whole graph."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

import lincompile
from lincompile.backends import onnx as lo
from lincompile.backends import onnx_sites
from lincompile.backends.ort import OrtModel
from lincompile.testing.tiny import perturb_new_parameters, tiny_model


def _run(out, ids, mask, steps=3):
    """Prefill then greedy steps through onnxruntime: the logits of every call."""
    ort_model = OrtModel.from_dir(out, providers=["CPUExecutionProvider"])
    got = ort_model(ids, mask)
    logits = [got.logits]
    for _ in range(steps):
        got = ort_model(got.logits[:, -1:].argmax(-1), past_state=got.past_state)
        logits.append(got.logits)
    return logits


@pytest.mark.parametrize("method,layers,spliced", [("augmented", None, 2), ("linear-elu", [1], 1)])
def test_spliced_export_equals_the_whole_graph_export(tmp_path, method, layers, spliced):
    """Same interface and metadata, same outputs bit for bit (prefill with padding, then decode) without the decode
    step's own form, and to rounding with it (the default); a softmax site (KV cache: sizes tied across the cut)
    stays in the outer graph. (The node lists differ a little: size arithmetic at the cut is traced on each side
    of it.)"""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), method, layers=layers))
    split = lo.export_onnx(model, tmp_path / "split", decode_step=False)
    whole = lo.export_onnx(model, tmp_path / "whole", split_sites=False)
    stepped = lo.export_onnx(model, tmp_path / "stepped")
    metas = [json.loads((d / lo.META_FILE).read_text()) for d in (split, whole)]
    assert (metas[0]["sites_spliced"], metas[1]["sites_spliced"]) == (spliced, 0)
    for key in ("input_names", "output_names", "inputs", "outputs", "state", "sites"):
        assert metas[0][key] == metas[1][key], key
    onnx.checker.check_model(str(split / lo.MODEL_FILE), full_check=True)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for a, b, c in zip(_run(split, ids, mask), _run(whole, ids, mask), _run(stepped, ids, mask), strict=True):
        assert torch.equal(a, b) and torch.allclose(c, b, atol=1e-5)


def test_a_template_that_cannot_be_spliced_exports_whole(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise onnx_sites.SpliceError("no")

    monkeypatch.setattr(onnx_sites, "splice", refuse)
    model = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.warns(UserWarning, match="tracing the whole graph instead .*skip the decode step's own form"):
        out = lo.export_onnx(model, tmp_path / "export")
    assert json.loads((out / lo.META_FILE).read_text())["sites_spliced"] == 0
    onnx.checker.check_model(str(out / lo.MODEL_FILE))


def test_toposort_orders_spliced_nodes_and_rejects_dangling_reads():
    from onnx import helper

    nodes = [helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Relu", ["a"], ["b"])]
    assert [n.output[0] for n in onnx_sites._toposort(nodes, {"a"})] == ["b", "c"]
    with pytest.raises(onnx_sites.SpliceError, match="nothing produces"):
        onnx_sites._toposort(nodes, set())
    with pytest.raises(onnx_sites.SpliceError, match="cycle"):
        onnx_sites._toposort([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["x"])], set())


@pytest.mark.parametrize("split_sites", [True, False])
def test_export_retried_with_dynamic_dims_has_the_same_interface(tmp_path, request, split_sites):
    """torch 2.11 refuses named dims for a GQA model; `export_dynamic`'s retry names no dim, so the interface's
    names (batch, seq, past_seq) come from the declared axes: the same metadata, the same outputs. The hybrid
    (a softmax site keeps its KV cache in the outer graph) cuts the most dims across the splice."""
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "linear-elu", layers=[1]))
    expected = lo.export_onnx(model, tmp_path / "named", split_sites=split_sites)
    calls = request.getfixturevalue("refuse_named_dims")
    retried = lo.export_onnx(model, tmp_path / "retried", split_sites=split_sites)
    assert "retried" in calls and "other" not in calls and calls.count("refused") == calls.count("retried")
    metas = [json.loads((d / lo.META_FILE).read_text()) for d in (expected, retried)]
    for key in ("input_names", "output_names", "inputs", "outputs", "state", "sites"):
        assert metas[0][key] == metas[1][key], key
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    for a, b in zip(_run(expected, ids, torch.ones_like(ids)), _run(retried, ids, torch.ones_like(ids)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
