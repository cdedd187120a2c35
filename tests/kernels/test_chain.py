"""The fast form of a short causal call (`chain.run`: a speculative verify call, a prefill chunk) against the
reference's parallel form, for every causal linear method: outputs and state, calls that fill a group partly,
complete it or span a whole one, from the initial state or a later one, GQA; and when it applies."""
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lincompile.kernels import registry
from lincompile.kernels.linear_attention import chain, reference
from lincompile.kernels.linear_attention.reference import init_state
from lincompile.methods.params import param_names
from lincompile.methods.spec import MethodSpec, get_method

from .conftest import BATCH, CAUSAL, DK, DV, EXTRA, KV_HEADS, SCALE

#: Spec combinations the registered methods and conftest's EXTRA leave out: a normalized grouped branch with
#: cosFormer's positions in the buffer's features, and a global cap.
CHAIN_EXTRA = {spec.name: spec for spec in (
    MethodSpec("test-cos-grouped", feature_map="cosformer", normalizer="denominator", local="relu2",
               global_branch="grouped"),
    dataclasses.replace(get_method("augmented"), name="test-capped", global_cap=5),
)}
LINEAR = [name for name in CAUSAL if (EXTRA.get(name) or get_method(name)).kind == "linear"] + list(CHAIN_EXTRA)


def _spec(name: str, small_spec) -> MethodSpec:
    return small_spec(CHAIN_EXTRA.get(name) or name)


def _case(case, spec: MethodSpec, t: int, seed: int):
    """`case` with alpha moved off 1 (random_params' value, under which a dropped alpha goes unseen)."""
    c = case(spec, t, seed=seed, padding=False)
    names = param_names(spec)
    if "alpha" in names:
        c.params[names.index("alpha")] = c.params[names.index("alpha")] * 0.7
    return c


def _call(c, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return c.q[:, :, start:end], c.k[:, :, start:end], c.v[:, :, start:end]


@pytest.mark.parametrize("name", LINEAR)
@torch.no_grad()
def test_calls_equal_the_parallel_reference(name, case, small_spec, diff):
    """Groups of 4, a 2-token conv window, fp64: from the initial state tokens 0-1 (part of a group), from there
    2-3 (completing it), 4-7 (a whole group), then 9-10 after a reference token 8 (the middle of a group): every
    output and the state after each call agree with `reference.attention` to rounding."""
    spec = _spec(name, small_spec)
    c = _case(case, spec, 11, seed=5)
    fast, want = [], []
    for start, end in ((0, 2), (2, 4), (4, 8), (8, 9), (9, 11)):
        call = _call(c, start, end)
        if end - start == 1:  # a one-token call: the reference for both
            _, fast = _, want = reference.attention(*call, None, None, want, c.params, spec, c.scale, True)
            continue
        assert chain.applies(call[0], None, fast, spec, True), (start, end)
        got, fast = chain.run(*call, fast, c.params, spec, c.scale)
        out, want = reference.attention(*call, None, None, want or [], c.params, spec, c.scale, True)
        assert got.dtype == out.dtype and diff([got], [out]) < 1e-12, (start, end)
        assert diff(fast, want) < 1e-12, (start, end)
        assert [s.dtype for s in fast] == [s.dtype for s in want]


@pytest.mark.parametrize("name", ["augmented", "hedgehog", "retnet", "cosformer", "test-softmax-local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_a_verify_call_at_the_paper_sizes(name, dtype, case):
    """G = 64, K = 63: after a 55-token prefill, a 9-token call that completes the group (folded into S) and an
    8-token one in the next group, as the reference computes them; fp32 within 1e-5, bf16 inputs (fp32 state)
    within bf16 rounding."""
    spec = EXTRA.get(name) or get_method(name)
    c = case(spec, 72, seed=2, padding=False)
    params = [p.float() for p in c.params]
    q, k, v = (x.to(dtype) for x in (c.q, c.k, c.v))
    _, fast = reference.attention(q[:, :, :55], k[:, :, :55], v[:, :, :55], None, None, [], params, spec, SCALE,
                                  True)
    want = fast
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for start, end in ((55, 64), (64, 72)):
        call = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        assert chain.applies(call[0], None, fast, spec, True)
        got, fast = chain.run(*call, fast, params, spec, SCALE)
        out, want = reference.attention(*call, None, None, want, params, spec, SCALE, True)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), out.float(), rtol=tolerance, atol=tolerance)
        for a, b in zip(fast, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_run_leaves_its_inputs_unchanged(case, small_spec):
    spec = small_spec("augmented")
    c = case(spec, 5, seed=1, padding=False)
    _, state = reference.attention(*_call(c, 0, 1), None, None, [], c.params, spec, c.scale, True)
    before = [s.clone() for s in state]
    chain.run(*_call(c, 1, 3), state, c.params, spec, c.scale)  # writes slots 1-2
    chain.run(*_call(c, 1, 4), state, c.params, spec, c.scale)  # completes the group: folds and clears
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


@torch.no_grad()
def test_applies_within_one_group_to_real_rows_in_step(case, small_spec):
    spec = small_spec("augmented")
    c = case(spec, 6, seed=0, padding=False)
    q = c.q[:, :, :2]
    state = init_state(spec, BATCH, KV_HEADS, DK, DV, dtype=torch.float64)
    assert chain.applies(q, None, state, spec, True) and chain.applies(q, None, [], spec, True)
    assert chain.applies(q, torch.ones(BATCH, 2, dtype=torch.bool), state, spec, True)
    assert chain.applies(c.q[:, :, :4], None, state, spec, True)  # fills the group of 4
    assert not chain.applies(c.q[:, :, :5], None, state, spec, True)  # crosses into the next group
    later = state[:-1] + [torch.tensor([3, 3])]
    assert not chain.applies(q, None, later, spec, True)  # slot 3 + 2 tokens: crosses
    assert not chain.applies(q, None, state[:-1] + [torch.tensor([4, 5])], spec, True)  # rows at different positions
    assert not chain.applies(q, torch.tensor([[True, True], [False, True]]), state, spec, True)  # a padding row
    assert not chain.applies(c.q[:, :, :1], None, state, spec, True)  # one token: decode.step's
    assert not chain.applies(q, None, state, spec, False)  # bidirectional
    assert not chain.applies(q, None, [], get_method("softmax"), True)  # a KV cache
    assert chain.applies(c.q[:, :, :6], None, [], small_spec("hedgehog"), True)  # no groups: any length
    cos = small_spec("cosformer")
    apart = init_state(cos, BATCH, KV_HEADS, DK, DV, dtype=torch.float64)[:-1] + [torch.tensor([3, 2])]
    assert chain.applies(q, None, apart, cos, True)  # no groups: rows at different positions too
    assert not chain.applies(q, torch.ones(BATCH, 1, dtype=torch.bool), state, spec, True)  # malformed mask
    assert not chain.applies(q[:0], None, [], spec, True)  # an empty batch
    with torch.enable_grad():
        assert not chain.applies(q, None, state, spec, True)  # autograd recomputes through the reference
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(s) for s in state]
        assert not chain.applies(mode.from_tensor(q), None, fake, spec, True)  # tracing: no values to read


@torch.no_grad()
def test_recurrent_step_serves_short_calls_through_the_fast_form(case, small_spec, monkeypatch):
    """The registry's `recurrent-step` takes `chain.run` for a short call within a group, the reference for one
    that crosses a group boundary and for a padded one."""
    spec = small_spec("augmented")
    c = case(spec, 6, seed=0, padding=False)
    calls = []
    monkeypatch.setattr(chain, "run", lambda q, k, v, state, *rest: calls.append(q.shape[2]) or reference.attention(
        q, k, v, None, None, state, *rest, True))
    registry.recurrent_step(*_call(c, 0, 3), None, None, [], c.params, spec, SCALE, True)
    registry.recurrent_step(*_call(c, 0, 6), None, None, [], c.params, spec, SCALE, True)
    registry.recurrent_step(*_call(c, 0, 3), torch.tensor([[True] * 3, [False, True, True]]), None, [], c.params,
                            spec, SCALE, True)
    with pytest.raises(ValueError, match="as many new keys as queries"):  # the reference's error, not chain's
        registry.recurrent_step(c.q[:, :, :3], c.k[:, :, :2], c.v[:, :, :2], None, None, [], c.params, spec,
                                SCALE, True)
    assert calls == [3]


@pytest.mark.parametrize("name", ["augmented", "hedgehog", "retnet", "test-softmax-local", "test-cos-grouped"])
@pytest.mark.parametrize("prefix", [0, 3])
@torch.no_grad()
def test_long_calls_go_in_group_aligned_chunks(name, prefix, case, small_spec, diff, monkeypatch):
    """A call longer than CHUNK (6 here) after `prefix` tokens: chunks cut at the groups of 4 (methods without
    groups: chunks of 6), through `chain.run`, equal to the parallel form over the whole call; a left-padded batch
    takes the reference chunk by chunk, equal too."""
    monkeypatch.setattr(registry, "CHUNK", 6)
    spec = _spec(name, small_spec)
    c = _case(case, spec, prefix + 23, seed=3)
    state = []
    if prefix:
        _, state = reference.attention(*_call(c, 0, prefix), None, None, [], c.params, spec, SCALE, True)
    sizes = []
    run = chain.run
    monkeypatch.setattr(chain, "run", lambda q, *rest: sizes.append(q.shape[2]) or run(q, *rest))
    call = _call(c, prefix, prefix + 23)
    got, new = registry.recurrent_step(*call, None, None, state, c.params, spec, SCALE, True)
    out, want = reference.attention(*call, None, None, state, c.params, spec, SCALE, True)
    assert diff([got], [out]) < 1e-12 and diff(new, want) < 1e-12
    grouped = spec.uses_groups
    # after the 3-token prefix, the group's last slot goes alone (through decode.step), then groups of 4
    assert sizes == ([4] * 5 + [2] if prefix and grouped else [4] * 5 + [3] if grouped else [6, 6, 6, 5])
    padded = torch.ones(BATCH, 23, dtype=torch.bool)
    padded[1, :2] = False
    got, new = registry.recurrent_step(*call, padded, None, state, c.params, spec, SCALE, True)
    out, want = reference.attention(*call, padded, None, state, c.params, spec, SCALE, True)
    assert diff([got], [out]) < 1e-12 and diff(new, want) < 1e-12


@torch.no_grad()
def test_calls_on_views_of_stacked_states_copy_only_their_own_parts():
    """After a speculative commit every site's state part is a view of one tensor stacked over the sites: a decode
    step and a verify call copy their own parts only (`slice_scatter` copied a view's whole storage: 30 sites'
    worth per call on SmolLM2)."""
    from lincompile.methods.params import random_params

    spec, sites, heads, kv_heads, d = get_method("augmented"), 8, 4, 2, 16
    params = random_params(spec, heads, kv_heads, d, d)
    stacked = [torch.cat([t + i for i in range(sites)]) if t.is_floating_point() else torch.cat([t + 5] * sites)
               for t in init_state(spec, 1, kv_heads, d, d)]
    state = [part.split(1)[3] for part in stacked]  # site 3's parts: views into the stack, position 5
    largest = max(part.numel() for part in state)
    gen = torch.Generator().manual_seed(0)
    for t in (1, 6):
        q, k, v = (torch.randn(1, h, t, d, generator=gen) for h in (heads, kv_heads, kv_heads))
        with torch.profiler.profile(record_shapes=True) as prof:
            registry.recurrent_step(q, k, v, None, None, state, params, spec, 0.25, True)
        copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone") and e.input_shapes
                  and e.input_shapes[0] and torch.Size(e.input_shapes[0]).numel() > largest]
        assert not copies, [(e.name, e.input_shapes[0]) for e in copies]
