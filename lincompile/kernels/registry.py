"""Which implementation serves `lincompile::attention` for a given spec and device.

Each entry is (name, impl, supports, priority); the plain PyTorch reference is always registered with
the lowest priority and supports everything, so every device always has an implementation.
The generated Triton kernels (`lincompile.kernels.triton`) serve the specs they cover on CUDA, and on CPU under
`LINCOMPILE_KERNELS=triton` with TRITON_INTERPRET=1; `LINCOMPILE_KERNELS=reference` forces the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lincompile.kernels.linear_attention import reference
from lincompile.kernels.triton import launch as triton_launch
from lincompile.methods.spec import MethodSpec

AttentionImpl = Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass(frozen=True)
class KernelEntry:
    name: str
    impl: AttentionImpl
    supports: Callable[[MethodSpec, torch.device], bool]
    priority: int


_ENTRIES: list[KernelEntry] = [
    KernelEntry("reference", reference.attention, lambda spec, device: True, priority=-1_000_000),
]


def register_kernel(entry: KernelEntry) -> None:
    """Add an implementation; higher priority wins among those that support the call."""
    if any(e.name == entry.name for e in _ENTRIES):
        raise ValueError(f"kernel {entry.name!r} is already registered")
    _ENTRIES.append(entry)
    _ENTRIES.sort(key=lambda e: -e.priority)


def select(spec: MethodSpec, device: torch.device) -> KernelEntry:
    """The highest-priority implementation that supports this spec on this device (the reference alone under
    LINCOMPILE_KERNELS=reference)."""
    forced = triton_launch.kernel_mode() == "reference"
    for entry in _ENTRIES:
        if forced and entry.name != "reference":
            continue
        if entry.supports(spec, device):
            return entry
    raise RuntimeError("no attention kernel registered")  # unreachable: the reference supports all


register_kernel(KernelEntry("triton", triton_launch.attention, triton_launch.supports, priority=100))
