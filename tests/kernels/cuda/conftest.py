"""Generated Triton kernels compiled for, and run on, a real GPU (every test here is marked `gpu` and skipped
without CUDA). Outputs are NaN-poisoned before every launch and a fallback to the reference fails the test, as
under the interpreter (tests/kernels/triton), but at the shapes the interpreter cannot afford."""
import pytest

from lincompile.testing.kernels import guard_launches


@pytest.fixture(autouse=True)
def _compiled_triton(monkeypatch, request):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LINCOMPILE_KERNELS", "auto")
    guard_launches(monkeypatch, "allow_fallback" in request.fixturenames)


@pytest.fixture
def allow_fallback():
    """Requested by tests that expect the Triton implementation to hand a call to the reference."""
