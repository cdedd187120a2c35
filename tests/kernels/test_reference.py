"""The reference forms agree with each other and with a float64 softmax written out by hand."""
import math

import pytest
import torch

from lincompile.kernels.linear_attention import reference
from lincompile.methods.params import random_params
from lincompile.methods.spec import MethodSpec, get_method


def _qkv(batch=2, heads=4, kv_heads=2, t=7, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, t, d, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, t, d, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, t, d + 2, generator=g, dtype=dtype)
    return q, k, v


def _fresh(spec, q, k, v):
    return reference.init_state(spec, q.shape[0], k.shape[1], k.shape[-1], v.shape[-1], q.device, q.dtype)


def test_softmax_matches_hand_written_causal_attention_with_gqa_and_padding():
    spec = get_method("softmax")
    q, k, v = _qkv()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    out, state = reference.attention(q, k, v, mask, None, _fresh(spec, q, k, v), [], spec, 0.3, True)
    kk = k.repeat_interleave(2, dim=1)
    vv = v.repeat_interleave(2, dim=1)
    scores = q @ kk.transpose(-1, -2) * 0.3
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
    expected = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ vv
    assert torch.allclose(out[0], expected[0], atol=1e-12)
    assert torch.allclose(out[1, :, 3:], expected[1, :, 3:], atol=1e-12)
    assert state[0].shape == (2, 2, 7, 8) and state[2].shape == (2, 7)


@pytest.mark.parametrize("name", ["softmax", "linear-elu"])
@pytest.mark.parametrize("t", [1, 5, 9])
def test_recurrent_equals_parallel(name, t):
    spec = get_method(name)
    q, k, v = _qkv(t=t, seed=t)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, 0] = False
    par, par_state = reference.attention(q, k, v, mask, None, _fresh(spec, q, k, v), [], spec, 0.25, True)
    rec, rec_state = reference.recurrent(q, k, v, mask, _fresh(spec, q, k, v), [], spec, 0.25)
    assert torch.allclose(par, rec, atol=1e-10, rtol=1e-10)
    for a, b in zip(par_state, rec_state):
        assert a.shape == b.shape
        assert torch.allclose(a.to(torch.float64), b.to(torch.float64), atol=1e-10)


@pytest.mark.parametrize("name", ["augmented", "taylor", "retnet", "linear-elu", "hedgehog", "local"])
def test_the_initial_state_given_or_not_gives_the_same(name):
    """From [] the queries skip their product with the (zero) S and z: the same outputs and state as from the
    initial state passed explicitly, which takes the product."""
    spec = get_method(name)
    q, k, v = _qkv(t=9, seed=5)
    params = random_params(spec, 4, 2, 8, 10, seed=5)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :2] = False
    out, state = reference.attention(q, k, v, mask, None, [], params, spec, 0.4, True)
    ref, ref_state = reference.attention(q, k, v, mask, None, _fresh(spec, q, k, v), params, spec, 0.4, True)
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, atol=1e-12)
               for a, b in zip(state, ref_state))


@pytest.mark.parametrize("name", ["softmax", "linear-elu"])
def test_prefill_then_parallel_chunk_equals_one_pass(name):
    spec = get_method(name)
    q, k, v = _qkv(t=11, seed=3)
    full, full_state = reference.attention(q, k, v, None, None, _fresh(spec, q, k, v), [], spec, 0.5, True)
    a, state = reference.attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], None, None, _fresh(spec, q, k, v), [],
                                   spec, 0.5, True)
    b, state = reference.attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], None, None, state, [], spec, 0.5, True)
    assert torch.allclose(torch.cat([a, b], 2), full, atol=1e-10)
    for x, y in zip(state, full_state):
        assert torch.equal(x.bool(), y.bool()) if x.dtype == torch.bool else torch.allclose(x, y, atol=1e-10)


def test_linear_elu_matches_explicit_formula():
    spec = get_method("linear-elu")
    q, k, v = _qkv(heads=2, kv_heads=2, t=6)
    out, _ = reference.attention(q, k, v, None, None, _fresh(spec, q, k, v), [], spec, 1.0, True)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    a = (phi(q) @ phi(k).transpose(-1, -2)).tril()
    expected = (a @ v) / a.sum(-1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-12)


def test_linear_state_is_constant_size_and_fp32_for_low_precision():
    spec = get_method("linear-elu")
    q, k, v = _qkv(t=9, dtype=torch.bfloat16)
    state = _fresh(spec, q, k, v)
    out, new_state = reference.attention(q, k, v, None, None, state, [], spec, 1.0, True)
    assert out.dtype == torch.bfloat16
    assert [s.shape for s in new_state] == [s.shape for s in state]
    assert all(s.dtype == torch.float32 for s in new_state)


def test_bad_shapes_are_named():
    spec = get_method("linear-elu")
    q, k, v = _qkv(heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="incompatible heads"):
        reference.attention(q, k, v, None, None, _fresh(spec, q, k, v), [], spec, 1.0, True)


@pytest.mark.parametrize("spec", [get_method("softmax"),
                                  MethodSpec("softmax-local", feature_map="elu1", local="softmax",
                                             global_branch="grouped", group_size=4)], ids=["softmax", "softmax-local"])
def test_masking_under_bf16_autocast(spec):
    """Training on a GPU runs under bf16 autocast: the scores come out bf16 while q (roped in fp32) does not, and
    masking must use the scores' own dtype (fp32's minimum overflows bf16). Parallel and recurrent forms."""
    q, k, v = _qkv(dtype=torch.float32)
    params = [p.float() for p in random_params(spec, 4, 2, 8, 10)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    exact, _ = reference.attention(q, k, v, mask, None, _fresh(spec, q, k, v), params, spec, 0.3, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = reference.attention(q, k, v, mask, None, _fresh(spec, q, k, v), params, spec, 0.3, True)
        state, steps = _fresh(spec, q, k, v), []
        for i in range(7):
            step, state = reference.recurrent(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], mask[:, i:i + 1],
                                              state, params, spec, 0.3)
            steps.append(step)
    real = mask[:, None, :, None]
    for form in (out, torch.cat(steps, 2)):
        assert not form.isnan().any()
        assert ((form.float() - exact) * real).abs().max() <= 0.05 * exact.abs().max()
