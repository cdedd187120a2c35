"""The kernel registry picks the highest-priority implementation that supports a call; the reference is last."""
import pytest
import torch

from lincompile.kernels import registry
from lincompile.kernels.linear_attention import reference
from lincompile.methods.params import random_params
from lincompile.methods.spec import get_method, methods


def test_priority_and_fallback(monkeypatch):
    monkeypatch.setattr(registry, "_ENTRIES", list(registry._ENTRIES))
    fast = registry.KernelEntry("fast-elu", registry.reference.attention,
                                lambda spec, device: spec.name == "linear-elu", priority=10)
    registry.register_kernel(fast)
    assert registry.select(get_method("linear-elu"), torch.device("cpu")).name == "fast-elu"
    assert registry.select(get_method("softmax"), torch.device("cpu")).name == "reference"
    with pytest.raises(ValueError, match="already registered"):
        registry.register_kernel(fast)


STEP_METHODS = [name for name in methods() if get_method(name).kind == "linear" and get_method(name).causal_safe]


@pytest.mark.parametrize("name", STEP_METHODS)
def test_recurrent_step_agrees_with_the_parallel_reference(name, monkeypatch):
    """`recurrent-step` serves causal linear sites on CPU; one token (real or padding) after a state that sits
    mid-group gives the parallel form's output and state, calls of up to 64 tokens are the parallel form itself,
    and longer ones the chunked form, which agrees with the parallel one."""
    monkeypatch.setenv("LINCOMPILE_KERNELS", "auto")
    spec = get_method(name)
    entry = registry.select(spec, torch.device("cpu"))
    assert entry.name == "recurrent-step"
    torch.manual_seed(hash(name) % 1000)
    batch, heads, kv_heads, dim = 2, 4, 2, 16
    params = random_params(spec, heads, kv_heads, dim, dim, seed=3)
    q = torch.randn(batch, heads, 71, dim)
    k, v = torch.randn(batch, kv_heads, 71, dim), torch.randn(batch, kv_heads, 71, dim)
    _, state = reference.attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], None, None, [], params, spec, 0.25, True)
    step = (q[:, :, 70:], k[:, :, 70:], v[:, :, 70:], torch.tensor([[True], [False]]), None, state, params, spec,
            0.25, True)
    fast_out, fast_state = entry.impl(*step)
    want_out, want_state = reference.attention(*step)
    torch.testing.assert_close(fast_out, want_out, rtol=1e-5, atol=1e-5)
    for fast, want in zip(fast_state, want_state, strict=True):
        torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
    chunk = (q[:, :, 60:], k[:, :, 60:], v[:, :, 60:], None, None, [], params, spec, 0.25, True)
    assert torch.equal(entry.impl(*chunk)[0], reference.attention(*chunk)[0])
    mask = torch.ones(batch, 71, dtype=torch.bool)
    mask[1, :5] = False
    prefill = (q, k, v, mask, None, [], params, spec, 0.25, True)
    got_out, got_state = entry.impl(*prefill)
    chunked_out, chunked_state = reference.chunked(*prefill, registry.CHUNK)
    assert torch.equal(got_out, chunked_out) and all(map(torch.equal, got_state, chunked_state))
    want_out, want_state = reference.attention(*prefill)
    real = mask[:, None, :, None].expand_as(got_out)
    torch.testing.assert_close(got_out[real], want_out[real], rtol=1e-5, atol=1e-5)
    for got, want in zip(got_state, want_state, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
