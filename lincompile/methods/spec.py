"""`MethodSpec`: one declarative description of an attention method, and the method registry.

Kernels, the ONNX lowering and the runtime all derive from a spec; nothing else names a method's math.
A spec is frozen and round-trips through JSON (`to_json` / `from_json`), which is also the string the
`lincompile::attention` op carries, so a graph is self-describing.

The math of each field lives in `lincompile.methods.feature_maps` (feature maps, local kernels),
`lincompile.methods.params` (learnable parameters) and `lincompile.kernels.linear_attention.reference`
(the forms: parallel, chunked, recurrent, verify/commit).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from lincompile.jsonconfig import JsonConfig

KINDS = ("softmax", "linear", "quadratic", "projected")
FEATURE_MAPS = ("identity", "l2", "elu1", "relu", "angular", "performer", "cosformer", "hedgehog", "taylor")
#: Feature maps whose products phi(q).phi(k) can be negative: a global branch of one cannot be normalized.
SIGNED_MAPS = ("identity", "l2")
NORMALIZERS = ("none", "denominator")
LOCAL_BRANCHES = ("none", "relu2", "yoso", "softmax")
GLOBAL_BRANCHES = ("none", "inclusive", "grouped")
CONVS = ("none", "causal", "centered")

_CHOICES = {"kind": KINDS, "feature_map": FEATURE_MAPS, "normalizer": NORMALIZERS, "local": LOCAL_BRANCHES,
            "global_branch": GLOBAL_BRANCHES, "conv": CONVS}


@dataclass(frozen=True)
class MethodSpec(JsonConfig):
    """What one attention method computes.

    kind:
      "softmax"   exact softmax attention (state: a growing KV cache; `bias` is honoured);
      "linear"    o = kernel(q, k) v (optionally / its row sum) + softmax local + conv(v), constant-size state:
                  feature map phi on q and k; global branch over all past tokens ("inclusive", optionally with a
                  per-head decay gamma) or over completed groups of `group_size` tokens only ("grouped", scaled
                  by a learnable alpha that starts at 0); local branch among the tokens of the current group
                  (relu(phi_q.phi_k)^2, YOSO, or softmax); depthwise conv over time on V (K = `conv_kernel`
                  taps, "causal" keeps the K//2+1 taps on the current and previous tokens);
      "quadratic" the local kernel over every past token (no groups; state: a growing KV cache);
      "projected" Linformer: softmax over keys/values projected along the sequence to `num_features` rows
                  (bidirectional only: `causal_capable` is False).
    num_features: Performer random features, or Linformer's projected length. horizon: cosFormer's M (the
    position reweighting is cos(pi/2 * (i - j) / M)), or Linformer's maximum sequence length. softcap: exact
    softmax only, the scaled scores s become softcap * tanh(s / softcap) before the mask (Gemma 2's attention
    logit softcapping; 0: none). sinks: exact softmax only, one learned logit per query head joins every row's
    softmax denominator and weighs no value (GPT-OSS's attention sinks; the op's `sinks` parameter [H]).
    `linearize` sets softcap and sinks per site from the graph, as it does the scale.
    global_cap: grouped global branch only (0: off, the paper's form). The branch sums k v^T over every
    completed group, so its size grows with the context; a query at position p scales it by
    min(1, global_cap / n), n = group_size * (p // group_size) the tokens it sums. Past global_cap tokens the
    sum acts as a mean times global_cap, the size that contexts of global_cap tokens gave it in training.
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
    decay: bool = False
    num_features: int = 64
    horizon: int = 4096
    softcap: float = 0.0
    sinks: bool = False
    global_cap: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MethodSpec: name={self.name!r} must be a non-empty string")
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                self._fail(field, f"is not one of {allowed}")
        for field in ("group_size", "conv_kernel", "num_features", "horizon"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self._fail(field, "must be an integer >= 1")
        if self.conv_kernel % 2 == 0:
            self._fail("conv_kernel", "must be odd (K//2 past taps, the current token, K//2 future taps)")
        if self.conv != "none" and self.conv_kernel < 3:
            self._fail("conv_kernel", "must be >= 3 with a conv (one tap only scales each channel of the current "
                                      "token, and keeps no past tokens to carry in a state)")
        if not isinstance(self.decay, bool):
            self._fail("decay", "must be a bool")
        if not isinstance(self.description, str):
            self._fail("description", "must be a string")
        if (isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float))
                or not math.isfinite(self.softcap) or self.softcap < 0):
            self._fail("softcap", "must be a finite number >= 0 (0: no softcapping)")
        if self.softcap and self.kind != "softmax":
            self._fail("softcap", "applies to kind='softmax' only (a linear method has no scores to cap)")
        if not isinstance(self.sinks, bool):
            self._fail("sinks", "must be a bool")
        if not isinstance(self.global_cap, int) or isinstance(self.global_cap, bool) or self.global_cap < 0:
            self._fail("global_cap", "must be an integer >= 0 (0: no cap)")
        if self.global_cap and (self.kind != "linear" or self.global_branch != "grouped"):
            self._fail("global_cap", "applies to global_branch='grouped' only (the sum the cap bounds)")
        if self.sinks and self.kind != "softmax":
            self._fail("sinks", "applies to kind='softmax' only (a linear method has no softmax denominator)")
        self._check_combination()

    def _fail(self, field: str, why: str) -> None:
        raise ValueError(f"MethodSpec {self.name!r}: {field}={getattr(self, field)!r} {why}")

    def _check_combination(self) -> None:
        defaults = {"feature_map": "identity", "normalizer": "none", "local": "none", "global_branch": "none",
                    "conv": "none", "decay": False}
        if self.kind in ("softmax", "projected"):
            for field, value in defaults.items():
                if getattr(self, field) != value:
                    self._fail(field, f"must be {value!r} for kind={self.kind!r}")
            return
        if self.kind == "quadratic":
            for field in ("global_branch", "conv", "decay"):
                if getattr(self, field) != defaults[field]:
                    self._fail(field, f"must be {defaults[field]!r} for kind='quadratic'")
            if self.local not in ("relu2", "yoso"):
                self._fail("local", "must be 'relu2' or 'yoso' for kind='quadratic' (use kind='softmax')")
            if self.feature_map == "cosformer":
                self._fail("feature_map", "needs positions, which a kind='quadratic' KV cache does not keep")
        if self.kind == "linear" and self.local == "none" and self.global_branch == "none":
            self._fail("global_branch", "and local='none': a linear method needs a global or a local branch")
        if self.local == "softmax" and self.normalizer != "none":
            self._fail("normalizer", "must be 'none' with local='softmax' (softmax normalizes itself)")
        if self.local == "yoso" and self.feature_map != "l2":
            self._fail("feature_map", "must be 'l2' with local='yoso' (collision probability of unit vectors)")
        if self.normalizer == "denominator" and self.global_branch != "none" and self.feature_map in SIGNED_MAPS:
            self._fail("normalizer", f"needs nonnegative weights, and feature_map={self.feature_map!r} makes "
                       "phi(q).phi(k) negative for some pairs, so a row's weight sum can be zero or negative; use a "
                       f"nonnegative map ({', '.join(m for m in FEATURE_MAPS if m not in SIGNED_MAPS)}) or "
                       "normalizer='none'")
        if self.decay and self.global_branch != "inclusive":
            self._fail("decay", "needs global_branch='inclusive'")

    @property
    def causal_capable(self) -> bool:
        """False for sequence-projecting methods (Linformer): they cannot run on causal sites at all."""
        return self.kind != "projected"

    @property
    def causal_safe(self) -> bool:
        """True when position t's output can never depend on tokens after t (and so can be decoded)."""
        return self.causal_capable and self.conv != "centered"

    @property
    def has_kv_cache(self) -> bool:
        """True when the state is a KV cache that grows with the context (softmax, quadratic)."""
        return self.kind in ("softmax", "quadratic")

    @property
    def uses_groups(self) -> bool:
        """True when the state keeps the current group's keys and values."""
        return self.kind == "linear" and (self.local != "none" or self.global_branch == "grouped")

    @property
    def uses_positions(self) -> bool:
        """True when the state keeps a token counter (group alignment, cosFormer's position reweighting)."""
        return self.kind == "linear" and (self.uses_groups or self.feature_map == "cosformer")

    @property
    def query_scale_free(self) -> bool:
        """True when scaling phi(q) by a positive constant per query leaves the outputs unchanged: phi(q) enters only
        linearly, through a normalized branch (a local kernel is not linear in phi(q).phi(k))."""
        return self.kind == "linear" and self.normalizer == "denominator" and self.local == "none"

    def feature_dim(self, head_dim: int) -> int:
        """Width of phi(q), phi(k) for a given head_dim (the rows of the state S)."""
        return {"performer": self.num_features, "angular": head_dim + 1, "cosformer": 2 * head_dim,
                "hedgehog": 2 * head_dim, "taylor": 1 + head_dim + head_dim * head_dim}.get(self.feature_map, head_dim)

    def state_parts(self) -> tuple[str, ...]:
        """Names of the recurrent-state tensors, in the order the op takes and returns them."""
        if self.has_kv_cache:
            return ("keys", "values", "key_mask")
        if self.kind == "projected":
            return ()
        parts: list[str] = []
        if self.global_branch != "none":
            parts.append("state")
            if self.normalizer == "denominator":
                parts.append("normalizer")
        if self.uses_groups:
            parts += ["group_keys", "group_values"]
        if self.conv != "none":
            parts.append("conv")
        if self.uses_positions:
            parts.append("position")
        return tuple(parts)

    def to_json(self) -> str:
        """Compact: the op's `spec` argument (a graph carries its own math)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: MethodSpec, aliases: tuple[str, ...] = ()) -> MethodSpec:
    """Register a method under its name (and optional other names for the same concept), once."""
    for name in (spec.name, *aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"method {name!r} is already registered")
    if not spec.description:
        raise ValueError(f"method {spec.name!r} needs a one-line description")
    _REGISTRY[spec.name] = spec
    _ALIASES.update({alias: spec.name for alias in aliases})
    return spec


def get_method(method: str | MethodSpec) -> MethodSpec:
    """Look a method up by name or alias (or pass a spec through)."""
    if isinstance(method, MethodSpec):
        return method
    name = _ALIASES.get(method, method)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def methods() -> list[str]:
    """Names of every registered method, sorted (aliases excluded: see `method_aliases`)."""
    return sorted(_REGISTRY)


def method_aliases() -> dict[str, str]:
    """Other accepted names, mapped to the registered name they stand for."""
    return dict(_ALIASES)


def _register_zoo() -> None:
    def linear(name: str, description: str, **fields: Any) -> MethodSpec:
        return register(MethodSpec(name=name, description=description, **fields))

    register(MethodSpec(
        name="softmax", kind="softmax", global_branch="none",
        description="exact softmax attention through the lincompile op (proves detection; KV cache state)"))
    kernelized = {
        "elu": linear("linear-elu", "causal linear attention, phi(x) = elu(x) + 1, normalized (Katharopoulos et "
                      "al. 2020)", feature_map="elu1", normalizer="denominator"),
        "relu": linear("linear-relu", "causal linear attention, phi(x) = relu(x), normalized",
                       feature_map="relu", normalizer="denominator"),
        "performer": linear("performer", "FAVOR+ positive orthogonal random features approximating exp(scale q.k) "
                            "(Performer), normalized", feature_map="performer", normalizer="denominator"),
        "cosformer": linear("cosformer", "relu features reweighted by cos(pi/2 (i-j)/M), normalized (cosFormer)",
                            feature_map="cosformer", normalizer="denominator"),
        "hedgehog": linear("hedgehog", "learned per-head MLP feature map [softmax(Wx+b), softmax(-Wx-b)], W = I "
                           "at init, normalized (Hedgehog)", feature_map="hedgehog", normalizer="denominator"),
        "taylor": linear("taylor", "2nd-order Taylor expansion of exp(scale q.k): phi = [1, x, x(x)x/sqrt2], "
                         "normalized (Based)", feature_map="taylor", normalizer="denominator"),
    }
    linear("retnet", "retention: q.S with S_t = gamma S_(t-1) + k v^T (q.k scaled), learnable per-head "
           "gamma, no normalizer (RetNet)", feature_map="identity", decay=True)
    register(MethodSpec(name="local", feature_map="l2", local="relu2", global_branch="none",
                        description="ablation: relu(q^.k^)^2 among the tokens of the token's group only (FLASH "
                                    "local)"), aliases=("flash-local",))
    register(MethodSpec(name="grouped", feature_map="l2", global_branch="grouped",
                        description="ablation: alpha q^.S over completed groups only (FLASH grouped global, "
                                    "alpha starts at 0)"), aliases=("flash-grouped",))
    paper = dict(feature_map="l2", local="relu2", global_branch="grouped")
    linear("local+grouped", "the paper's local relu^2 + alpha * grouped global, no conv", **paper)
    linear("augmented", "the paper's LLaMA form: local relu^2 + alpha * grouped global + causal conv on V "
           "(K=63, 32 live taps)", conv="causal", **paper)
    linear("augmented-centered", "ablation: augmented with an unmasked centered conv (leaks future tokens; "
           "parallel form only)", conv="centered", **paper)
    linear("yoso", "local+grouped with the YOSO collision kernel (1 - arccos(q^.k^)/pi)^8 in place of relu^2",
           feature_map="l2", local="yoso", global_branch="grouped")
    linear("castling", "Castling-ViT style: normalized angular kernel 1/2 + q^.k^/pi over all past tokens "
           "+ causal conv on V (K=63)", feature_map="angular", normalizer="denominator", conv="causal")
    register(MethodSpec(name="square", kind="quadratic", feature_map="l2", local="relu2", global_branch="none",
                        description="full causal relu(q^.k^)^2 over every past token, no linear form (KV cache "
                                    "state)"))
    register(MethodSpec(name="linformer", kind="projected", global_branch="none", num_features=256,
                        description="Linformer: softmax over keys/values projected along the sequence to 256 "
                                    "rows (bidirectional only)"))
    for base, spec in kernelized.items():
        register(dataclasses.replace(spec, name=f"augmented-{base}", conv="causal",
                                     description=f"{spec.name} + causal conv on V (K=63, 32 live taps)"))


_register_zoo()
