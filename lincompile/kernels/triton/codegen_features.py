"""Feature-map prologues of the generated kernels: `_phi` (forward) and `_dphi` (its gradient), per feature map.

Signatures (x: raw rows [R, BK] fp32, zero beyond DK; pos: their positions [R]; ck = arange(BK), cf = arange(BF)
the key and feature columns; fpb: this KV head's feature parameters (FP floats): performer's omega [F, DK], or
hedgehog's W [DK, DK] then b [DK]):
    _phi(x, pos, ck, cf, sqrt_scale, fpb) -> [R, BF], zero beyond F (rows are masked by the caller)
    _dphi(x, f, df, pos, ck, cf, sqrt_scale, fpb) -> dx [R, BK] from f = phi(x) and its gradient df
    _phiq, _dphiq: the same for query rows (`feature_maps.features(..., query=True)`: Performer's are shifted)
Maps whose features are not the key columns themselves (angular, cosformer, performer, hedgehog) move columns with
a matrix product by a 0/1 (or parameter) matrix, always in IEEE fp32 (a permutation is then exact); a single row
(decode) uses a broadcast sum instead, since tl.dot needs 16 rows. Hedgehog's trainable W and b get their gradients
from `_dpre` (the gradient of the pre-softmax logits), which the backward kernels accumulate per program.
"""
from __future__ import annotations

import math

from lincompile.methods.spec import MethodSpec

#: Feature maps the prologues express (taylor's 1 + d + d^2 features are not generated).
FEATURE_MAPS = ("identity", "l2", "elu1", "relu", "angular", "cosformer", "performer", "hedgehog")
#: The maps whose prologues move columns by a matrix product (`_mm`, `_mm_t`).
MOVED_COLUMNS = ("angular", "cosformer", "performer", "hedgehog")

_HELPERS = '''@triton.jit
def _mm(x, w):
    """x [R, BK] @ w [BK, BF] in fp32 (IEEE products; a broadcast sum for one row)."""
    if x.shape[0] == 1:
        return _rsum(tl.trans(x) * w, 0)[None, :]
    else:
        return tl.dot(x, w, input_precision="ieee")


@triton.jit
def _mm_t(a, w):
    """a [R, BF] @ w^T for w [BK, BF]: [R, BK] in IEEE fp32."""
    return tl.dot(a, tl.trans(w), input_precision="ieee")


@triton.jit
def _l2(x):
    """x / max(|x|, 1e-12) per row (F.normalize)."""
    return x / tl.maximum(tl.sqrt(_rsum(x * x, 1)), 1e-12)[:, None]


@triton.jit
def _dl2(x, dn):
    """The gradient of _l2(x) given its gradient dn (F.normalize's: through the norm unless it is clamped)."""
    n = tl.sqrt(_rsum(x * x, 1))[:, None]
    u = x / tl.maximum(n, 1e-12)
    return tl.where(n > 1e-12, (dn - u * _rsum(u * dn, 1)[:, None]) / tl.maximum(n, 1e-12), dn / 1e-12)


'''

_SHIFT = "e = ((ck[:, None] + 1) == cf[None, :]).to(tl.float32)  # key column i -> feature i + 1"
_DOUBLE = "e = ((cf[None, :] % DK) == ck[:, None]) & (cf[None, :] < F) & (ck[:, None] < DK)"
_TRIG = ("angle = pos.to(tl.float32) * ANGLE\n"
         "trig = tl.where(cf[None, :] < DK, tl.cos(angle)[:, None], tl.sin(angle)[:, None])")
_OMEGA = ("om = tl.load(fpb + cf[None, :] * DK + ck[:, None], mask=(cf[None, :] < F) & (ck[:, None] < DK), "
          "other=0.0)  # omega^T [BK, BF]")

_HEDGEHOG = ("w2 = tl.load(fpb + (cf[None, :] % DK) * DK + ck[:, None], mask=(cf[None, :] < F) & (ck[:, None] < DK),"
             " other=0.0)  # W[j % DK, i]\n"
             "sign = tl.where(cf < DK, 1.0, -1.0)")
_HALVES = '''@triton.jit
def _halves(h, cf):
    """Softmax over the first DK columns and over the next DK, separately (zero beyond F)."""
    lo = (cf < DK)[None, :]
    hi = ((cf >= DK) & (cf < F))[None, :]
    m_lo = _rmax(tl.where(lo, h, float("-inf")), 1)[:, None]
    m = tl.where(lo, m_lo, _rmax(tl.where(hi, h, float("-inf")), 1)[:, None])
    e = tl.where(lo | hi, tl.exp(h - m), 0.0)
    return e / tl.where(lo, _rsum(tl.where(lo, e, 0.0), 1)[:, None], _rsum(tl.where(hi, e, 0.0), 1)[:, None])


@triton.jit
def _dpre(x, f, df, pos, ck, cf, sqrt_scale, fpb):
    """Hedgehog: the gradient of the logits x W^T + b (the sign of each half folded in), from f = phi(x) and df."""
    sign = tl.where(cf < DK, 1.0, -1.0)
    lo = (cf < DK)[None, :]
    g = f * df
    dh = g - f * tl.where(lo, _rsum(tl.where(lo, g, 0.0), 1)[:, None], _rsum(tl.where(lo, 0.0, g), 1)[:, None])
    return dh * sign[None, :]


'''

_PHI = {
    "identity": "return x * sqrt_scale",
    "l2": "return _l2(x)",
    "elu1": "return tl.where(ck[None, :] < DK, tl.where(x > 0, x, tl.exp(x) - 1.0) + 1.0, 0.0)",
    "relu": "return tl.maximum(x, 0.0)",
    "angular": f"{_SHIFT}\nreturn tl.where(cf[None, :] == 0, SQRT_HALF, _mm(_l2(x), e) * INV_SQRT_PI)",
    "cosformer": f"{_DOUBLE}\n{_TRIG}\nreturn tl.maximum(_mm(x, e.to(tl.float32)), 0.0) * trig",
    "performer": f"{_OMEGA}\nxs = x * sqrt_scale\n"
                 "return tl.where(cf[None, :] < F, tl.exp(_mm(xs, om) - 0.5 * _rsum(xs * xs, 1)[:, None]) * INV_SQRT_M,"
                 " 0.0)",
    "hedgehog": f"{_HEDGEHOG}\nb2 = tl.load(fpb + DK * DK + cf % DK, mask=cf < F, other=0.0)\n"
                "return _halves((_mm(x, w2) + b2[None, :]) * sign[None, :], cf)",
}

_DPHI = {
    "identity": "return df * sqrt_scale",
    "l2": "return _dl2(x, df)",
    "elu1": "return tl.where(ck[None, :] < DK, tl.where(x > 0, df, df * tl.exp(x)), 0.0)",
    "relu": "return tl.where(x > 0, df, 0.0)",
    "angular": f"{_SHIFT}\nreturn _dl2(x, _mm_t(tl.where(cf[None, :] == 0, 0.0, df), e) * INV_SQRT_PI)",
    "cosformer": f"{_DOUBLE}\n{_TRIG}\ne = e.to(tl.float32)\n"
                 "return _mm_t(tl.where(_mm(x, e) > 0, df * trig, 0.0), e)",
    "performer": f"{_OMEGA}\nxs = x * sqrt_scale\ndp = df * f\n"
                 "return (_mm_t(dp, om) - xs * _rsum(dp, 1)[:, None]) * sqrt_scale",
    "hedgehog": f"{_HEDGEHOG}\nreturn _mm_t(_dpre(x, f, df, pos, ck, cf, sqrt_scale, fpb), w2)",
}


def unsupported_map(spec: MethodSpec) -> str | None:
    """Why the prologues cannot express spec's feature map (None when they can)."""
    if spec.feature_map not in FEATURE_MAPS:
        return f"feature_map={spec.feature_map!r} (generated: {', '.join(FEATURE_MAPS)})"
    return None


def constants(spec: MethodSpec, dk: int) -> dict[str, float | int]:
    """Module-level constants the prologues use; FP is the number of feature parameters per KV head."""
    fp = {"performer": spec.feature_dim(dk) * dk, "hedgehog": dk * dk + dk}.get(spec.feature_map, 0)
    return {"SQRT_HALF": math.sqrt(0.5), "INV_SQRT_PI": 1.0 / math.sqrt(math.pi),
            "ANGLE": math.pi / (2 * spec.horizon), "INV_SQRT_M": 1.0 / math.sqrt(spec.num_features), "FP": fp}


def _function(header: str, doc: str, body: str) -> str:
    lines = [f"    {line}" for line in body.split("\n")]
    return "\n".join(["@triton.jit", header, f'    """{doc}"""', *lines]) + "\n\n\n"


#: Performer's queries where their scale cancels (`MethodSpec.query_scale_free`): exp(w.x - max_m w_m.x)
#: (`feature_maps.features(..., query=True)`), the max a constant (its gradient cancels: not differentiated).
_PHI_QUERY = (f"{_OMEGA}\np = _mm(x * sqrt_scale, om)\n"
              "m = _rmax(tl.where(cf[None, :] < F, p, float(\"-inf\")), 1)[:, None]\n"
              "return tl.where(cf[None, :] < F, tl.exp(p - m) * INV_SQRT_M, 0.0)")
_DPHI_QUERY = f"{_OMEGA}\nreturn _mm_t(df * f, om) * sqrt_scale"


def _shifted_queries(spec: MethodSpec) -> bool:
    return spec.feature_map == "performer" and spec.query_scale_free


def phi_source(spec: MethodSpec) -> str:
    """The helpers, `_phi` for spec's feature map and `_phiq`, the same for queries (Performer's shifted)."""
    helpers = _HELPERS + (_HALVES if spec.feature_map == "hedgehog" else "")
    query = _PHI_QUERY if _shifted_queries(spec) else "return _phi(x, pos, ck, cf, sqrt_scale, fpb)"
    return (helpers + _function("def _phi(x, pos, ck, cf, sqrt_scale, fpb):",
                                f"phi = {spec.feature_map} of rows x [R, BK] -> [R, BF].", _PHI[spec.feature_map])
            + _function("def _phiq(x, pos, ck, cf, sqrt_scale, fpb):", "phi of query rows.", query))


def dphi_source(spec: MethodSpec) -> str:
    """`_dphi` for spec's feature map and `_dphiq` for queries (the module already holds `_phi`'s helpers)."""
    query = _DPHI_QUERY if _shifted_queries(spec) else "return _dphi(x, f, df, pos, ck, cf, sqrt_scale, fpb)"
    return (_function("def _dphi(x, f, df, pos, ck, cf, sqrt_scale, fpb):",
                      "dx [R, BK] from f = phi(x) and df.", _DPHI[spec.feature_map])
            + _function("def _dphiq(x, f, df, pos, ck, cf, sqrt_scale, fpb):", "dx of query rows from f = _phiq(x).",
                        query))
