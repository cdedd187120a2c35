"""Shared pieces of the ONNX site tests: one site template of fresh shapes and the proto renaming they splice with."""
from __future__ import annotations

import dataclasses

import torch

from lincompile.backends import onnx_sites
from lincompile.kernels.linear_attention import reference
from lincompile.methods.params import random_params
from lincompile.methods.spec import MethodSpec, get_method

B, H, HKV, D = 2, 4, 2, 16


#: the paper's method with small groups and a global cap, so short inputs cross many groups and reach the cap
CAPPED = dataclasses.replace(get_method("augmented"), name="augmented-capped", group_size=4, global_cap=6)


def site_template(method: str | MethodSpec, chunk: int | None = None
                  ) -> tuple[onnx_sites.Template, MethodSpec, list[torch.Tensor], list[torch.Tensor]]:
    """(a causal site template with a key mask, GQA H:HKV and head dim D; its spec, random params, initial state)."""
    spec = get_method(method)
    params = random_params(spec, H, HKV, D, D, seed=1)
    state = reference.init_state(spec, B, HKV, D, D)
    gen = torch.Generator().manual_seed(0)
    examples = [torch.rand(B, heads, 5, D, generator=gen) for heads in (H, HKV, HKV)] + [torch.ones(B, 5).bool()]
    template = onnx_sites.Template(spec.to_json(), D ** -0.5, True, True, len(state), len(params),
                                   tuple(examples + state + params), chunk)
    return template, spec, params, state


def renamed(proto, name):
    """A copy of an ONNX value info or initializer under `name`."""
    copied = type(proto)()
    copied.CopyFrom(proto)
    copied.name = name
    return copied
