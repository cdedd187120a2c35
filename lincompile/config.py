"""Frozen configuration dataclasses; each round-trips through JSON and carries a format version."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from lincompile.methods.spec import MethodSpec, get_method

CONFIG_VERSION = 1


@dataclass(frozen=True)
class LinearizeConfig:
    """What `optimize` does to a model.

    method: a registered method name or a full `MethodSpec`; layers: site indices to convert (None = all;
    the others become exact softmax with a KV cache); fuel: stop rewriting after N sites (debugging);
    strict: raise if any softmax that looks like attention matched no pattern; seed: random features
    (Performer) of site i are drawn from seed + i.
    """

    method: str | MethodSpec = "augmented"
    layers: tuple[int, ...] | None = None
    fuel: int | None = None
    strict: bool = False
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):
            object.__setattr__(self, "method", MethodSpec.from_dict(self.method))
        get_method(self.method)  # validates the name early, with the list of known methods
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.fuel is not None and self.fuel < 0:
            raise ValueError("fuel must be >= 0")

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method.to_dict() if isinstance(self.method, MethodSpec) else self.method
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearizeConfig":
        version = data.get("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(f"config version {version} is newer than this lincompile ({CONFIG_VERSION}); upgrade lincompile")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LinearizeConfig fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "LinearizeConfig":
        return cls.from_dict(json.loads(text))
