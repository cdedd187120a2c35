"""8-bit linear layers: the fast form (`torch._int_mm`) against the plain-PyTorch reference on fresh random
inputs, row independence, stacking, and the float product within the quantization error bound."""
from __future__ import annotations

import pytest
import torch

from lincompile.kernels.int8.linear import int8_linear
from lincompile.kernels.int8.reference import LEVELS, int8_linear_reference, quantize_rows, quantize_weight

SHAPES = [((1, 64), 48), ((3, 5, 64), 32), ((17, 576), 192), ((2, 7), 5)]  # (x shape, out features)


def _inputs(x_shape: tuple[int, ...], out: int, seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g) * torch.rand(x_shape[-1], generator=g) * 4  # uneven channels
    w = torch.randn(out, x_shape[-1], generator=g) / x_shape[-1] ** 0.5
    b = torch.randn(out, generator=g) if bias else None
    return x, w, b


def test_weights_round_within_half_a_step_and_stay_symmetric():
    w = torch.randn(40, 33, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (40,) and int(q.abs().max()) == LEVELS
    assert bool((q[3] == 0).all())
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())
    with pytest.raises(ValueError, match="float"):
        quantize_weight(q)


@pytest.mark.parametrize("x_shape,out", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_form_matches_the_reference(x_shape, out, seed):
    x, w, b = _inputs(x_shape, out, seed, bias=seed == 0)
    q, scale = quantize_weight(w)
    fast = int8_linear(x, q, scale, b)
    assert fast.shape == (*x_shape[:-1], out) and fast.dtype == x.dtype
    torch.testing.assert_close(fast, int8_linear_reference(x, q, scale, b), rtol=1e-6, atol=1e-6)


def test_half_precision_inputs_give_their_dtype():
    x, w, b = _inputs((4, 64), 24, 2)
    q, scale = quantize_weight(w)
    for dtype in (torch.bfloat16, torch.float16):
        got = int8_linear(x.to(dtype), q, scale, b.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got, int8_linear_reference(x.to(dtype), q, scale, b.to(dtype)))


def test_a_row_does_not_depend_on_the_other_rows():
    """Each token's scale is its own and integer sums are exact: a row computed in a call of many rows is bit for
    bit that row computed alone (a verify call computes what one-token steps compute)."""
    x, w, b = _inputs((9, 576), 1536, 3)
    q, scale = quantize_weight(w)
    together = int8_linear(x, q, scale, b)
    for i in range(9):
        assert torch.equal(together[i:i + 1], int8_linear(x[i:i + 1], q, scale, b))


def test_stacked_weights_give_each_projection_its_own_columns():
    x, w, _ = _inputs((5, 64), 48, 4)
    parts = [quantize_weight(p) for p in w.split([16, 24, 8])]
    stacked = int8_linear(x, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None)
    for got, (q, scale) in zip(stacked.split([16, 24, 8], -1), parts):
        assert torch.equal(got, int8_linear(x, q, scale, None))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_float_product_is_within_the_quantization_bound(seed):
    """|y_int8 - x w^T| <= sum_k |x_k| dw + |w_k| dx + dx dw with dw, dx half a step of the row's scale."""
    x, w, _ = _inputs((6, 200), 30, seed, bias=False)
    q, scale = quantize_weight(w)
    _, x_scale = quantize_rows(x)
    dw, dx = scale[None, :] / 2, x_scale / 2
    bound = x.abs() @ torch.ones_like(w).t() * dw + dx * (w.abs().sum(1)[None, :] + x.shape[1] * dw)
    err = (int8_linear(x, q, scale, None) - x @ w.t()).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-6).all())
    assert float(err.max()) > 0  # quantized, not float


def test_runs_under_autograd_but_refuses_a_backward_and_other_devices():
    """A forward that records gradients (a model whose other parameters train) gives the same numbers; a backward
    through the 8-bit product raises instead of a silent zero gradient."""
    x, w, b = _inputs((2, 16), 8, 5)
    q, scale = quantize_weight(w)
    out = int8_linear(x.requires_grad_(), q, scale, b)
    assert out.requires_grad and torch.equal(out, int8_linear(x.detach(), q, scale, b))
    with pytest.raises(RuntimeError, match="no gradient: train the float model"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="run on the CPU"):
        int8_linear(torch.zeros(2, 16, device="meta"), q, scale, b)
    one, one_scale = quantize_weight(torch.randn(4, 1))
    with pytest.raises(ValueError, match="at least 2 inputs"):  # torch._int_mm sums wrongly over one input
        int8_linear(torch.randn(3, 1), one, one_scale, None)
