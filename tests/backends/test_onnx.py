"""ONNX export (standard ops, one graph for prefill/decode/chunks) and the onnxruntime runner vs the torch path."""
from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch

import lincompile
from lincompile.backends import onnx as lo
from lincompile.backends.ort import OrtModel
from lincompile.diagnostics import LincompileWarning
from lincompile.runtime.graphs import LOGITS_INDEX
from lincompile.runtime.verify import PARAMS_FILE
from lincompile.testing.tiny import perturb_new_parameters, tiny_model

#: name -> (method, layers, method of each site). "augmented" (when registered) adds every linear state part:
#: group buffers, conv window and a position counter.
CONFIGS = {"linear-elu": ("linear-elu", None, ["linear-elu"] * 2), "softmax": ("softmax", None, ["softmax"] * 2),
           "hybrid": ("linear-elu", [0], ["linear-elu", "softmax"]),
           "augmented": ("augmented", None, ["augmented"] * 2)}
TINY_ATOL = 1e-4


def _ort_shapes(state: lincompile.RecurrentState) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape()) for name, value in state.tensors.items()}


def _declared(meta: dict, batch: int, past: int = 0) -> dict[str, tuple[int, ...]]:
    return {name: tuple(batch if d == "batch" else past if isinstance(d, str) else d for d in info["shape"])
            for name, info in meta["state"].items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    """(config name, LinearizedModel, export dir, OrtModel) for each tiny llama configuration."""
    method, layers, _ = CONFIGS[request.param]
    model = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), method, layers=layers))
    opset = 18 if request.param == "hybrid" else None  # the lowest opset allowed, once; else torch's default
    out = lo.export_onnx(model, tmp_path_factory.mktemp(request.param) / "export", opset=opset)
    return request.param, model, out, OrtModel.from_dir(out, providers=["CPUExecutionProvider"])


def test_export_is_checked_standard_onnx_with_its_interface(exported):
    name, model, out, _ = exported
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [lo.META_FILE, lo.MODEL_FILE, PARAMS_FILE])
    onnx.checker.check_model(str(out / lo.MODEL_FILE), full_check=True)
    proto = onnx.load(str(out / lo.MODEL_FILE))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"} and not proto.functions
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 18 if name == "hybrid" else opset >= 18
    assert [i.name for i in proto.graph.input] == [*model.input_names, LOGITS_INDEX]  # the tokens to score
    assert [o.name for o in proto.graph.output] == model.output_names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["input_ids"] == dims["attention_mask"] == dims["position_ids"] == ["batch", "seq"]
    assert dims[LOGITS_INDEX] == ["keep"]
    meta = json.loads((out / lo.META_FILE).read_text())
    assert meta["input_names"] == [*model.input_names, LOGITS_INDEX] and meta["output_names"] == model.output_names
    assert list(meta["state"]) == model.state_inputs and meta["dtype"] == "float32"
    assert [s["layer"] for s in meta["sites"]] == [0, 1]
    expected_methods = CONFIGS[name][2]
    assert [s["method"] for s in meta["sites"]] == expected_methods
    assert set(meta["methods"]) == set(expected_methods)
    einsums = [n for n in proto.graph.node if n.op_type == "Einsum"]
    assert meta["einsum"]["left"] == len(einsums) == 0 and meta["einsum"]["lowered_to_matmul"] > 0
    initial = {k: tuple(v.shape) for k, v in model.initial_state(3).tensors.items()}
    assert _declared(meta, batch=3) == initial
    for state_name, info in meta["state"].items():
        assert info["shape"][0] == "batch"
        site = meta["sites"][int(state_name.split(".")[1])]
        assert ("past_seq" in info["shape"]) == (site["method"] == "softmax"), (state_name, info)


def test_ort_matches_torch_prefill_decode_and_chunk(exported):
    _, model, _, ort_model = exported
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    with torch.no_grad():
        ref, got = model(ids, mask), ort_model(ids, mask)
        torch.testing.assert_close(got.logits, ref.logits, atol=TINY_ATOL, rtol=0)
        for _ in range(4):
            token = ref.logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(got.logits[:, -1].argmax(-1, keepdim=True), token)
            ref, got = model(token, past_state=ref.past_state), ort_model(token, past_state=got.past_state)
            assert got.logits.shape == (2, 1, 128)
            torch.testing.assert_close(got.logits, ref.logits, atol=TINY_ATOL, rtol=0)
        chunk = torch.randint(3, 128, (2, 3), generator=gen)
        ref, got = model(chunk, past_state=ref.past_state), ort_model(chunk, past_state=got.past_state)
    torch.testing.assert_close(got.logits, ref.logits, atol=TINY_ATOL, rtol=0)
    assert torch.equal(got.logits.argmax(-1), ref.logits.argmax(-1))
    assert got.past_state.length == ref.past_state.length == 15
    state = OrtModel.state_to_torch(got.past_state)
    assert state.tensors.keys() == ref.past_state.tensors.keys()
    for name, value in state.tensors.items():
        torch.testing.assert_close(value, ref.past_state.tensors[name], atol=TINY_ATOL, rtol=1e-5, msg=name)


def test_ort_accepts_a_torch_state_and_explicit_position_ids(exported):
    _, model, _, ort_model = exported
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids[:, :4])
        ref_next = model(ids[:, 4:], past_state=ref.past_state)
    got = ort_model(ids[:, 4:], past_state=ref.past_state, position_ids=torch.tensor([[4, 5]]))
    torch.testing.assert_close(got.logits, ref_next.logits, atol=TINY_ATOL, rtol=0)


def test_generate_is_greedy_decoding_of_the_torch_path(exported):
    _, model, _, ort_model = exported
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = [ids]
    with torch.no_grad():
        out = model(ids)
        for _ in range(6):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            expected.append(token)
            out = model(token, past_state=out.past_state)
    assert torch.equal(ort_model.generate(ids, max_new_tokens=6, eos_token_id=None), torch.cat(expected, 1))
    eos = int(expected[2][0, 0])
    stopped = ort_model.generate(ids[:1], max_new_tokens=6, eos_token_id=eos)
    assert stopped.shape[1] <= 5 + 2 and int(stopped[0, -1]) == eos


def test_a_left_padded_batch_generates_as_in_torch(exported):
    """Rows 3 positions apart after a left-padded prompt: torch decodes them through `decode.step`'s per-row form,
    onnxruntime through the exported graph; the same tokens."""
    _, model, _, ort_model = exported
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(ort_model.generate(ids, max_new_tokens=6, attention_mask=mask), want)


def test_linear_state_shapes_do_not_grow_with_context(exported):
    name, model, out, ort_model = exported
    meta = json.loads((out / lo.META_FILE).read_text())
    shapes = {}
    for tokens in (8, 64):  # 64: a full group (G = 64) folds into the state, then a step starts the next
        ids = torch.randint(3, 128, (2, tokens), generator=torch.Generator().manual_seed(tokens))
        got = ort_model(ids)
        shapes[tokens] = _ort_shapes(got.past_state)
        assert shapes[tokens] == _declared(meta, batch=2, past=tokens)
        with torch.no_grad():
            ref = model(ids)
            torch.testing.assert_close(got.logits, ref.logits, atol=TINY_ATOL, rtol=0)
            token = ref.logits[:, -1:].argmax(-1)
            step = ort_model(token, past_state=got.past_state)
            torch.testing.assert_close(step.logits, model(token, past_state=ref.past_state).logits,
                                       atol=TINY_ATOL, rtol=0)
        assert _ort_shapes(step.past_state) == _declared(meta, batch=2, past=tokens + 1)
    if "softmax" not in CONFIGS[name][2]:
        assert shapes[8] == shapes[64]
    else:  # the check can fail: a softmax KV cache grows
        assert shapes[8] != shapes[64]


def test_failed_lowering_names_the_node_and_leaves_nothing(tmp_path, monkeypatch):
    from lincompile.kernels.linear_attention import reference

    original = reference.attention

    def branchy(q, *args, **kwargs):  # Python control flow on a tensor value: not exportable
        if q.sum() > 0:
            return original(q, *args, **kwargs)
        return original(-q, *args, **kwargs)

    monkeypatch.setattr(reference, "attention", branchy)
    model = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.raises(lo.OnnxLoweringError, match=r"lincompile\.attention.*model\.layers\.0\.self_attn"):
        lo.export_onnx(model, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_export_keeps_the_previous_export_intact(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / lo.META_FILE).write_text("old export")  # an earlier export: replaceable, but only whole
    written = []

    def fail_after_onnx(model, ir_model, tokenizer, opset):
        written.extend(p.name for p in tmp_path.glob(".export.*/*"))
        raise RuntimeError("disk full")

    monkeypatch.setattr(lo, "_metadata", fail_after_onnx)
    model = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.raises(RuntimeError, match="disk full"):
        lo.export_onnx(model, target)
    assert lo.MODEL_FILE in written  # the failure really was mid-export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [p.name for p in target.iterdir()] == [lo.META_FILE] and (target / lo.META_FILE).read_text() == "old export"


@pytest.mark.parametrize("opset", [17, 99])
def test_rejects_an_opset_it_cannot_write(tmp_path, opset):
    model = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with pytest.raises(ValueError, match=f"opset {opset} is outside 18"):
        lo.export_onnx(model, tmp_path / "export", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_bf16_exports_and_the_cpu_runner_says_what_to_do(tmp_path):
    model = lincompile.optimize(tiny_model("llama").to(torch.bfloat16), "augmented")
    with pytest.warns(LincompileWarning, match="CPU provider has no kernels for.*optimize the float32"):
        lo.export_onnx(model, tmp_path / "bf16")
    onnx.checker.check_model(str(tmp_path / "bf16" / lo.MODEL_FILE))
    with pytest.raises(ValueError, match="no kernels for this bfloat16 export.*float32 or float16"):
        OrtModel.from_dir(tmp_path / "bf16", providers=["CPUExecutionProvider"])


def test_an_encoder_decoder_is_refused_before_any_tracing(tmp_path):
    model = lincompile.optimize(tiny_model("t5"), "linear-elu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LincompileWarning)
        with pytest.raises(lo.OnnxLoweringError, match=r"decoder-only .* also takes \['decoder_input_ids', "
                           r"'decoder_attention_mask'\]: run it in PyTorch"):
            lo.export_onnx(model, tmp_path / "t5")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_linear_elu_onnx_matches_torch(smollm2, heldout_batch, tmp_path):
    """Export, checker, prefill 64 + 32 greedy decode steps + a 5-token chunk vs torch; state shapes at 64 and
    2048 tokens (a real 2048-token ORT prefill of random ids)."""
    model, tokenizer = smollm2
    linear = lincompile.optimize(model, "linear-elu")
    out = lo.export_onnx(linear, tmp_path / "smollm2", tokenizer=tokenizer)
    onnx.checker.check_model(str(out / lo.MODEL_FILE))
    meta = json.loads((out / lo.META_FILE).read_text())
    assert meta["tokenizer"] and len(meta["sites"]) == model.config.num_hidden_layers
    ort_model = OrtModel.from_dir(out, providers=["CPUExecutionProvider"])
    assert ort_model.tokenizer.decode(ort_model.tokenizer("hello world")["input_ids"]) == "hello world"
    # Prefill is held to 2e-3: at a handful of early positions (4 of 3.1M logits) ORT and torch differ by up
    # to 1.6e-3, the fp32 noise floor of this untrained linearization (torch fp32 itself is 0.6-1.2e-3 from
    # fp64 there; ORT with all graph optimizations off differs the same). Decode and chunk steps: 1e-3.
    ids = heldout_batch[0][:1]
    with torch.no_grad():
        ref, got = linear(ids), ort_model(ids)
        torch.testing.assert_close(got.logits, ref.logits, atol=2e-3, rtol=0)
        shapes_64 = _ort_shapes(got.past_state)
        for _ in range(32):
            token = ref.logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(got.logits[:, -1].argmax(-1, keepdim=True), token)
            ref, got = linear(token, past_state=ref.past_state), ort_model(token, past_state=got.past_state)
            torch.testing.assert_close(got.logits, ref.logits, atol=1e-3, rtol=0)
        chunk = heldout_batch[0][1:, -5:]
        ref, got = linear(chunk, past_state=ref.past_state), ort_model(chunk, past_state=got.past_state)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-3, rtol=0)
    assert torch.equal(got.logits.argmax(-1), ref.logits.argmax(-1))
    long_ids = torch.randint(0, model.config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    shapes_2048 = _ort_shapes(ort_model(long_ids).past_state)
    assert shapes_64 == shapes_2048 == _declared(meta, batch=1)
    assert shapes_64 == {k: tuple(v.shape) for k, v in ref.past_state.tensors.items()}


def test_learned_position_limit_travels_with_the_export(tmp_path):
    model = lincompile.optimize(tiny_model("gpt2"), "linear-elu")
    ort = OrtModel.from_dir(lo.export_onnx(model, tmp_path / "gpt2"), providers=["CPUExecutionProvider"])
    assert ort.meta["max_positions"] == ort.max_positions == 128
    ids = torch.randint(0, 128, (1, 128))
    state = ort(ids[:, :100]).past_state
    with pytest.raises(ValueError, match="reaches token 129, past the model's 128 learned positions"):
        ort(ids[:, :29], past_state=state)
    with pytest.raises(ValueError, match="a prompt of 120 tokens plus max_new_tokens=10 passes"):
        ort.generate(ids[:, :120], max_new_tokens=10)


def test_grouped_mm_decomposition_is_transformers_fallback():
    """Mixture-of-Experts layers call transformers' `grouped_mm_fallback` (rows sorted by expert, cumulative
    counts): its traceable form gives the same rows, with empty experts and rows past the last count (zero)."""
    import transformers.integrations.moe  # noqa: F401  (registers the op)

    g = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(9, 6, generator=g), torch.randn(4, 6, 5, generator=g)
    for offs in ([2, 2, 7, 9], [0, 3, 3, 3], [9, 9, 9, 9], [1, 4, 6, 8]):
        offs = torch.tensor(offs, dtype=torch.int32)
        want = torch.ops.transformers.grouped_mm_fallback(rows, weight, offs)
        torch.testing.assert_close(lo.DECOMPOSITIONS["transformers.grouped_mm_fallback.default"](rows, weight, offs),
                                   want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,impl", [("mixtral", "sdpa"), ("gpt_oss", "eager")])
def test_mixture_of_experts_models_export(family, impl, tmp_path):
    """Mixtral's and GPT-OSS's experts (a transformers grouped matmul) lower to standard ops: the exact rewrite's
    export computes the original model's logits (GPT-OSS's with its attention sinks, recorded per site)."""
    from lincompile.testing.families import family_model

    hf = family_model(family, impl)
    exact = lincompile.optimize(hf, "softmax")
    ort = OrtModel.from_dir(exact.export_onnx(str(tmp_path / family)), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ort(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert [s["sinks"] is not None for s in ort.meta["sites"]] == [family == "gpt_oss"] * 2


@pytest.mark.parametrize("family", ["xglm", "openai-gpt"])
def test_families_with_merged_heads_or_a_multiplied_mask_export_and_decode(family, tmp_path):
    """XGLM (heads merged, sinusoidal positions) and OpenAI GPT (a multiplied 0/1 mask): `augmented` exported to
    ONNX prefills and decodes in onnxruntime as in torch (`bench/families.py --onnx` checks every family)."""
    from lincompile.testing.families import check_family

    row = check_family(family, "eager", str(tmp_path / family))
    assert row["sites"] == row["layers"] and row["onnx_rel"] <= 1e-5
