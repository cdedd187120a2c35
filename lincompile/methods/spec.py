"""`MethodSpec`: one declarative description of an attention method, and the method registry.

Kernels, the ONNX lowering and the runtime all derive from a spec; nothing else names a method's math.
A spec is frozen and round-trips through JSON (`to_json` / `from_json`), which is also the string the
`lincompile::attention` op carries, so a graph is self-describing.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

FEATURE_MAPS = ("identity", "l2", "elu1", "relu")
NORMALIZERS = ("none", "denominator")
LOCAL_BRANCHES = ("none", "relu2", "softmax")
GLOBAL_BRANCHES = ("none", "inclusive", "grouped")
CONVS = ("none", "causal", "centered")
KINDS = ("softmax", "linear")


@dataclass(frozen=True)
class MethodSpec:
    """What one attention method computes.

    kind="softmax" is exact softmax attention (state: a growing KV cache). kind="linear" composes a
    feature map phi on q and k, an optional denominator normalizer, a global branch (all past tokens:
    "inclusive"; completed groups of `group_size` tokens only: "grouped", scaled by a learnable alpha),
    a local branch inside each group, and a depthwise convolution on V over time.
    """

    name: str
    kind: str = "linear"
    feature_map: str = "identity"
    normalizer: str = "none"
    local: str = "none"
    global_branch: str = "inclusive"
    conv: str = "none"
    group_size: int = 64
    conv_kernel: int = 63
    description: str = ""

    def __post_init__(self) -> None:
        for field, allowed in (
            ("kind", KINDS),
            ("feature_map", FEATURE_MAPS),
            ("normalizer", NORMALIZERS),
            ("local", LOCAL_BRANCHES),
            ("global_branch", GLOBAL_BRANCHES),
            ("conv", CONVS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"MethodSpec {self.name!r}: {field}={value!r} is not one of {allowed}")
        if self.group_size < 1 or self.conv_kernel < 1:
            raise ValueError(f"MethodSpec {self.name!r}: group_size and conv_kernel must be >= 1")

    @property
    def causal_safe(self) -> bool:
        """True when position t's output can never depend on tokens after t."""
        return self.conv != "centered"

    def state_parts(self) -> tuple[str, ...]:
        """Names of the recurrent-state tensors, in the order the op takes and returns them."""
        if self.kind == "softmax":
            return ("keys", "values", "key_mask")
        parts: list[str] = []
        if self.global_branch != "none":
            parts.append("state")
            if self.normalizer == "denominator":
                parts.append("normalizer")
        return tuple(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MethodSpec fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MethodSpec":
        return cls.from_dict(json.loads(text))


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Register a method under its name, once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(method: str | MethodSpec) -> MethodSpec:
    """Look a method up by name (or pass a spec through)."""
    if isinstance(method, MethodSpec):
        return method
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


register(MethodSpec(
    name="softmax", kind="softmax", global_branch="none",
    description="exact softmax attention through the lincompile op (proves detection; KV cache state)",
))
register(MethodSpec(
    name="linear-elu", feature_map="elu1", normalizer="denominator", global_branch="inclusive",
    description="causal linear attention, phi(x) = elu(x) + 1, normalized by phi(q).z (Katharopoulos et al. 2020)",
))
