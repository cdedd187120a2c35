"""The public API on the real SmolLM2-135M: exact softmax rewrite, linear-elu decoding."""
import pytest
import torch

import lincompile
from lincompile.testing.decoding import prefill_then_steps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def softmax_model(smollm2):
    return lincompile.optimize(smollm2[0], "softmax", strict=True)


@pytest.fixture(scope="module")
def elu_model(smollm2):
    return lincompile.optimize(smollm2[0], "linear-elu", strict=True)


def test_softmax_rewrite_reproduces_logits_with_padding(smollm2, softmax_model, heldout_batch):
    model, _ = smollm2
    ids, mask = heldout_batch
    positions = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = softmax_model(ids, attention_mask=mask, position_ids=positions).logits
    assert len(softmax_model.rewritten) == 30
    assert (ref - got).abs()[mask.bool()].max() <= 1e-4


def test_linear_elu_is_causal(elu_model, heldout_batch):
    ids = heldout_batch[0][:1]
    changed = ids.clone()
    changed[:, 40:] = torch.flip(ids[:, 40:], dims=[1])
    with torch.no_grad():
        a, b = elu_model(ids).logits, elu_model(changed).logits
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 41:], b[:, 41:])


def test_linear_elu_prefill_then_steps_equals_full_forward(elu_model, heldout_batch):
    diff, _, state = prefill_then_steps(elu_model, heldout_batch[0][:1, :48], 32)
    assert diff <= 1e-4
    assert all(t.shape[2] == 64 for name, t in state.tensors.items() if name.endswith(".state"))


def test_capture_inputs_live_on_the_models_device():
    """A model on a GPU is captured with inputs on the GPU (a device-less model gets CPU inputs)."""
    from lincompile.testing.tiny import tiny_model

    inputs = lincompile.api.example_inputs(tiny_model("llama").to("meta"))
    assert {v.device.type for v in inputs.values() if isinstance(v, torch.Tensor)} == {"meta"}
    without_parameters = lincompile.api.example_inputs(torch.nn.Identity())
    assert {v.device.type for v in without_parameters.values() if isinstance(v, torch.Tensor)} == {"cpu"}
