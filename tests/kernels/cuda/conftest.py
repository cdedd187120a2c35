"""Generated Triton kernels compiled for, and run on, a real GPU (every test here is marked `gpu` and skipped
without CUDA). Outputs are NaN-poisoned before every launch and a fallback to the reference fails the test, as
under the interpreter (tests/kernels/triton), but at the shapes the interpreter cannot afford."""
import pytest

from lincompile.kernels.triton import launch


@pytest.fixture(autouse=True)
def _compiled_triton(monkeypatch, request):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LINCOMPILE_KERNELS", "auto")
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    if "allow_fallback" not in request.fixturenames:
        def refuse(form, *args):
            raise AssertionError(f"the Triton implementation fell back to {form.__name__}")
        monkeypatch.setattr(launch, "_fallback", refuse)


@pytest.fixture
def allow_fallback():
    """Requested by tests that expect the Triton implementation to hand a call to the reference."""
