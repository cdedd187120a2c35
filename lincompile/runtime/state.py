"""Per-layer recurrent state of a linearized model.

`RecurrentState.tensors` maps graph input names `past_key_values.{site}.{part}` to tensors; `length` is how many
tokens the state has absorbed (it offsets position ids). For linear methods every tensor's shape is
independent of `length`; only exact-softmax sites (hybrids) keep a growing KV cache. `tensors` may hold
onnxruntime OrtValues when the state comes from an `OrtModel`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RecurrentState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}

    def clone(self) -> "RecurrentState":
        return RecurrentState({k: v.clone() for k, v in self.tensors.items()}, self.length)

    def to(self, device: torch.device | str) -> "RecurrentState":
        return RecurrentState({k: v.to(device) for k, v in self.tensors.items()}, self.length)
