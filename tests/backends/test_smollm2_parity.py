"""Issue 5 parity on the real SmolLM2 (slow): the backends against `optimize`, held to the fp32 noise floor.

A linearized but untrained SmolLM2 amplifies fp32 rounding: with the paper's augmented method its eager fp32
logits are ~6e-4 from an fp64 run of the same graph (the original model: ~5e-5), so any reordering of fp32 sums
(Inductor's fusion, onnxruntime's kernels) moves logits by that much. Measured here: Inductor vs `optimize`
2.6e-4 (augmented; 5.5e-5 for plain Inductor on the original model), onnxruntime vs torch at most 7.9e-4 in
prefill, 9.4e-4 over 32 decode steps, 4.0e-4 for a 5-token chunk. So a linear method is held to: no further
from the fp64 reference than the torch fp32 path is (x2), and the same greedy tokens; the exact softmax
rewrite, whose floor is the original model's, is held to the literal 1e-4.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lincompile
from lincompile.backends import onnx as lo
from lincompile.backends import torch_compile as tcb
from lincompile.backends.ort import OrtModel

pytestmark = pytest.mark.slow
METHOD = "augmented"


def _error(logits: torch.Tensor, exact: torch.Tensor) -> float:
    return (logits.double() - exact).abs().max().item()


@pytest.fixture(scope="module")
def linear(smollm2):
    return lincompile.optimize(smollm2[0], METHOD)


@pytest.fixture(scope="module")
def exact(smollm2):
    """The same linearization of an fp64 copy (the new parameters are seeded, so they are equal)."""
    return lincompile.optimize(copy.deepcopy(smollm2[0]).double(), METHOD)


def _compiled_logits(model: torch.nn.Module, ids: torch.Tensor, method: str) -> torch.Tensor:
    torch._dynamo.reset()
    tcb.clear_reports()
    compiled = torch.compile(model, backend="lincompile", options={"method": method})
    with torch.no_grad():
        logits = compiled(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    [report] = tcb.reports()  # one graph
    assert report.attention_ops == model.config.num_hidden_layers
    return logits


def test_softmax_rewrite_under_inductor_matches_optimize(smollm2, heldout_batch):
    model, _ = smollm2
    ids = heldout_batch[0][:1, :32]
    logits = _compiled_logits(model, ids, "softmax")
    with torch.no_grad():
        expected = lincompile.optimize(model, "softmax")(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_linear_method_under_inductor_is_as_close_to_fp64_as_eager(smollm2, heldout_batch, linear, exact):
    model, _ = smollm2
    ids = heldout_batch[0][:1, :32]
    logits = _compiled_logits(model, ids, METHOD)
    with torch.no_grad():
        eager, reference = linear(ids).logits, exact(ids).logits
    assert _error(logits, reference) <= 2 * _error(eager, reference) + 1e-5
    assert torch.equal(logits.argmax(-1), eager.argmax(-1))


def test_onnxruntime_prefill_decode_chunk_are_as_close_to_fp64_as_torch(heldout_batch, linear, exact, tmp_path):
    """Prefill 64 tokens, 32 greedy decode steps, one 5-token chunk: ORT, torch fp32 and fp64 in lockstep; the same
    greedy token at every step, and over the run ORT no further from fp64 than torch fp32 is (x2). (Per step the
    bound is noise against noise: torch's fp32 error dips to 6e-5 on a step where ORT's is 4e-4, and which steps
    dip depends on how each form orders its fp32 sums.)"""
    ort_model = OrtModel.from_dir(lo.export_onnx(linear, tmp_path / "onnx"), providers=["CPUExecutionProvider"])
    ids = heldout_batch[0][:1]
    calls = [ids] + [None] * 32 + [heldout_batch[0][1:, -5:]]  # None: the torch path's greedy token
    got = ref = best = None
    errors = []  # (ORT's, torch's) largest difference from fp64, per call

    def state(out: object) -> object:
        return None if out is None else out.past_state

    with torch.no_grad():
        for tokens in calls:
            if tokens is None:
                tokens = ref.logits[:, -1:].argmax(-1)
            got, ref = ort_model(tokens, past_state=state(got)), linear(tokens, past_state=state(ref))
            best = exact(tokens, past_state=state(best))
            reference = best.logits
            assert torch.equal(got.logits.argmax(-1), ref.logits.argmax(-1))
            errors.append((_error(got.logits, reference), _error(ref.logits, reference)))
            torch.testing.assert_close(got.logits, ref.logits, atol=2e-3, rtol=0)
    ort_error, torch_error = (max(e) for e in zip(*errors))
    assert ort_error <= 2 * torch_error + 1e-4, errors
