"""What one generated module is for: a `MethodSpec` the generator can express (`unsupported_reason` names why
not), its head dims, input dtype and V tile width, and the compile-time constants that follow from them."""
from __future__ import annotations

from dataclasses import dataclass

from lincompile.kernels.triton import codegen_features as features
from lincompile.methods.spec import MethodSpec

#: Largest group size a chunk (one group per chunk) may hold.
MAX_GROUP = 128
#: Chunk length (positions) for methods without groups.
CHUNK = 64
DTYPES = ("float32", "bfloat16", "float16")


def unsupported_reason(spec: MethodSpec) -> str | None:
    """Why the generator cannot express `spec` (None when it can)."""
    if spec.kind != "linear":
        return f"kind={spec.kind!r} (only kind='linear' is generated)"
    if reason := features.unsupported_map(spec):
        return reason
    if spec.local == "yoso":
        return "local='yoso'"
    if spec.decay and (spec.global_branch != "inclusive" or spec.local != "none" or spec.conv != "none"):
        return "decay=True beside a local branch or conv (generated: decay on the inclusive branch alone)"
    if spec.conv == "centered":
        return "conv='centered' (not causal)"
    if spec.uses_groups and spec.group_size > MAX_GROUP:
        return f"group_size={spec.group_size} > {MAX_GROUP}"
    return None


def block(n: int) -> int:
    """The tile width for n elements: the next power of two, at least 16 (tl.dot's smallest)."""
    return max(16, 1 << max(n - 1, 0).bit_length())


@dataclass(frozen=True)
class Plan:
    """A spec with its shape class: the compile-time constants of one generated module."""

    spec: MethodSpec
    dk: int
    dv: int
    dtype: str
    block_v: int

    def __post_init__(self) -> None:
        reason = unsupported_reason(self.spec)
        if reason:
            raise ValueError(f"{self.spec.name}: cannot generate a Triton kernel: {reason}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")

    @property
    def chunk(self) -> int:
        return self.spec.group_size if self.spec.uses_groups else CHUNK

    @property
    def half(self) -> int:
        return self.spec.conv_kernel // 2

    def constants(self) -> dict[str, int]:
        """Module-level tl.constexpr values."""
        chunk = self.chunk
        f = self.spec.feature_dim(self.dk)
        return {"DK": self.dk, "DV": self.dv, "BK": block(self.dk), "BV": self.block_v,
                "F": f, "BF": block(f),
                "C": chunk, "BC": block(chunk), "G": self.spec.group_size,
                "BG": block(self.spec.group_size), "HALF": self.half,
                "BW": block(self.half), "KC": self.spec.conv_kernel,
                "NPREV": -(-self.half // chunk) if self.spec.conv != "none" else 0, "CAP": self.spec.global_cap}
