"""Every generated form against the fp64 reference, for every method the generator covers: chunked prefill
(T not a multiple of the chunk, left padding, B > 1, GQA, from the initial and from a nonzero state), decode
steps (recurrent kernel, across group boundaries, with a padding token), and verify of a draft tree that crosses
a group boundary. fp32 outputs and states within 1e-5 relative; outputs NaN-poisoned before every launch."""
import pytest
import torch

from lincompile.kernels.linear_attention import reference
from lincompile.kernels.triton import launch
from lincompile.methods.spec import get_method

FP32 = 1e-5


def test_chunked_prefill_then_continue(generated_method, kit, prefill_form):
    """Both prefill forms (walking the chunks, chunk-parallel): from the initial state with left padding, then
    from that state."""
    spec = kit.spec_of(generated_method)
    c = kit.make(spec, 13, seed=1, pad=3)
    ref, ref_state = reference.attention(c.q, c.k, c.v, c.mask, None, [], c.params, spec, kit.SCALE, True)
    out, state = launch.attention(*kit.cast([c.q, c.k, c.v]), c.mask, None, [], kit.cast(c.params), spec,
                                  kit.SCALE, True)
    assert out.dtype == torch.float32 and kit.rel(out, ref) <= FP32
    assert kit.state_rel(state, ref_state) <= FP32
    d = kit.make(spec, 9, seed=2)
    ref2, ref_state2 = reference.attention(d.q, d.k, d.v, None, None, ref_state, c.params, spec, kit.SCALE, True)
    out2, state2 = launch.attention(*kit.cast([d.q, d.k, d.v]), None, None, kit.cast(ref_state),
                                    kit.cast(c.params), spec, kit.SCALE, True)
    assert kit.rel(out2, ref2) <= FP32 and kit.state_rel(state2, ref_state2) <= FP32
    form, launches = prefill_form
    assert len(launches) == (2 if form == "parallel" and not spec.decay else 0)


def test_decode_steps(generated_method, kit):
    """Five one-token calls (the recurrent kernel) from a mid-group state; row 1's third token is padding (its
    key and value NaN)."""
    spec = kit.spec_of(generated_method)
    state, params = kit.prefilled_state(spec, 6, seed=3)
    c = kit.make(spec, 5, seed=4)
    c.mask[1, 2] = False
    c.k, c.v = (kit.poison_padding(x, c.mask) for x in (c.k, c.v))
    ref, ref_state = reference.recurrent(c.q, c.k, c.v, c.mask, state, params, spec, kit.SCALE)
    kernel_state = kit.cast(state)
    outs = []
    for i in range(5):
        step = kit.cast([c.q[:, :, i:i + 1], c.k[:, :, i:i + 1], c.v[:, :, i:i + 1]])
        out, kernel_state = launch.attention(*step, c.mask[:, i:i + 1], None, kernel_state, kit.cast(params), spec,
                                             kit.SCALE, True)
        outs.append(out)
    assert kit.rel(torch.cat(outs, 2), ref) <= FP32
    assert kit.state_rel(kernel_state, ref_state) <= FP32


def test_verify_tree_across_a_group_boundary(generated_method, kit):
    spec = kit.spec_of(generated_method)
    state, params = kit.prefilled_state(spec, 7, seed=5)  # position 7 (row 0) / 5 (row 1): depth 1-4 crosses 8
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 6])
    c = kit.make(spec, 8, seed=6)
    ref, _ = reference.verify(c.q, c.k, c.v, state, params, spec, kit.SCALE, parents)
    out, extras = launch.verify(*kit.cast([c.q, c.k, c.v]), kit.cast(state), kit.cast(params), spec, kit.SCALE, parents)
    assert kit.rel(out, ref) <= FP32 and torch.equal(extras.parents, parents)


def test_verify_chain_from_the_initial_state(kit):
    spec = kit.spec_of("augmented")
    c = kit.make(spec, 6, seed=7)
    ref, _ = reference.verify(c.q, c.k, c.v, [], c.params, spec, kit.SCALE)
    out, _ = launch.verify(*kit.cast([c.q, c.k, c.v]), [], kit.cast(c.params), spec, kit.SCALE)
    assert kit.rel(out, ref) <= FP32


def test_paper_sizes_across_group_boundaries(kit, prefill_form):
    """augmented with G=64 and K=63 (31 past taps): 150 tokens, two calls, a chunk-sized conv look-back; both
    prefill forms."""
    spec = get_method("augmented")
    c = kit.make(spec, 150, seed=8, pad=5)
    ref, ref_state = reference.attention(c.q[..., :100, :], c.k[..., :100, :], c.v[..., :100, :], c.mask[:, :100],
                                         None, [], c.params, spec, kit.SCALE, True)
    out, state = launch.attention(*kit.cast([c.q[..., :100, :], c.k[..., :100, :], c.v[..., :100, :]]),
                                  c.mask[:, :100], None, [], kit.cast(c.params), spec, kit.SCALE, True)
    assert kit.rel(out, ref) <= FP32 and kit.state_rel(state, ref_state) <= FP32
    tail = [x[..., 100:, :] for x in (c.q, c.k, c.v)]
    ref2, ref_state2 = reference.attention(*tail, None, None, ref_state, c.params, spec, kit.SCALE, True)
    out2, state2 = launch.attention(*kit.cast(tail), None, None, state, kit.cast(c.params), spec, kit.SCALE, True)
    assert kit.rel(out2, ref2) <= FP32 and kit.state_rel(state2, ref_state2) <= FP32


@pytest.mark.parametrize("name,dim", [("augmented", 64), ("linear-elu", 64), ("castling", 64), ("augmented", 128)])
def test_head_dims_64_and_128(name, dim, kit, prefill_form):
    spec = kit.spec_of(name, group=16, kernel=9)
    c = kit.make(spec, 37, seed=9, pad=4, heads=2, kv_heads=1, dk=dim, dv=dim)
    ref, ref_state = reference.attention(c.q, c.k, c.v, c.mask, None, [], c.params, spec, kit.SCALE, True)
    out, state = launch.attention(*kit.cast([c.q, c.k, c.v]), c.mask, None, [], kit.cast(c.params), spec,
                                  kit.SCALE, True)
    assert kit.rel(out, ref) <= FP32 and kit.state_rel(state, ref_state) <= FP32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, kit, prefill_form):
    """bf16 / fp16 q, k, v: fp32 state, output in the input dtype, within 1e-2 of the fp64 reference."""
    spec = kit.spec_of("augmented")
    c = kit.make(spec, 11, seed=10, pad=2)
    low = kit.cast([c.q, c.k, c.v], dtype)
    ref, ref_state = reference.attention(*kit.cast(low, torch.float64), c.mask, None, [], c.params, spec,
                                         kit.SCALE, True)
    out, state = launch.attention(*low, c.mask, None, [], kit.cast(c.params), spec, kit.SCALE, True)
    assert out.dtype == dtype and out.shape == (2, 4, 11, kit.DV)
    assert all(s.dtype == torch.float32 for s in state if s.is_floating_point())
    assert kit.rel(out, ref) <= 1e-2 and kit.state_rel(state, ref_state) <= 1e-2
