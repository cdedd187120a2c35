"""The fast decode form (`decode.step`) against the reference's recurrent form, token by token, for every causal
linear method: outputs and state, across group and conv-window boundaries, GQA, rows decoded in step and rows at
different positions."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lincompile.kernels import registry
from lincompile.kernels.linear_attention import decode, reference
from lincompile.kernels.linear_attention.reference import init_state
from lincompile.kernels.linear_attention.reference_recurrent import first_token
from lincompile.methods.params import random_params
from lincompile.methods.spec import get_method

from .conftest import BATCH, CAUSAL, DK, DV, EXTRA, HEADS, KV_HEADS, SCALE

LINEAR = [name for name in CAUSAL if (EXTRA.get(name) or get_method(name)).kind == "linear"]


def _token(c, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return c.q[:, :, i:i + 1], c.k[:, :, i:i + 1], c.v[:, :, i:i + 1]


@pytest.mark.parametrize("name", LINEAR)
def test_step_equals_the_reference_token_by_token(name, case, small_spec, diff):
    """From the initial state, 11 tokens (groups of 4 complete at tokens 3 and 7, the 2-token conv window fills),
    fp64: every output and the state after each token agree with `reference.recurrent` to rounding."""
    spec = small_spec(name)
    c = case(spec, 11, seed=5, padding=False)
    fast = want = init_state(spec, BATCH, KV_HEADS, DK, DV, dtype=torch.float64)
    for i in range(11):
        q, k, v = _token(c, i)
        assert decode.applies(q, None, fast, spec, True)
        got, fast = decode.step(q, k, v, fast, c.params, spec, c.scale)
        out, want = reference.recurrent(q, k, v, None, want, c.params, spec, c.scale)
        assert got.dtype == out.dtype and diff([got], [out]) < 1e-12, i
        assert diff(fast, want) < 1e-12, i
        assert [s.dtype for s in fast] == [s.dtype for s in want]


@pytest.mark.parametrize("name", LINEAR)
def test_step_equals_the_reference_for_rows_at_different_positions(name, case, small_spec, diff):
    """Row 1 left-padded by 2 in a 3-token prefill, so it runs 2 positions behind row 0; then 9 tokens decoded in
    fp64, the rows completing their groups of 4 at different tokens: every output and state as the reference's."""
    spec = small_spec(name)
    c = case(spec, 12, seed=7, padding=False)
    prefill = torch.tensor([[True, True, True], [False, False, True]])
    _, want = reference.recurrent(c.q[:, :, :3], c.k[:, :, :3], c.v[:, :, :3], prefill, [], c.params, spec, c.scale)
    if spec.uses_positions:
        assert want[spec.state_parts().index("position")].tolist() == [3, 1]
    fast = want
    for i in range(3, 12):
        q, k, v = _token(c, i)
        assert decode.applies(q, None, fast, spec, True)
        got, fast = decode.step(q, k, v, fast, c.params, spec, c.scale)
        out, want = reference.recurrent(q, k, v, None, want, c.params, spec, c.scale)
        assert diff([got], [out]) < 1e-12, i
        assert diff(fast, want) < 1e-12, i


@pytest.mark.parametrize("name", ["augmented", "hedgehog", "retnet", "cosformer", "test-softmax-local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_at_the_paper_sizes_completes_a_group(name, dtype, case):
    """G = 64, K = 63: after a 62-token prefill, tokens 62 and 63 (the second completes the group, which is folded)
    and 64 (the next group's first) as the reference decodes them; fp32 within 1e-5, bf16 inputs (fp32 state)
    within bf16 rounding."""
    spec = EXTRA.get(name) or get_method(name)
    c = case(spec, 65, seed=2, padding=False)
    params = [p.float() for p in c.params]
    q, k, v = (x.to(dtype) for x in (c.q, c.k, c.v))
    _, state = reference.attention(q[:, :, :62], k[:, :, :62], v[:, :, :62], None, None, [], params, spec, SCALE,
                                   True)
    fast = want = state
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for i in range(62, 65):
        step = (q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        got, fast = decode.step(*step, fast, params, spec, SCALE)
        out, want = reference.recurrent(*step, None, want, params, spec, SCALE)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), out.float(), rtol=tolerance, atol=tolerance)
        for a, b in zip(fast, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_step_leaves_its_inputs_unchanged(case, small_spec):
    spec = small_spec("augmented")
    c = case(spec, 4, seed=1, padding=False)
    _, state = reference.attention(c.q[:, :, :3], c.k[:, :, :3], c.v[:, :, :3], None, None, [], c.params, spec,
                                   c.scale, True)
    before = [s.clone() for s in state]
    decode.step(*_token(c, 3), state, c.params, spec, c.scale)  # completes a group of 4: folds and clears
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


def test_applies_only_to_real_rows(case, small_spec):
    spec = small_spec("augmented")
    c = case(spec, 3, seed=0, padding=False)
    q = c.q[:, :, :1]
    state = init_state(spec, BATCH, KV_HEADS, DK, DV, dtype=torch.float64)
    assert decode.applies(q, None, state, spec, True)
    assert decode.applies(q, torch.ones(BATCH, 1, dtype=torch.bool), state, spec, True)
    assert not decode.applies(q, torch.tensor([[True], [False]]), state, spec, True)  # a padding row
    assert not decode.applies(c.q[:, :, :2], None, state, spec, True)  # two tokens
    assert not decode.applies(q, None, state, spec, False)  # bidirectional
    assert not decode.applies(q, None, [], spec, True)  # no state given
    apart = list(state)
    apart[-1] = torch.tensor([4, 5])  # rows at different positions
    assert decode.applies(q, None, apart, spec, True)
    assert not decode.applies(q, None, [], get_method("softmax"), True)  # a KV cache
    assert not decode.applies(q, torch.ones(BATCH, 2, dtype=torch.bool), state, spec, True)  # the reference refuses
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(s) for s in state]
        assert not decode.applies(mode.from_tensor(q), None, fake, spec, True)  # tracing: no values to read


def test_recurrent_step_serves_decode_through_the_fast_form(case, small_spec, monkeypatch):
    """The registry's `recurrent-step` takes `decode.step` for real rows (in step or not) and the reference for a
    padding row."""
    spec = small_spec("augmented")
    c = case(spec, 2, seed=0, padding=False)
    params = random_params(spec, HEADS, KV_HEADS, DK, DV, seed=0)
    state = init_state(spec, BATCH, KV_HEADS, DK, DV)
    q, k, v = (x.float() for x in _token(c, 0))
    calls = []
    monkeypatch.setattr(decode, "step", lambda *args: calls.append("fast") or reference.recurrent(
        *args[:3], None, *args[3:]))
    registry.recurrent_step(q, k, v, None, None, state, params, spec, SCALE, True)
    registry.recurrent_step(q, k, v, torch.tensor([[True], [False]]), None, state, params, spec, SCALE, True)
    apart = state[:-1] + [torch.tensor([4, 5])]  # rows at different positions
    registry.recurrent_step(q, k, v, None, None, apart, params, spec, SCALE, True)
    assert calls == ["fast", "fast"]


@pytest.mark.parametrize("name", ["augmented", "hedgehog", "retnet", "test-softmax-local"])
@pytest.mark.parametrize("apart", [False, True])
def test_step_gradients_equal_the_reference(name, apart, case, small_spec):
    """The op's backward recomputes a decode call through `decode.step`: its gradients (inputs and parameters,
    through the output and the new state, at a group's last token; `apart`: row 1 a token behind, at slot 2)
    are the reference's."""
    spec = small_spec(name)
    c = case(spec, 4, seed=6, padding=False)
    prefill = torch.tensor([[True, True, True], [not apart, True, True]])
    _, state = reference.recurrent(c.q[:, :, :3], c.k[:, :, :3], c.v[:, :, :3], prefill, [], c.params, spec,
                                   c.scale)

    def grads(form):
        inputs = [t.clone().requires_grad_() for t in (*_token(c, 3), *c.params)]
        q, k, v, *params = inputs
        if form == "fast":
            out, new = decode.step(q, k, v, state, params, spec, c.scale)
        else:
            out, new = reference.recurrent(q, k, v, None, state, params, spec, c.scale)
        g = torch.Generator().manual_seed(0)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
                   for t in (out, *new) if t.is_floating_point())
        return torch.autograd.grad(loss, inputs, allow_unused=True)

    for got, want in zip(grads("fast"), grads("reference"), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", LINEAR)
def test_first_token_is_the_recurrent_form_on_the_first_token(name, case, small_spec, diff):
    """`first_token` (the ONNX export's decode step) on a 3-token call is `reference.recurrent` on its first token,
    bit for bit: rows at different positions, a padding row (its state unchanged), and no key mask at all."""
    spec = small_spec(name)
    c = case(spec, 9, seed=4, padding=False)
    prefill = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    _, state = reference.recurrent(c.q[:, :, :6], c.k[:, :, :6], c.v[:, :, :6], prefill, [], c.params, spec,
                                   c.scale)
    call = (c.q[:, :, 6:], c.k[:, :, 6:], c.v[:, :, 6:])
    for mask in (None, torch.tensor([[True, True, False], [False, True, True]])):
        got, new = first_token(*call, mask, state, c.params, spec, c.scale)
        first = None if mask is None else mask[:, :1]
        out, want = reference.recurrent(*(x[:, :, :1] for x in call), first, state, c.params, spec, c.scale)
        assert diff([got], [out]) == 0 and diff(new, want) == 0
    padded = [s[1:] for s in new]  # row 1 was padding: its state is the one before the call
    assert diff(padded, [s[1:] for s in state]) == 0


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1.2e-7), (torch.float64, 1e-15)])
def test_the_global_weight_from_a_position_number_equals_the_tensor_path(dtype, tolerance):
    """`grouped_alpha` for one position given as an int (decode.step and chain.run, every row there) against the
    tensor path, at every group's start and middle below and past the cap: within alpha's rounding."""
    import dataclasses

    from lincompile.kernels.linear_attention.reference_linear import grouped_alpha

    spec = dataclasses.replace(get_method("augmented"), group_size=4, global_cap=6)
    alpha = torch.tensor(0.7, dtype=dtype)
    for position in range(40):
        want = grouped_alpha(spec, alpha, torch.tensor([position]))
        got = grouped_alpha(spec, alpha, position)
        assert got.dim() == 0 and abs(float(got) - float(want)) <= tolerance * float(want), position
