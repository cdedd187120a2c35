"""Every method (registered, plus spec combinations no registered method uses): chunked and recurrent agree
with the parallel form (fp64 to rounding, fp32 within 1e-5 of fp64), including padding, GQA, nonzero
parameters and state carried across calls."""
import pytest
import torch

from lincompile.kernels.linear_attention import reference
from lincompile.methods.spec import get_method

TIGHT = 1e-10


def _forms(c, chunk_size):
    args = (c.q, c.k, c.v, c.mask)
    par = reference.attention(*args, None, [], c.params, c.spec, c.scale, True)
    chunk = reference.chunked(*args, None, [], c.params, c.spec, c.scale, True, chunk_size=chunk_size)
    rec = reference.recurrent(*args, [], c.params, c.spec, c.scale)
    return par, chunk, rec


@pytest.mark.parametrize("t", [1, 5, 64 + 7, 130])
def test_chunked_and_recurrent_equal_parallel(causal_method, t, case, small_spec, diff):
    c = case(small_spec(causal_method), t, seed=t)
    (par, par_state), (chunk, chunk_state), (rec, rec_state) = _forms(c, chunk_size=13)
    assert torch.isfinite(par).all()
    assert diff([chunk], [par]) < TIGHT and diff([rec], [par]) < TIGHT
    assert diff(chunk_state, par_state) < TIGHT and diff(rec_state, par_state) < TIGHT


def test_default_group_and_kernel_sizes(case, diff):
    """The paper's G=64, K=63 (not shrunk), across two group boundaries."""
    c = case(get_method("augmented"), 130, seed=3)
    (par, par_state), (chunk, chunk_state), (rec, rec_state) = _forms(c, chunk_size=48)
    assert diff([chunk, rec], [par, par]) < TIGHT
    assert diff(chunk_state, par_state) < TIGHT and diff(rec_state, par_state) < TIGHT


def test_fp32_within_1e5_of_fp64(any_method, case, small_spec):
    spec = small_spec(any_method, group=8)
    exact = case(spec, 71, seed=5, padding=False)
    c32 = case(spec, 71, dtype=torch.float32, seed=5, padding=False)
    causal = spec.causal_capable
    ref, _ = reference.attention(exact.q, exact.k, exact.v, None, None, [], exact.params, spec, c32.scale, causal)
    outs = [reference.attention(c32.q, c32.k, c32.v, None, None, [], c32.params, spec, c32.scale, causal)[0]]
    if spec.causal_safe:
        outs.append(reference.chunked(c32.q, c32.k, c32.v, None, None, [], c32.params, spec, c32.scale, True, 16)[0])
        outs.append(reference.recurrent(c32.q, c32.k, c32.v, None, [], c32.params, spec, c32.scale)[0])
    for out in outs:
        assert out.dtype == torch.float32
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5


def test_prefill_then_decode_from_a_state(causal_method, case, small_spec, diff):
    """Parallel over a prefix, then parallel / recurrent over the rest, equals one pass."""
    c = case(small_spec(causal_method), 23, seed=11)
    cut = 10
    full, full_state = reference.attention(c.q, c.k, c.v, c.mask, None, [], c.params, c.spec, c.scale, True)
    head = [x[:, :, :cut] for x in (c.q, c.k, c.v)]
    tail = [x[:, :, cut:] for x in (c.q, c.k, c.v)]
    a, state = reference.attention(*head, c.mask[:, :cut], None, [], c.params, c.spec, c.scale, True)
    b, state_b = reference.attention(*tail, c.mask[:, cut:], None, state, c.params, c.spec, c.scale, True)
    r, state_r = reference.recurrent(*tail, c.mask[:, cut:], state, c.params, c.spec, c.scale)
    assert diff([torch.cat([a, b], 2), torch.cat([a, r], 2)], [full, full]) < TIGHT
    assert diff(state_b, full_state) < TIGHT and diff(state_r, full_state) < TIGHT


@pytest.mark.parametrize("rows", [1, 17])
def test_softmax_chunked_with_an_additive_bias(rows, case, diff):
    """Softmax honours `bias` [B, H, T or 1, past + T] in every chunk, after a cached prefix."""
    c = case(get_method("softmax"), 17, seed=12)
    _, state = reference.attention(c.q[:, :, :4], c.k[:, :, :4], c.v[:, :, :4], None, None, [], [], c.spec, c.scale,
                                   True)
    q, k, v = (x[:, :, 4:] for x in (c.q, c.k, c.v))
    bias = torch.randn(2, 4, rows, 4 + 13, dtype=torch.float64)
    par, par_state = reference.attention(q, k, v, None, bias[:, :, :13], state, [], c.spec, c.scale, True)
    chunk, chunk_state = reference.chunked(q, k, v, None, bias[:, :, :13], state, [], c.spec, c.scale, True, 5)
    assert diff([chunk], [par]) < TIGHT and diff(chunk_state, par_state) == 0.0


def test_no_tokens_keep_the_state(causal_method, case, small_spec, diff):
    """A call with no token (every form, the op's dispatch, a verify of no draft) returns an empty output and the
    state it was given."""
    from lincompile.kernels import registry

    c = case(small_spec(causal_method), 9, seed=12)
    _, state = reference.attention(c.q, c.k, c.v, c.mask, None, [], c.params, c.spec, c.scale, True)
    q, k, v = (x[:, :, :0] for x in (c.q, c.k, c.v))
    mask = c.mask[:, :0]
    calls = {"attention": lambda: reference.attention(q, k, v, mask, None, state, c.params, c.spec, c.scale, True),
             "chunked": lambda: reference.chunked(q, k, v, mask, None, state, c.params, c.spec, c.scale, True, 4),
             "recurrent": lambda: reference.recurrent(q, k, v, mask, state, c.params, c.spec, c.scale),
             "op": lambda: registry.recurrent_step(q, k, v, mask, None, state, c.params, c.spec, c.scale, True),
             "verify": lambda: reference.verify(q, k, v, state, c.params, c.spec, c.scale)}
    for form, call in calls.items():
        out, after = call()
        if form == "verify":
            after = reference.commit(state, after, [])
        assert out.shape == (2, 4, 0, 6) and out.dtype == c.q.dtype, form
        assert diff(after, state) == 0.0, form
