"""Frozen configuration dataclasses; each round-trips through JSON and carries a format version."""
from __future__ import annotations

import operator
from dataclasses import dataclass

from lincompile.jsonconfig import JsonConfig
from lincompile.methods.spec import MethodSpec, get_method

CONFIG_VERSION = 1


def site_indices(layers: object) -> tuple[int, ...]:
    """`layers` as site indices: an iterable of ints (a range, a list), not a string, a single int or floats."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be an iterable of site indices (a list or a range), got {layers!r}")
    items = list(layers)
    try:
        return tuple(_whole("a site index", i) for i in items)
    except TypeError:
        raise TypeError(f"layers must hold site indices (ints), got {items!r}") from None


def _whole(name: str, value: object) -> int:
    """`value` as a Python int (numpy's too), refusing bools, floats and strings."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


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
            object.__setattr__(self, "layers", site_indices(self.layers))
        if self.fuel is not None:
            object.__setattr__(self, "fuel", _whole("fuel", self.fuel))
            if self.fuel < 0:
                raise ValueError(f"fuel must be >= 0 (or None), got {self.fuel}")
        if not isinstance(self.strict, bool):
            raise TypeError(f"strict must be True or False, got {self.strict!r}")
        object.__setattr__(self, "seed", _whole("seed", self.seed))

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)
