"""The torch.library op: same numbers as the reference, gradients, and torch.library.opcheck."""
import torch

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


def test_opcheck():
    for name in ("softmax", "linear-elu"):
        spec, q, k, v, mask, state = _inputs(name)
        q.requires_grad_(True)
        torch.library.opcheck(op.default, (q, k, v, mask, None, state, [], spec.to_json(), 0.35, True))
