"""What the methods compute, written out by hand: the paper's augmented form, the kernelized baselines,
padding, bidirectional and cross-attention, constant-size state, and the errors."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lincompile.kernels.linear_attention import reference
from lincompile.methods.spec import get_method, methods


def _expand(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


@pytest.mark.parametrize("cap", [0, 6])
def test_augmented_is_the_papers_formula(cap, case, small_spec):
    """o_t = sum_{i in group(t), i<=t} relu(q^.k^)^2 v_i + alpha q^ S_completed + sum_lag w[K//2-lag] v_(t-lag);
    with global_cap, alpha * min(1, cap / n) where S_completed sums n tokens."""
    spec = dataclasses.replace(small_spec("augmented", group=4, kernel=5), global_cap=cap)
    c = case(spec, 11, seed=7, padding=False)
    c.params[0] = torch.tensor(0.7, dtype=torch.float64)  # alpha
    out, _ = reference.attention(c.q, c.k, c.v, None, None, [], c.params, spec, c.scale, True)
    alpha, taps = c.params
    q, k, v = F.normalize(c.q, dim=-1), F.normalize(_expand(c.k, 4), dim=-1), _expand(c.v, 4)
    expected = torch.zeros_like(out)
    for t in range(11):
        start = t // 4 * 4
        scores = torch.einsum("bhd,bhsd->bhs", q[:, :, t], k[:, :, start:t + 1])
        expected[:, :, t] += torch.einsum("bhs,bhsd->bhd", F.relu(scores) ** 2, v[:, :, start:t + 1])
        state = torch.einsum("bhsd,bhse->bhde", k[:, :, :start], v[:, :, :start])
        weight = alpha * min(1.0, cap / start) if cap and start else alpha
        expected[:, :, t] += weight * torch.einsum("bhd,bhde->bhe", q[:, :, t], state)
        for lag in range(min(2, t) + 1):
            expected[:, :, t] += taps[None, :, 2 - lag, None] * v[:, :, t - lag]
    assert torch.allclose(out, expected, atol=1e-12)


def _cos(q, k):
    return torch.einsum("bhtd,bhsd->bhts", F.normalize(q, dim=-1), F.normalize(k, dim=-1))


KERNELS = {  # name -> pair weight w(q, k, scale) [B, H, T, S] of a normalized inclusive method
    "linear-elu": lambda q, k, s: torch.einsum("bhtd,bhsd->bhts", F.elu(q) + 1, F.elu(k) + 1),
    "linear-relu": lambda q, k, s: torch.einsum("bhtd,bhsd->bhts", F.relu(q), F.relu(k)),
    "taylor": lambda q, k, s: 1 + s * (q @ k.mT) + (s * (q @ k.mT)) ** 2 / 2,
    "hedgehog": lambda q, k, s: torch.einsum("bhtd,bhsd->bhts", *[torch.cat([x.softmax(-1), (-x).softmax(-1)], -1)
                                                               for x in (q, k)]),
    "castling": lambda q, k, s: 0.5 + _cos(q, k) / math.pi,
    "cosformer": lambda q, k, s: torch.einsum("bhtd,bhsd->bhts", F.relu(q), F.relu(k)) * torch.cos(
        math.pi / 2 * (torch.arange(q.shape[2])[:, None] - torch.arange(k.shape[2])[None]) / 4096),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernelized_methods_match_their_formula(name, case):
    spec = get_method(name)
    c = case(spec, 9, seed=1, padding=False)
    if name == "hedgehog":  # the initial MLP (identity): phi(x) = [softmax(x), softmax(-x)]
        c.params = [torch.eye(8, dtype=torch.float64).expand(2, 8, 8), torch.zeros(2, 8, dtype=torch.float64)]
    if name == "castling":  # without its conv
        c.params = [torch.zeros(4, spec.conv_kernel, dtype=torch.float64)]
    out, _ = reference.attention(c.q, c.k, c.v, None, None, [], c.params, spec, c.scale, True)
    weights = KERNELS[name](c.q, _expand(c.k, 4), c.scale).tril()
    den = weights.sum(-1, keepdim=True).clamp_min(1e-6)  # relu features can leave a row with no weight
    assert torch.allclose(out, weights @ _expand(c.v, 4) / den, atol=1e-12)


def test_retnet_decays_per_kv_head(case):
    spec = get_method("retnet")
    c = case(spec, 9, seed=2, padding=False)
    out, _ = reference.attention(c.q, c.k, c.v, None, None, [], c.params, spec, c.scale, True)
    gamma = _expand(torch.sigmoid(c.params[0])[None, :, None, None], 4)
    lag = (torch.arange(9)[:, None] - torch.arange(9)[None]).clamp_min(0)
    weights = (c.scale * c.q @ _expand(c.k, 4).mT * gamma ** lag).tril()
    assert torch.allclose(out, weights @ _expand(c.v, 4), atol=1e-12)


def test_square_and_yoso_kernels(case, small_spec):
    c = case(get_method("square"), 9, seed=3, padding=False)
    out, _ = reference.attention(c.q, c.k, c.v, None, None, [], [], c.spec, c.scale, True)
    weights = (F.relu(_cos(c.q, _expand(c.k, 4))) ** 2).tril()
    assert torch.allclose(out, weights @ _expand(c.v, 4), atol=1e-12)
    spec = small_spec("yoso", group=16)  # one group: only the local YOSO term
    out, _ = reference.attention(c.q, c.k, c.v, None, None, [], [torch.tensor(1.0)], spec, c.scale, True)
    weights = ((1 - torch.arccos(_cos(c.q, _expand(c.k, 4)).clamp(-1, 1)) / math.pi) ** 8).tril()
    assert torch.allclose(out, weights @ _expand(c.v, 4), atol=1e-6)


def test_softmax_sinks_join_the_denominator(case):
    """GPT-OSS's form: softmax over [scores, sink_h], the sink's column dropped; a decode step through the KV cache
    gives the same last row."""
    spec = dataclasses.replace(get_method("softmax"), sinks=True)
    c = case(spec, 7, seed=4, padding=False)
    sinks = torch.randn(4, dtype=torch.float64)
    out, state = reference.attention(c.q, c.k, c.v, None, None, [], [sinks], spec, c.scale, True)
    scores = (c.q @ _expand(c.k, 4).transpose(-1, -2)) * c.scale
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -math.inf)
    combined = torch.cat([scores, sinks.reshape(1, 4, 1, 1).expand(2, 4, 7, 1)], -1)
    want = torch.softmax(combined, -1)[..., :-1] @ _expand(c.v, 4)
    assert torch.allclose(out, want, atol=1e-12)
    assert not torch.allclose(out, reference.attention(c.q, c.k, c.v, None, None, [], [], get_method("softmax"),
                                                       c.scale, True)[0], atol=1e-3)
    _, past = reference.attention(c.q[:, :, :6], c.k[:, :, :6], c.v[:, :, :6], None, None, [], [sinks], spec,
                                  c.scale, True)
    step, _ = reference.recurrent(c.q[:, :, 6:], c.k[:, :, 6:], c.v[:, :, 6:], None, past, [sinks], spec, c.scale)
    assert torch.allclose(step, want[:, :, 6:], atol=1e-12)


def test_padding_takes_no_position(causal_method, case, small_spec, diff):
    """A padded row computes, at its real tokens, what the row without its padding computes."""
    c = case(small_spec(causal_method), 14, seed=8)
    out, state = reference.attention(c.q, c.k, c.v, c.mask, None, [], c.params, c.spec, c.scale, True)
    keep = c.mask[1]
    row = [x[1:, :, keep] for x in (c.q, c.k, c.v)]
    alone, alone_state = reference.attention(*row, None, None, [], c.params, c.spec, c.scale, True)
    assert diff([out[1:, :, keep]], [alone]) < 1e-10
    if not c.spec.has_kv_cache:
        assert diff([s[1:] for s in state], alone_state) < 1e-10


def _forms(c):
    """The three causal forms on case c's mask from the initial state, each a function of (q, k, v)."""
    return {"attention": lambda q, k, v: reference.attention(q, k, v, c.mask, None, [], c.params, c.spec, c.scale,
                                                             True),
            "chunked": lambda q, k, v: reference.chunked(q, k, v, c.mask, None, [], c.params, c.spec, c.scale, True,
                                                         3),
            "recurrent": lambda q, k, v: reference.recurrent(q, k, v, c.mask, [], c.params, c.spec, c.scale)}


@pytest.mark.parametrize("form", ["attention", "chunked", "recurrent"])
def test_nonfinite_padding_reaches_nothing(causal_method, form, case, small_spec, diff):
    """Padding keys and values holding inf and NaN change no output (a padding query's included), no state (a KV
    cache holds zeros there) and no gradient; a NaN padding query changes no real token's output."""
    c = case(small_spec(causal_method), 14, seed=8)
    run = _forms(c)[form]
    pad = ~c.mask[:, None, :, None]
    weight = torch.randn(c.q.shape[:3] + (c.v.shape[-1],), dtype=c.q.dtype).masked_fill(pad, 0.0)
    junk_k, junk_v = c.k.masked_fill(pad, float("inf")), c.v.masked_fill(pad, float("nan"))
    results = []
    for k, v in ((c.k, c.v), (junk_k, junk_v)):
        q, k, v = (x.clone().requires_grad_() for x in (c.q, k, v))
        out, state = run(q, k, v)
        (out * weight).sum().backward()
        results.append(([out.detach()], [s.detach() for s in state], [q.grad, k.grad, v.grad]))
    for clean, junk in zip(*results):
        assert diff(clean, junk) == 0.0
    out, _ = run(c.q.masked_fill(pad, float("nan")), junk_k, junk_v)
    real = c.mask[:, None, :, None].expand_as(out)
    assert diff([results[0][0][0][real]], [out[real]]) == 0.0


@pytest.mark.parametrize("name", [n for n in methods() if not get_method(n).has_kv_cache])
def test_bidirectional_and_cross_attention_ignore_padding(name, case, small_spec):
    spec = small_spec(name)
    c = case(spec, 7, seed=9)
    q = c.q[:, :, :5]  # 5 queries over 7 keys: cross-attention shapes
    out, state = reference.attention(q, c.k, c.v, c.mask, None, [], c.params, spec, c.scale, False)
    assert out.shape == (2, 4, 5, 6) and torch.isfinite(out).all()
    assert [s.shape for s in state] == [s.shape for s in reference.init_state(spec, 2, 2, 8, 6)]
    pad = ~c.mask[:, None, :, None]
    noisy = [c.k.masked_fill(pad, float("inf")), c.v.masked_fill(pad, float("nan"))]
    again, _ = reference.attention(q, *noisy, c.mask, None, [], c.params, spec, c.scale, False)
    assert torch.allclose(out, again, atol=1e-12)


def test_bidirectional_linear_and_linformer_formulas(case):
    c = case(get_method("linear-elu"), 7, seed=10, padding=False)
    out, _ = reference.attention(c.q, c.k, c.v, None, None, [], [], c.spec, c.scale, False)
    weights = (F.elu(c.q) + 1) @ (F.elu(_expand(c.k, 4)) + 1).mT
    assert torch.allclose(out, weights @ _expand(c.v, 4) / weights.sum(-1, keepdim=True), atol=1e-12)
    spec = get_method("linformer")
    c = case(spec, 7, seed=10, padding=False)
    out, _ = reference.attention(c.q, c.k, c.v, None, None, [], c.params, spec, c.scale, False)
    keys, values = (torch.einsum("ps,bhsd->bhpd", e[:, :7], _expand(x, 4)) for e, x in zip(c.params, (c.k, c.v)))
    assert torch.allclose(out, torch.softmax(c.scale * c.q @ keys.mT, -1) @ values, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in methods() if not get_method(n).has_kv_cache and n != "linformer"])
def test_linear_state_is_constant_size(name, case, small_spec):
    spec = small_spec(name)
    shapes = []
    for t in (5, 40):
        c = case(spec, t, dtype=torch.bfloat16, seed=t)
        out, state = reference.attention(c.q, c.k, c.v, c.mask, None, [], c.params, spec, c.scale, True)
        assert out.dtype == torch.bfloat16
        assert all(s.dtype in (torch.float32, torch.int64) for s in state)
        shapes.append([s.shape for s in state])
    assert shapes[0] == shapes[1] == [s.shape for s in reference.init_state(spec, 2, 2, 8, 6)]


def test_errors_are_named(case):
    c = case(get_method("linformer"), 5)
    with pytest.raises(ValueError, match="not causal-capable"):
        reference.attention(c.q, c.k, c.v, None, None, [], c.params, c.spec, c.scale, True)
    c = case(get_method("augmented-centered"), 5)
    for form in (reference.chunked, reference.recurrent):
        extra = (True,) if form is reference.chunked else ()
        with pytest.raises(ValueError, match="future tokens"):
            form(c.q, c.k, c.v, None, *([None] if extra else []), [], c.params, c.spec, c.scale, *extra)
    c = case(get_method("augmented"), 5)
    with pytest.raises(ValueError, match=r"alpha.*conv_weight"):
        reference.attention(c.q, c.k, c.v, None, None, [], [], c.spec, c.scale, True)
