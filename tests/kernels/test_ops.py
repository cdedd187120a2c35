"""The torch.library op: same numbers as the reference, gradients, and torch.library.opcheck."""
import pytest
import torch

import lincompile
import lincompile.kernels.ops  # noqa: F401
from lincompile.kernels.linear_attention import reference
from lincompile.methods.spec import get_method

op = torch.ops.lincompile.attention


def _inputs(name, dtype=torch.float64, seed=0):
    spec = get_method(name)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=dtype)
    k = torch.randn(2, 2, 5, 8, generator=g, dtype=dtype)
    v = torch.randn(2, 2, 5, 8, generator=g, dtype=dtype)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    state = reference.init_state(spec, 2, 2, 8, 8, "cpu", dtype)
    return spec, q, k, v, mask, state


def test_op_matches_reference_and_backpropagates():
    for name in ("softmax", "linear-elu"):
        spec, q, k, v, mask, state = _inputs(name)
        q.requires_grad_(True)
        k.requires_grad_(True)
        v.requires_grad_(True)
        out, new_state = op(q, k, v, mask, None, state, [], spec.to_json(), 0.35, True)
        ref, ref_state = reference.attention(q, k, v, mask, None, state, [], spec, 0.35, True)
        assert torch.allclose(out, ref)
        assert all(torch.equal(a, b) for a, b in zip(new_state, ref_state))
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, atol=1e-10)


def test_backward_skips_the_outputs_the_loss_never_used(monkeypatch):
    """A loss on the output alone recomputes only the output's graph (the state's gradient arrives as None, not
    as zeros to push through the fold); a loss on the state alone (no output gradient) still reaches q, k, v."""
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda outs, *a, **kw: calls.append(len(outs)) or real(outs, *a, **kw))
    spec, q, k, v, mask, state = _inputs("linear-elu")
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    out, new_state = op(*leaves, mask, None, state, [], spec.to_json(), 0.35, True)
    ref, ref_state = reference.attention(*leaves, mask, None, state, [], spec, 0.35, True)
    grads = real(out.square().sum(), leaves, retain_graph=True)
    assert calls == [1]
    for a, b in zip(grads, real(ref.square().sum(), leaves, retain_graph=True)):
        assert torch.allclose(a, b, atol=1e-10)
    grads = real(new_state[0].sum(), leaves, allow_unused=True, materialize_grads=True)  # S does not depend on q
    assert calls == [1, 1]
    for a, b in zip(grads, real(ref_state[0].sum(), leaves, allow_unused=True, materialize_grads=True)):
        assert torch.allclose(a, b, atol=1e-10)


def test_an_explicit_initial_state_runs_as_the_initial_state(monkeypatch):
    """A multi-token call given an all-zero state reaches the implementation as [] (the same state, which the
    reference exploits), with the numbers of the explicit one; a nonzero state, or a one-token call, as given."""
    import dataclasses

    from lincompile.kernels import registry

    spec, q, k, v, mask, state = _inputs("linear-elu")
    entry = registry.select(spec, q.device)
    seen = []
    spy = dataclasses.replace(entry, impl=lambda *a: seen.append(len(a[5])) or entry.impl(*a))
    monkeypatch.setattr(registry, "select", lambda *a: spy)
    out, new_state = op(q, k, v, mask, None, state, [], spec.to_json(), 0.35, True)
    ref, ref_state = reference.attention(q, k, v, mask, None, state, [], spec, 0.35, True)
    assert torch.allclose(out, ref, atol=1e-12) and all(torch.equal(a, b) for a, b in zip(new_state, ref_state))
    op(q, k, v, mask, None, new_state, [], spec.to_json(), 0.35, True)
    op(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, None, state, [], spec.to_json(), 0.35, True)
    assert seen == [0, len(state), len(state)]


def test_opcheck():
    for name in ("softmax", "linear-elu"):
        spec, q, k, v, mask, state = _inputs(name)
        q.requires_grad_(True)
        torch.library.opcheck(op.default, (q, k, v, mask, None, state, [], spec.to_json(), 0.35, True))


def test_a_trainable_bias_gets_its_gradient():
    """A softmax site's additive bias (T5's relative positions) that requires grad gets the reference's gradient;
    opcheck's autograd checks cover it too."""
    spec, q, k, v, _, _ = _inputs("softmax")
    bias = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]
    out, _ = op(*leaves[:3], None, leaves[3], [], [], spec.to_json(), 0.35, False)
    ref, _ = reference.attention(*leaves[:3], None, leaves[3], [], [], spec, 0.35, False)
    for a, b in zip(torch.autograd.grad(out.square().sum(), leaves), torch.autograd.grad(ref.square().sum(), leaves)):
        assert a is not None and torch.allclose(a, b, atol=1e-10)
    torch.library.opcheck(op.default, (*leaves[:3], None, leaves[3], [], [], spec.to_json(), 0.35, False))


@pytest.mark.parametrize("state_dtype,dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_a_causal_linear_state_comes_back_in_the_accumulation_dtype(state_dtype, dtype):
    """Whatever dtype the state came in (a state cast to fp16, fp64 inputs with an fp32 state), the new state is
    in the inputs' accumulation dtype, as the fake kernel says."""
    spec, q, k, v, mask, _ = _inputs("linear-elu", dtype=dtype)
    _, state = reference.attention(q, k, v, mask, None, [], [], spec, 0.35, True)
    state = [t.to(state_dtype) if t.is_floating_point() else t for t in state]
    _, new_state = op(q, k, v, mask, None, state, [], spec.to_json(), 0.35, True)
    assert [t.dtype for t in new_state] == [dtype] * len(state)
    torch.library.opcheck(op.default, (q, k, v, mask, None, state, [], spec.to_json(), 0.35, True),
                          test_utils=("test_faketensor",))


def test_a_kv_cache_of_zeros_keeps_its_slots():
    """A preallocated KV cache (zeros, every slot masked) is no initial state: the new cache holds its slots."""
    spec, q, k, v, mask, _ = _inputs("softmax")
    cache = [torch.zeros(2, 2, 3, 8, dtype=torch.float64), torch.zeros(2, 2, 3, 8, dtype=torch.float64),
             torch.zeros(2, 3, dtype=torch.bool)]
    out, new_state = op(q, k, v, mask, None, cache, [], spec.to_json(), 0.35, True)
    ref, ref_state = reference.attention(q, k, v, mask, None, cache, [], spec, 0.35, True)
    assert [t.shape for t in new_state] == [t.shape for t in ref_state] == [(2, 2, 8, 8), (2, 2, 8, 8), (2, 8)]
    assert torch.allclose(out, ref, atol=1e-12)


def test_op_with_parameters_and_a_structured_state():
    """augmented: params (alpha, conv taps) get gradients; the int64 position part passes through."""
    import dataclasses

    from lincompile.methods.params import random_params

    spec = dataclasses.replace(get_method("augmented"), group_size=4, conv_kernel=5)
    _, q, k, v, mask, _ = _inputs("linear-elu")
    state = reference.init_state(spec, 2, 2, 8, 8, "cpu", torch.float64)
    params = [p.double().requires_grad_(True) for p in random_params(spec, 4, 2, 8, 8)]
    out, new_state = op(q, k, v, mask, None, state, params, spec.to_json(), 0.35, True)
    ref, ref_state = reference.attention(q, k, v, mask, None, state, params, spec, 0.35, True)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(new_state, ref_state))
    assert new_state[-1].dtype == torch.int64 and new_state[-1].tolist() == [5, 3]
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(grads, ref_grads):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-10)


def test_a_decode_step_returns_no_input_storage():
    """A single causal token goes through `recurrent-step`, which leaves the grouped state unchanged until a
    group completes; the op must still return fresh tensors (torch.compile rejects outputs aliasing inputs)."""
    from lincompile.methods.params import random_params

    spec = get_method("augmented")
    _, q, k, v, _, _ = _inputs("linear-elu", dtype=torch.float32)
    params = random_params(spec, 4, 2, 8, 8)
    _, state = reference.attention(q, k, v, None, None, [], params, spec, 0.35, True)
    step = (q[:, :, :1], k[:, :, :1], v[:, :, :1], torch.ones(2, 1, dtype=torch.long), None, state, params,
            spec.to_json(), 0.35, True)
    out, new_state = op(*step)
    inputs = {t.untyped_storage().data_ptr() for t in (*step[:4], *state, *params)}
    assert all(t.untyped_storage().data_ptr() not in inputs for t in (out, *new_state))
    torch.library.opcheck(op.default, step)


@pytest.mark.parametrize("method", [m for m in lincompile.methods() if get_method(m).uses_groups])
def test_opcheck_one_token_step_with_gradients(method):
    """A decode step from a state with every input requiring grad: opcheck's dynamic-shape autograd check traces
    the backward's recompute through the recurrent reference, whose "did a group complete?" has no values then."""
    from lincompile.methods.params import random_params

    spec = get_method(method)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    params = [p.double().requires_grad_() for p in random_params(spec, 4, 2, 8, 8)]
    _, state = reference.attention(q, k, v, None, None, [], params, spec, 0.35, True)
    one = [t[:, :, :1].clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(op.default, (*one, torch.ones(2, 1, dtype=torch.long), None, [s.detach() for s in state],
                                       params, spec.to_json(), 0.35, True))


@pytest.mark.parametrize("method", ["augmented", "hedgehog", "retnet", "linear-elu", "softmax"])
@pytest.mark.parametrize("tokens,padded", [(1, False), (1, True), (3, True), (70, True)])
def test_gradients_reach_a_past_state(method, tokens, padded):
    """A past state computed with autograd (a segment carried into the next, as truncated backprop through time
    does): the op's gradients with respect to it, and to q, k, v and the parameters, are those of the form it
    runs differentiated directly: `decode.step` (one token, every row real), the reference's recurrent form (one
    token, a padding row), the parallel form (3 tokens) and the chunked one (70). A decode step's are also the
    reference recurrent form's. (Forms may differ in the gradient of group-buffer slots that no state fills: each
    passes them on or drops them; `decode.step` and the recurrent form agree.)"""
    import dataclasses

    from lincompile.kernels import registry
    from lincompile.methods.params import random_params

    spec = get_method(method)
    if spec.uses_groups:
        spec = dataclasses.replace(spec, group_size=4, conv_kernel=5)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 6 + tokens, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    params = [p.double().requires_grad_() for p in random_params(spec, 4, 2, 8, 8)]
    _, past = reference.attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], None, None, [], params, spec, 0.35, True)
    past = [s.detach().requires_grad_() if s.is_floating_point() else s for s in past]
    new = [t[:, :, 6:].clone().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[1, 0] = 0 if padded else 1
    leaves = [*new, *params, *(s for s in past if s.requires_grad)]

    def grads(call):
        out, state = call(*new, mask, None, past, params)
        weights = torch.Generator().manual_seed(0)
        loss = sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum()
                   for t in (out, *state) if t.is_floating_point())
        return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)

    ours = grads(lambda *a: op(*a, spec.to_json(), 0.35, True))
    forms = [lambda *a: registry.select(spec, q.device).impl(*a, spec, 0.35, True)]
    if tokens == 1 and spec.kind == "linear":
        forms.append(lambda q, k, v, mask, bias, state, params: reference.recurrent(q, k, v, mask, state, params,
                                                                                    spec, 0.35))
    assert any(s.requires_grad for s in past)
    for form in forms:
        for got, want in zip(ours, grads(form), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert all(s.abs().sum() > 0 for s in ours[-len([s for s in past if s.requires_grad]):])
