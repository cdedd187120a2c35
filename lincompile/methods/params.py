"""The learnable (and fixed random) parameters of a method, in the exact order the op's `params` list takes them.

Order and shapes (H query heads, Hkv KV heads, d head_dim; each present only when the spec uses it):

  name                 shape        trainable  init
  performer_features   [Hkv, m, d]  no         orthogonal rows with chi(d) norms from `seed` (m = num_features)
  hedgehog_weight      [Hkv, d, d]  yes        identity
  hedgehog_bias        [Hkv, d]     yes        zeros
  linformer_keys       [p, n]       yes        N(0, 2/(p+n)) from `seed` (p = num_features, n = horizon)
  linformer_values     [p, n]       yes        N(0, 2/(p+n)) from `seed`
  decay                [Hkv]        yes        logit of gamma_h = 1 - 2^(-5-h) (RetNet); gamma = sigmoid(decay)
  alpha                []           yes        0 (grouped global branch)
  conv_weight          [H, K]       yes        0; tap j weighs the token K//2 - j positions back (j > K//2: future)
  sinks                [H]          yes        0; softmax only: the model's own attention-sink logits (GPT-OSS)

Feature-map parameters and decays are per KV head, because phi(k) and the state S are per KV head: one
Hedgehog MLP / Performer feature set serves a KV head and all its query heads. Conv filters are per query head
(the paper convolves the GQA-expanded V, one filter per head); the conv window stays per KV head.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lincompile.methods.spec import MethodSpec

ParamLayout = list[tuple[str, tuple[int, ...], bool]]


def param_layout(spec: MethodSpec, heads: int, kv_heads: int, head_dim: int, v_head_dim: int) -> ParamLayout:
    """(name, shape, trainable) of every parameter, in op order."""
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    layout: ParamLayout = []
    if spec.feature_map == "performer":
        layout.append(("performer_features", (kv_heads, spec.num_features, head_dim), False))
    if spec.feature_map == "hedgehog":
        layout += [("hedgehog_weight", (kv_heads, head_dim, head_dim), True),
                   ("hedgehog_bias", (kv_heads, head_dim), True)]
    if spec.kind == "projected":
        layout += [("linformer_keys", (spec.num_features, spec.horizon), True),
                   ("linformer_values", (spec.num_features, spec.horizon), True)]
    if spec.decay:
        layout.append(("decay", (kv_heads,), True))
    if spec.global_branch == "grouped":
        layout.append(("alpha", (), True))
    if spec.conv != "none":
        layout.append(("conv_weight", (heads, spec.conv_kernel), True))
    if spec.sinks:
        layout.append(("sinks", (heads,), True))
    return layout


@functools.lru_cache(maxsize=256)
def param_names(spec: MethodSpec) -> tuple[str, ...]:
    """Parameter names in op order (shapes do not matter for the names)."""
    return tuple(name for name, _, _ in param_layout(spec, 1, 1, 1, 1))


#: Parameters that only weigh outputs: the recurrent state's updates (and so `commit`) never read them.
OUTPUT_ONLY_PARAMS = frozenset({"alpha", "conv_weight", "sinks"})


def state_update_reads_params(spec: MethodSpec) -> bool:
    """Whether absorbing tokens into the state reads any parameter (feature maps, decays); False means sites
    of this method differ only in what they output, so their states can be updated together."""
    return any(name not in OUTPUT_ONLY_PARAMS for name in param_names(spec))


def param_trainable(spec: MethodSpec) -> tuple[bool, ...]:
    """Whether each parameter trains, in op order (performer's random features do not)."""
    return tuple(trainable for _, _, trainable in param_layout(spec, 1, 1, 1, 1))


def _orthogonal_features(rows: int, dim: int, generator: torch.Generator) -> Tensor:
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed, so unbiased
    norms = torch.randn(rows, dim, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return torch.cat(blocks)[:rows] * norms


def _retnet_decay_logits(kv_heads: int) -> Tensor:
    exponent = 5.0 + torch.arange(kv_heads, dtype=torch.float64)
    return torch.log1p(-torch.exp2(-exponent)) + exponent * math.log(2.0)  # log(gamma / (1 - gamma))


def init_params(spec: MethodSpec, heads: int, kv_heads: int, head_dim: int, v_head_dim: int,
                seed: int = 0) -> list[tuple[str, Tensor, bool]]:
    """(name, initial fp32 value, trainable) in op order; the same seed always gives the same values."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for name, shape, trainable in param_layout(spec, heads, kv_heads, head_dim, v_head_dim):
        if name == "performer_features":
            value = torch.stack([_orthogonal_features(shape[1], shape[2], generator) for _ in range(shape[0])])
        elif name == "hedgehog_weight":
            value = torch.eye(head_dim, dtype=torch.float64).expand(shape).clone()
        elif name in ("linformer_keys", "linformer_values"):
            value = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / sum(shape))
        elif name == "decay":
            value = _retnet_decay_logits(kv_heads)
        else:  # hedgehog_bias, alpha, conv_weight start at zero
            value = torch.zeros(shape, dtype=torch.float64)
        out.append((name, value.to(torch.float32), trainable))
    return out


def random_params(spec: MethodSpec, heads: int, kv_heads: int, head_dim: int, v_head_dim: int,
                  seed: int = 0) -> list[Tensor]:
    """Nonzero parameters for tests and the leakage check: every tap random (future taps too, so masking
    is exercised), alpha 1, gammas in (0.5, 0.99), Hedgehog perturbed away from the identity, sinks N(0, 1)."""
    generator = torch.Generator().manual_seed(seed + 1)
    values = []
    for name, value, _ in init_params(spec, heads, kv_heads, head_dim, v_head_dim, seed):
        noise = torch.randn(value.shape, generator=generator)
        if name in ("hedgehog_weight", "hedgehog_bias"):
            value = value + 0.3 * noise
        elif name == "decay":
            value = torch.logit(0.5 + 0.49 * torch.rand(value.shape, generator=generator))
        elif name == "alpha":
            value = torch.ones(())
        elif name == "conv_weight":
            value = 0.3 * noise
        elif name == "sinks":
            value = noise
        values.append(value)
    return values


def named_params(spec: MethodSpec, params: list[Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The op's `params` list as {name: tensor in `dtype`}; the count must match the spec."""
    names = param_names(spec)
    if len(params) != len(names):
        raise ValueError(f"{spec.name}: expected {len(names)} params {list(names)}, got {len(params)}")
    return {name: p if p.dtype == dtype else p.to(dtype) for name, p in zip(names, params)}
