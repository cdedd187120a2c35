"""What the generated-kernel tests share (under the interpreter in tests/kernels/triton, on CUDA in
tests/kernels/cuda): relative errors that never let a NaN pass, and launches guarded against silent fallbacks."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lincompile.kernels.triton import launch

if TYPE_CHECKING:
    import pytest


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; a NaN (an element a kernel never wrote) fails."""
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def state_rel(state: list[torch.Tensor], ref_state: list[torch.Tensor]) -> float:
    """The worst `rel` over floating state parts (the largest magnitude where the reference part is zero);
    integer parts (positions) must be equal."""
    assert [tuple(s.shape) for s in state] == [tuple(s.shape) for s in ref_state]
    worst = 0.0
    for a, b in zip(state, ref_state):
        if a.is_floating_point():
            worst = max(worst, rel(a, b) if b.abs().max() > 0 else a.abs().max().item())
        else:
            assert torch.equal(a, b)
    return worst


def guard_launches(monkeypatch: pytest.MonkeyPatch, allow_fallback: bool) -> None:
    """NaN-poison every kernel output before launch, and (unless `allow_fallback`) fail on any hand-off of a call
    to the reference inside the Triton implementation."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    if not allow_fallback:
        def refuse(form: object, *args: object) -> None:
            raise AssertionError(f"the Triton implementation fell back to {getattr(form, '__name__', form)}")
        monkeypatch.setattr(launch, "_fallback", refuse)
