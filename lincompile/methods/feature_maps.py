"""Feature maps phi (for the global branch and kernel local branches) and the local kernels.

Every function is elementwise over tokens: phi of one token depends only on that token, its position and
the parameters, so computing it for one token or for a whole sequence gives the same numbers (this is what
lets the parallel, chunked, recurrent and verify forms agree exactly).

Inputs are 5-D [B, Hkv, g, N, d] (keys use g = 1), in the accumulation dtype; per-KV-head parameters broadcast
over the query heads g of their group. How `scale` (the site's softmax scale, usually 1/sqrt(d)) enters:
identity, performer and taylor multiply q and k by sqrt(scale) so phi(q).phi(k) approximates or equals a
function of scale*q.k; l2, elu1, relu, angular, cosformer and hedgehog ignore it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lincompile.methods.spec import MethodSpec

#: Normalized methods divide by max(row weight sum, `denominator_eps(spec)`): DENOMINATOR_EPS, or float32's
#: smallest normal number for Performer, whose weights are positive but can be far below 1e-6 (`features`).
DENOMINATOR_EPS = 1e-6
TINY_EPS = torch.finfo(torch.float32).tiny
#: YOSO's number of hyperplanes tau: the kernel is the probability that tau random hyperplanes agree.
YOSO_HASHES = 8
#: |cos| is clamped below 1 so that d arccos / d cos stays finite.
YOSO_CLAMP = 1.0 - 1e-6


def denominator_eps(spec: MethodSpec) -> float:
    """The least denominator a normalized method divides by (see DENOMINATOR_EPS)."""
    return TINY_EPS if spec.feature_map == "performer" else DENOMINATOR_EPS


def features(x: Tensor, spec: MethodSpec, params: dict[str, Tensor], positions: Tensor | None,
             scale: float, query: bool = False) -> Tensor:
    """phi(x) [B, Hkv, g, N, F] for x [B, Hkv, g, N, d]; `positions` [B, N] (int64) is needed by cosformer.

    `query`: x are queries. Performer's queries, where the outputs do not depend on their scale
    (`spec.query_scale_free`), are then divided by exp(max_m w_m.x - |x|^2/2), a constant per query (not
    differentiated), so that their largest feature is 1/sqrt(m): exp(w.x - |x|^2/2) alone is tiny for the norms of
    real heads (SmolLM2's scaled queries and keys reach |x| = 4 to 11; its products with keys put up to a sixth of
    some layers' denominators under the old 1e-6 floor, and pass under float32's range from |x| = 13)."""
    kind = spec.feature_map
    if kind == "identity":
        return x * math.sqrt(scale)
    if kind == "l2":
        return _unit(x)
    if kind == "elu1":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "angular":  # phi(q).phi(k) = 1/2 + cos(q, k)/pi, the linear part of 1 - angle/pi
        ones = torch.full_like(x[..., :1], math.sqrt(0.5))
        return torch.cat([ones, _unit(x) / math.sqrt(math.pi)], dim=-1)
    if kind == "performer":  # exp(w.x - |x|^2/2)/sqrt(m): E[phi(q).phi(k)] = exp(q.k), x scaled by sqrt(scale)
        xs = x * math.sqrt(scale)
        omega = params["performer_features"]  # [Hkv, m, d]
        proj = torch.einsum("bhgnd,hmd->bhgnm", xs, omega)
        if query and spec.query_scale_free:  # the |x|^2 / 2 term is a constant per query too
            return torch.exp(proj - proj.amax(-1, keepdim=True).detach()) / math.sqrt(omega.shape[1])
        return torch.exp(proj - 0.5 * xs.square().sum(-1, keepdim=True)) / math.sqrt(omega.shape[1])
    if kind == "cosformer":
        if positions is None:
            raise ValueError(f"{spec.name}: cosformer needs token positions")
        angle = (positions.to(x.dtype) * (math.pi / (2 * spec.horizon)))[:, None, None, :, None]
        r = F.relu(x)
        return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)
    if kind == "hedgehog":
        h = torch.einsum("bhgnd,hed->bhgne", x, params["hedgehog_weight"])
        h = h + params["hedgehog_bias"][None, :, None, None, :]
        return torch.cat([torch.softmax(h, dim=-1), torch.softmax(-h, dim=-1)], dim=-1)
    if kind == "taylor":  # phi(q).phi(k) = 1 + s + s^2/2 with s = scale q.k
        xs = x * math.sqrt(scale)
        outer = (xs[..., :, None] * xs[..., None, :]).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(xs[..., :1]), xs, outer], dim=-1)
    raise ValueError(f"{spec.name}: unknown feature map {kind!r}")


def _unit(x: Tensor) -> Tensor:
    """x / max(|x|, 1e-12) over the last dim: F.normalize's ops (the same numbers and gradient) without its
    Python wrappers, which cost a decode step more than the arithmetic."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def closed_form_dots(q: Tensor, k: Tensor, spec: MethodSpec, scale: float) -> Tensor | None:
    """phi(q).phi(k) for every (query, key) pair, [B, Hkv, g, T, N] for q [B, Hkv, g, T, d] and k [B, Hkv, N, d],
    without the features, where that is cheaper; None for the other maps. Taylor: 1 + s + s^2/2 with
    s = scale q.k, the same number as its 1 + d + d^2 features give, from a d-fold smaller product."""
    if spec.feature_map == "taylor":
        s = torch.einsum("bhgtd,bhnd->bhgtn", q, k) * scale
        return 1.0 + s + 0.5 * s.square()
    return None


def local_kernel(dots: Tensor, spec: MethodSpec) -> Tensor:
    """Kernel weights of the local (or quadratic) branch from phi(q).phi(k): relu^2 or YOSO."""
    if spec.local == "relu2":
        return F.relu(dots).square()
    if spec.local == "yoso":
        return (1.0 - torch.arccos(dots.clamp(-YOSO_CLAMP, YOSO_CLAMP)) / math.pi) ** YOSO_HASHES
    raise ValueError(f"{spec.name}: local={spec.local!r} is not a kernel")
