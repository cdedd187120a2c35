"""Feature maps: the kernels they stand for."""
import math

import pytest
import torch

from lincompile.methods.feature_maps import closed_form_dots, features, local_kernel
from lincompile.methods.params import init_params
from lincompile.methods.spec import MethodSpec, get_method


def _pair(name, params=None, scale=0.5, dim=8, positions=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 1, 2, dim, generator=g, dtype=torch.float64)
    phi = features(x, get_method(name), params or {}, positions, scale)[0, 0, 0]
    return x[0, 0, 0], phi[0] @ phi[1]


def test_exact_kernels():
    x, dot = _pair("taylor")
    s = 0.5 * x[0] @ x[1]
    assert torch.allclose(dot, 1 + s + s * s / 2)
    x, dot = _pair("castling")
    assert torch.allclose(dot, 0.5 + torch.cosine_similarity(x[0], x[1], dim=0) / math.pi)
    x, dot = _pair("retnet")
    assert torch.allclose(dot, 0.5 * x[0] @ x[1])
    x, dot = _pair("cosformer", positions=torch.tensor([[3, 1000]]))
    assert torch.allclose(dot, x[0].relu() @ x[1].relu() * math.cos(math.pi / 2 * 997 / 4096))


def test_closed_form_dots_equal_the_features_dots():
    """Taylor's dots without its 1 + d + d^2 features: the same numbers (fp64), every query against every key;
    the other maps have no closed form here."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 2, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)
    spec = get_method("taylor")
    phi_q, phi_k = features(q, spec, {}, None, 0.3), features(k[:, :, None], spec, {}, None, 0.3)[:, :, 0]
    dots = closed_form_dots(q, k, spec, 0.3)
    assert dots.shape == (2, 3, 2, 5, 7)
    assert torch.allclose(dots, torch.einsum("bhgtf,bhnf->bhgtn", phi_q, phi_k), rtol=1e-12, atol=1e-12)
    assert closed_form_dots(q, k, get_method("linear-elu"), 0.3) is None


def test_performer_approximates_exp():
    spec = MethodSpec("p", feature_map="performer", normalizer="denominator", num_features=20000)
    omega = init_params(spec, 1, 1, 4, 4, seed=1)[0][1].double()
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(1, 1, 1, 2, 4, generator=g, dtype=torch.float64)
    phi = features(x, spec, {"performer_features": omega}, None, 1.0)[0, 0, 0]
    assert abs((phi[0] @ phi[1]).item() / math.exp(x[0, 0, 0, 0] @ x[0, 0, 0, 1]) - 1) < 0.03


def test_local_kernels():
    dots = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    relu2 = MethodSpec("r", feature_map="l2", local="relu2", global_branch="none")
    assert torch.equal(local_kernel(dots, relu2), torch.tensor([0, 0, 0, 0.25, 1], dtype=torch.float64))
    yoso = MethodSpec("y", feature_map="l2", local="yoso", global_branch="none")
    values = local_kernel(dots, yoso)
    # |cos| is clamped to 1 - 1e-6 to keep the gradient finite: the kernel tops out at 0.9964, not 1
    assert values[0] < 1e-20 and abs(values[2] - 0.5 ** 8) < 1e-12 and 0.996 < values[-1] < 1


def _favor_exact(q, k, v, omega, scale):
    """FAVOR+ attention with the same random features, computed in fp64 log space (no under/overflow): the weight of
    key j for query i is sum_m exp(w_m.q + w_m.k - |k|^2/2) up to a factor per query, normalized over j <= i."""
    qs, ks = q.double() * math.sqrt(scale), k.double() * math.sqrt(scale)
    pq = torch.einsum("bhtd,hmd->bhtm", qs, omega.double())
    pk = torch.einsum("bhtd,hmd->bhtm", ks, omega.double()) - 0.5 * ks.square().sum(-1, keepdim=True)
    logw = torch.logsumexp(pq[:, :, :, None, :] + pk[:, :, None, :, :], -1)  # [B, H, T, T]
    t = q.shape[2]
    logw = logw.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logw, -1) @ v.double()


@pytest.mark.parametrize("norm", [8.0, 13.0])
def test_performer_keeps_its_precision_at_the_norms_of_real_heads(norm):
    """SmolLM2's scaled queries and keys reach |x| = 6 to 11: exp(w.x - |x|^2/2) is then e^-18 and less, a sixth of
    some layers' denominators fell under the 1e-6 floor and those outputs shrank. Queries are now shifted by their
    largest feature (their scale cancels) and the floor is float32's smallest normal: every form of the op agrees
    with FAVOR+ computed in fp64 log space. At |x| = 8 the floor decides; at 13 a query's product with a key
    passes under float32's range unless the query is shifted."""
    from lincompile.kernels.linear_attention import reference
    from lincompile.methods.params import named_params

    spec, d, t, scale = get_method("performer"), 16, 40, 0.25
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, t, d, generator=g) for _ in range(2))
    q, k = (x / x.norm(dim=-1, keepdim=True) * norm / math.sqrt(scale) for x in (q, k))
    v = torch.randn(1, 2, t, d, generator=g)
    params = [value for _, value, _ in init_params(spec, 2, 2, d, d)]
    omega = named_params(spec, params, torch.float32)["performer_features"]
    exact = _favor_exact(q, k, v, omega, scale)
    state = reference.init_state(spec, 1, 2, d, d)
    parallel, _ = reference.attention(q, k, v, None, None, state, params, spec, scale, True)
    chunked, _ = reference.chunked(q, k, v, None, None, state, params, spec, scale, True, 16)
    recurrent, _ = reference.recurrent(q, k, v, None, state, params, spec, scale)
    for out in (parallel, chunked, recurrent):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-4
