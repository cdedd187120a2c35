"""The kernel registry picks the highest-priority implementation that supports a call; the reference is last."""
import pytest
import torch

from lincompile.kernels import registry
from lincompile.methods.spec import get_method


def test_priority_and_fallback(monkeypatch):
    monkeypatch.setattr(registry, "_ENTRIES", list(registry._ENTRIES))
    fast = registry.KernelEntry("fast-elu", registry.reference.attention,
                                lambda spec, device: spec.name == "linear-elu", priority=10)
    registry.register_kernel(fast)
    assert registry.select(get_method("linear-elu"), torch.device("cpu")).name == "fast-elu"
    assert registry.select(get_method("softmax"), torch.device("cpu")).name == "reference"
    with pytest.raises(ValueError, match="already registered"):
        registry.register_kernel(fast)
