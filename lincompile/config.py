"""Frozen configuration dataclasses; each round-trips through JSON and carries a format version."""
from __future__ import annotations

from dataclasses import dataclass

from lincompile.jsonconfig import JsonConfig
from lincompile.methods.spec import MethodSpec, get_method

CONFIG_VERSION = 1


@dataclass(frozen=True)
class LinearizeConfig(JsonConfig):
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
