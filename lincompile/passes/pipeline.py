"""The default pipeline, as one readable list, and how a config turns into passes."""
from __future__ import annotations

import lincompile.passes.cleanup  # noqa: F401  (registers normalize, cleanup)
import lincompile.passes.detect_attention  # noqa: F401  (registers detect_attention)
from lincompile.config import LinearizeConfig
from lincompile.passes.base import Pass, registered_passes
from lincompile.passes.linearize import Linearize

DEFAULT_PIPELINE = ("normalize", "detect_attention", "linearize", "cleanup")


def build_pipeline(config: LinearizeConfig, names: tuple[str, ...] = DEFAULT_PIPELINE) -> list[Pass]:
    """Instantiate `names` in order; `linearize` takes its options from `config`."""
    known = registered_passes()
    passes: list[Pass] = []
    for name in names:
        if name not in known:
            raise ValueError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(known))}")
        if name == Linearize.name:
            passes.append(Linearize(config.method, config.layers, config.fuel, config.seed))
        else:
            passes.append(known[name]())
    return passes
