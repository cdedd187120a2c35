"""Generated Triton kernels on CPU through Triton's interpreter.

Every test here runs with TRITON_INTERPRET=1 and LINCOMPILE_KERNELS=triton set by a fixture (and restored after,
so other test files never see them; Triton reads TRITON_INTERPRET when a kernel is decorated, and the generated
modules are built lazily, keyed by that mode). Outputs are NaN-poisoned before each launch, and a fallback to
the reference inside the Triton implementation fails the test unless it requests `allow_fallback`.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from lincompile.kernels.linear_attention import reference
from lincompile.kernels.triton.plan import unsupported_reason
from lincompile.methods.params import random_params
from lincompile.methods.spec import MethodSpec, get_method, methods
from lincompile.testing.kernels import guard_launches, rel, state_rel

BATCH, HEADS, KV_HEADS, DK, DV = 2, 4, 2, 8, 6
SCALE = 0.35
#: Registered methods the generator covers, plus specs no registered method uses: a softmax local branch, and
#: augmented with a global cap (reached from position 8 with spec_of's groups of 4).
SUPPORTED = [name for name in methods() if unsupported_reason(get_method(name)) is None]
EXTRA = {"test-softmax-local": MethodSpec("test-softmax-local", feature_map="elu1", local="softmax",
                                          global_branch="grouped", conv="causal"),
         "test-capped-augmented": MethodSpec("test-capped-augmented", feature_map="l2", local="relu2",
                                             global_branch="grouped", conv="causal", global_cap=6)}
GENERATED = SUPPORTED + list(EXTRA)


def pytest_generate_tests(metafunc):
    if "generated_method" in metafunc.fixturenames:
        metafunc.parametrize("generated_method", GENERATED)


@pytest.fixture(autouse=True)
def _interpreted_triton(monkeypatch, request):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LINCOMPILE_KERNELS", "triton")
    guard_launches(monkeypatch, "allow_fallback" in request.fixturenames)


@pytest.fixture
def allow_fallback():
    """Requested by tests that expect the Triton implementation to hand a call to the reference."""


def spec_of(name: str, group: int = 4, kernel: int = 5) -> MethodSpec:
    """The method with a small group and conv kernel, so short inputs cross many boundaries."""
    return dataclasses.replace(EXTRA.get(name) or get_method(name), group_size=group, conv_kernel=kernel)


def make(spec: MethodSpec, t: int, seed: int = 0, pad: int = 0, heads: int = HEADS, kv_heads: int = KV_HEADS,
         dk: int = DK, dv: int = DV) -> SimpleNamespace:
    """fp64 q, k, v, params (nonzero alpha and conv taps) and a mask left-padding row 1 by `pad` tokens (their
    keys and values NaN: no form may read them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, heads, t, dk, generator=g, dtype=torch.float64)
    k = torch.randn(BATCH, kv_heads, t, dk, generator=g, dtype=torch.float64)
    v = torch.randn(BATCH, kv_heads, t, dv, generator=g, dtype=torch.float64)
    mask = torch.ones(BATCH, t, dtype=torch.bool)
    mask[1, :pad] = False
    k, v = (poison_padding(x, mask) for x in (k, v))
    params = [p.double() for p in random_params(spec, heads, kv_heads, dk, dv, seed)]
    return SimpleNamespace(spec=spec, q=q, k=k, v=v, mask=mask, params=params)


def poison_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d] with NaN at the tokens `mask` [B, T] marks as padding."""
    return torch.where(mask[:, None, :, None], x, float("nan"))


def cast(tensors, dtype=torch.float32):
    """Floating tensors to `dtype` (the int64 position part stays)."""
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def prefilled_state(spec: MethodSpec, t: int, seed: int):
    """A nonzero fp64 state after t tokens (row 1 left-padded by 2), from the reference."""
    c = make(spec, t, seed=seed, pad=2)
    return reference.attention(c.q, c.k, c.v, c.mask, None, [], c.params, spec, SCALE, True)[1], c.params


@pytest.fixture
def kit():
    """The helpers above as one fixture (test modules cannot import a conftest under --import-mode=importlib)."""
    return SimpleNamespace(make=make, spec_of=spec_of, cast=cast, poison_padding=poison_padding, rel=rel,
                           state_rel=state_rel, prefilled_state=prefilled_state, SCALE=SCALE, DV=DV, EXTRA=EXTRA,
                           SUPPORTED=SUPPORTED)


def _one_form(request, monkeypatch, launcher: str):
    """Every launch in the form request.param names ("sequential": kernels walking the chunks, "parallel": the
    chunk-parallel ones, which decay never takes), counting the parallel launches of `launch.<launcher>`."""
    from lincompile.kernels.triton import launch

    launches = []
    real = getattr(launch, launcher)
    monkeypatch.setattr(launch, launcher, lambda *a: launches.append(1) or real(*a))
    monkeypatch.setattr(launch, "PARALLEL_MIN_CHUNKS", 1 if request.param == "parallel" else 10 ** 9)
    return request.param, launches


@pytest.fixture(params=["sequential", "parallel"])
def prefill_form(request, monkeypatch):
    """Runs a test with every multi-token prefill in one form: `chunked_fwd`, or `chunk_sums` + `chunk_outputs`.
    Yields (form, the list the parallel launches append to)."""
    yield _one_form(request, monkeypatch, "_parallel_prefill")


@pytest.fixture(params=["sequential", "parallel"])
def backward_form(request, monkeypatch):
    """Runs a test with every generated backward in one form: `bwd_dq` / `bwd_dkv`, or the chunk-parallel
    kernels. Yields (form, the list the parallel launches append to)."""
    yield _one_form(request, monkeypatch, "_parallel_backward")
