"""Chunked prefill equals one call over the whole prompt (logits and state), for torch and onnxruntime."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import lincompile
from lincompile.backends.ort import OrtModel
from lincompile.runtime.prefill import prefill
from lincompile.runtime.state import mask_positions
from lincompile.testing.tiny import perturb_new_parameters, tiny_model

#: name -> (method, layers): the paper's augmented form everywhere, and a hybrid whose layer 1 stays exact
#: softmax (a KV-cache site whose state grows with each chunk).
CONFIGS = {"augmented": ("augmented", None), "hybrid": ("augmented", [0])}
TOKENS = 150  # crosses two groups (G = 64) and the conv window (31)
CHUNKS = [1, 7, 64, 100, 149, 150, 512]  # 7, 100, 149 do not divide TOKENS
FP32_ATOL = 1e-5


def _perturbed(method: str, layers: list[int] | None) -> lincompile.LinearizedModel:
    """A tiny llama linearized; the new parameters (alpha, conv taps start at zero) moved so every branch counts."""
    return perturb_new_parameters(lincompile.optimize(tiny_model("llama"), method, layers=layers))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return _perturbed(*CONFIGS[request.param])


@pytest.fixture(scope="module")
def batch():
    """Two rows of TOKENS ids; the second is left-padded on its first 70 tokens (a whole chunk of 64 and more)."""
    ids = torch.randint(3, 128, (2, TOKENS), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :70] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _max_state_diff(a: lincompile.RecurrentState, b: lincompile.RecurrentState) -> float:
    assert a.shapes() == b.shapes() and a.length == b.length
    return max((a.tensors[n].double() - b.tensors[n].double()).abs().nan_to_num(nan=math.inf).max().item()
               for n in a.tensors)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_prefill_equals_one_call(model, batch, chunk):
    ids, mask = batch
    whole = prefill(model, ids, mask, chunk_size=None, all_logits=True)
    got = prefill(model, ids, mask, chunk_size=chunk)
    assert got.logits.shape == (2, 128)
    torch.testing.assert_close(got.logits, whole.logits[:, -1], atol=FP32_ATOL, rtol=0)
    assert _max_state_diff(got.state, whole.state) <= FP32_ATOL
    assert torch.equal(got.next_position_ids, torch.tensor([[TOKENS], [TOKENS - 70]]))
    every = prefill(model, ids, mask, chunk_size=chunk, all_logits=True)
    real = mask.bool()  # padding queries see no key: their logits are not meaningful
    torch.testing.assert_close(every.logits[real], whole.logits[real], atol=FP32_ATOL, rtol=0)


def test_one_call_prefill_is_the_model_forward(model, batch):
    """Bit for bit the forward asked for the last token's logits (as prefill asks); within rounding its last row of
    every token's (the LM head's product over one row rounds differently)."""
    ids, mask = batch
    with torch.no_grad():
        last = model(ids, attention_mask=mask, position_ids=mask_positions(mask), logits_to_keep=1)
        every = model(ids, attention_mask=mask, position_ids=mask_positions(mask))
    got = prefill(model, ids, mask, chunk_size=None)
    assert torch.equal(got.logits, last.logits[:, -1])
    torch.testing.assert_close(got.logits, every.logits[:, -1], atol=FP32_ATOL, rtol=0)


def test_prefill_continues_a_state(model, batch):
    """Prefill of a prefix, then of the rest from its state (positions carried over), equals one prefill."""
    ids, mask = batch
    whole = prefill(model, ids, mask, chunk_size=None)
    head = prefill(model, ids[:, :90], mask[:, :90], chunk_size=32)
    rest = head.next_position_ids + torch.arange(TOKENS - 90)
    tail = prefill(model, ids[:, 90:], mask[:, 90:], position_ids=rest, past_state=head.state, chunk_size=25)
    torch.testing.assert_close(tail.logits, whole.logits, atol=FP32_ATOL, rtol=0)
    assert _max_state_diff(tail.state, whole.state) <= FP32_ATOL


def test_prefill_in_float64_is_exact_algebra():
    model = lincompile.optimize(tiny_model("llama").double(), "augmented")
    ids = torch.randint(3, 128, (1, 130), generator=torch.Generator().manual_seed(2))
    whole = prefill(model, ids, chunk_size=None)
    got = prefill(model, ids, chunk_size=45)
    torch.testing.assert_close(got.logits, whole.logits, atol=1e-12, rtol=0)
    assert _max_state_diff(got.state, whole.state) <= 1e-12


def test_generate_does_not_depend_on_the_prefill_chunk(model, batch):
    ids, mask = batch
    whole = model.generate(ids, 5, attention_mask=mask, prefill_chunk_size=None)
    assert torch.equal(model.generate(ids, 5, attention_mask=mask, prefill_chunk_size=33), whole)


def test_onnxruntime_chunked_prefill_equals_torch(batch, tmp_path):
    """The OrtModel chains its state (OrtValues) through chunks as the torch model does."""
    model = _perturbed("augmented", None)
    ort_model = OrtModel.from_dir(model.export_onnx(str(tmp_path / "onnx")), providers=["CPUExecutionProvider"])
    ids, mask = batch
    ref = prefill(model, ids, mask, chunk_size=None)
    for chunk in (40, 150):
        got = prefill(ort_model, ids, mask, chunk_size=chunk)
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=0)
        assert _max_state_diff(OrtModel.state_to_torch(got.state), ref.state) <= 1e-4
    assert torch.equal(ort_model.generate(ids, 4, attention_mask=mask), model.generate(ids, 4, attention_mask=mask))


def test_auto_chunk_size_is_the_models_own():
    """"auto" (the default) takes the model's `prefill_chunk_size` when it names one, else 512 tokens per call."""
    calls = []

    class Counted:
        def __init__(self, chunk=None):
            if chunk is not None:
                self.prefill_chunk_size = chunk

        def __call__(self, input_ids, **kwargs):
            calls.append(input_ids.shape[1])
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5), past_state=object())

    ids = torch.ones(2, 600, dtype=torch.long)
    prefill(Counted(250), ids)
    assert calls == [250, 250, 100]
    calls.clear()
    prefill(Counted(), ids)
    assert calls == [512, 88]


@pytest.mark.parametrize("kwargs,match", [({"chunk_size": 0}, "chunk_size"), ({"chunk_size": "big"}, "or None"),
                                          ({"attention_mask": torch.ones(2, 3)}, "attention_mask"),
                                          ({"position_ids": torch.zeros(2, 3)}, "position_ids")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefill(lambda *a, **k: None, torch.ones(2, 4, dtype=torch.long), **kwargs)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, fp64), the measure of DESIGN.md section 8."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.slow
def test_smollm2_chunked_prefill_equals_one_call(smollm2):
    """Real activations reach large magnitudes (the state's S sums many k v^T), so errors are relative here."""
    model = lincompile.optimize(smollm2[0], "augmented")
    ids = torch.randint(3, 49152, (1, 300), generator=torch.Generator().manual_seed(3))
    whole = prefill(model, ids, chunk_size=None)
    got = prefill(model, ids, chunk_size=128)
    assert _relative(got.logits, whole.logits) <= 1e-5
    for name, value in whole.state.tensors.items():
        if value.is_floating_point():
            assert _relative(got.state.tensors[name], value) <= 1e-5, name
        else:
            assert torch.equal(got.state.tensors[name], value), name
