"""Shared inputs for the reference tests: GQA shapes (4 query heads, 2 KV heads), fresh random inputs and
nonzero parameters (random conv taps including the future ones, alpha 1, random decays)."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from lincompile.methods.params import random_params
from lincompile.methods.spec import MethodSpec, get_method, methods

BATCH, HEADS, KV_HEADS, DK, DV = 2, 4, 2, 8, 6
SCALE = 0.35
#: Spec combinations no registered method uses, tested alongside the registry.
EXTRA = {spec.name: spec for spec in (
    MethodSpec("test-softmax-local", feature_map="elu1", local="softmax", global_branch="grouped"),
    MethodSpec("test-decay-normalized-local", feature_map="elu1", normalizer="denominator", local="relu2",
               decay=True, conv="causal"),
    MethodSpec("test-quadratic-yoso", kind="quadratic", feature_map="l2", normalizer="denominator", local="yoso",
               global_branch="none"),
    MethodSpec("test-softmax-sinks", kind="softmax", global_branch="none", sinks=True),
    MethodSpec("test-capped-augmented", feature_map="l2", local="relu2", global_branch="grouped", conv="causal",
               global_cap=6),
)}
CAUSAL = [name for name in methods() if get_method(name).causal_safe] + list(EXTRA)


def pytest_generate_tests(metafunc):
    """`causal_method`: every decodable method (registered + EXTRA); `any_method`: every method."""
    if "causal_method" in metafunc.fixturenames:
        metafunc.parametrize("causal_method", CAUSAL)
    if "any_method" in metafunc.fixturenames:
        metafunc.parametrize("any_method", methods() + list(EXTRA))


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference runs many tiny ops: OpenMP fan-out only adds latency (a lot on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(method: str | MethodSpec, group: int = 4, kernel: int = 5) -> MethodSpec:
    """The method (registered or in EXTRA) with a small group and conv kernel, so short inputs cross many
    group and window boundaries."""
    spec = EXTRA.get(method) or get_method(method) if isinstance(method, str) else method
    return dataclasses.replace(spec, group_size=group, conv_kernel=kernel)


def make_case(spec: MethodSpec, t: int, dtype: torch.dtype = torch.float64, seed: int = 0,
              padding: bool = True) -> SimpleNamespace:
    """q, k, v, key mask (row 1 left-padded by 2 and, when long enough, padded at token 5) and params."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, t, DK, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(BATCH, KV_HEADS, t, DK, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(BATCH, KV_HEADS, t, DV, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(BATCH, t, dtype=torch.bool)
    if padding:
        mask[1, :min(2, t - 1)] = False
        if t > 6:
            mask[1, 5] = False
    params = [p.to(dtype) for p in random_params(spec, HEADS, KV_HEADS, DK, DV, seed)]
    return SimpleNamespace(spec=spec, q=q, k=k, v=v, mask=mask, params=params, scale=SCALE)


@pytest.fixture
def case():
    """make_case as a fixture: case(spec, t, dtype=..., seed=..., padding=...)."""
    return make_case


@pytest.fixture
def small_spec():
    """small as a fixture: small_spec(name, group=4, kernel=5)."""
    return small


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest elementwise difference over matching tensors (shapes and dtypes must match); a NaN on either side
    counts as an infinite difference (Python's max would skip it)."""
    assert [(x.shape, x.dtype) for x in a] == [(y.shape, y.dtype) for y in b]
    return max([0.0] + [(x.double() - y.double()).abs().nan_to_num(nan=math.inf).max().item()
                        for x, y in zip(a, b) if x.numel()])


@pytest.fixture
def diff():
    return max_diff
