"""Generated modules on disk and in memory: one per (plan, interpreter mode), compiled once.

Triton reads a kernel's source with `inspect`, so generated source is written to a file (named by its hash, so
identical plans share it across processes) and imported from there. The interpreter mode is part of the key:
`triton.jit` decides at decoration time whether it builds an interpreted or a compiled function.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from lincompile.atomic import atomic_write
from lincompile.kernels.triton.codegen import generate
from lincompile.kernels.triton.codegen_bwd import generate_backward
from lincompile.kernels.triton.plan import Plan


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why this Triton's interpreter cannot run the kernels beside this NumPy, or None (also for a version it
    cannot read). Triton before 3.7 turns one-element arrays into Python ints (a loop bound that is a kernel
    argument), which NumPy 2.4 refuses (triton-lang/triton#9171)."""
    triton_at, numpy_at = (re.match(r"(\d+)\.(\d+)", v) for v in (triton_version, numpy_version))
    if triton_at is None or numpy_at is None:
        return None
    if tuple(map(int, triton_at.groups())) < (3, 7) and tuple(map(int, numpy_at.groups())) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter fails beside NumPy {numpy_version} "
                "(triton-lang/triton#9171): install 'numpy<2.4' or 'triton>=3.7' to run the kernels under "
                "TRITON_INTERPRET=1")
    return None


def cache_dir() -> Path:
    """Where generated sources live: $LINCOMPILE_TRITON_CACHE, or a per-user temp folder."""
    root = os.environ.get("LINCOMPILE_TRITON_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                      f"lincompile-triton-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_path(source: str) -> Path:
    """The file holding `source` (written atomically on first use)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = cache_dir() / f"lincompile_gen_{digest}.py"
    if not path.exists():
        atomic_write(path, source)
    return path


#: Environment variable: "fp32" makes the backward multiply bf16-rounded operands in fp32 on a GPU too (the
#: interpreter's form, `codegen_bwd._BwdGen.dot`): an experiment on the backward that is wrong on an H200 for head
#: dims under 64 and column-moving maps (`launch.backward_verified`), run by bench/gpu_session.sh.
BWD_DOTS = "LINCOMPILE_BWD_DOTS"


def fp32_backward_dots() -> bool:
    """Whether `BWD_DOTS` asks for fp32 products in the backward ("fp32"; unset or "bf16": the default)."""
    value = os.environ.get(BWD_DOTS, "bf16")
    if value not in ("bf16", "fp32"):
        raise ValueError(f"{BWD_DOTS}={value!r}: expected 'bf16' (the default) or 'fp32'")
    return value == "fp32"


@functools.lru_cache(maxsize=128)
def _load(plan: Plan, interpret: bool, backward: bool, fp32_dots: bool = False) -> ModuleType:
    path = source_path(generate_backward(plan, interpret or fp32_dots) if backward else generate(plan))
    name = f"{path.stem}_{'interp' if interpret else 'jit'}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def load(plan: Plan) -> ModuleType:
    """The generated module for a plan, with its kernels `chunked_fwd`, `verify_fwd` and `recurrent`."""
    return _load(plan, interpreting(), False)


def load_backward(plan: Plan) -> ModuleType:
    """The generated backward module for a plan, with its kernels `bwd_dq` and `bwd_dkv`."""
    return _load(plan, interpreting(), True, fp32_backward_dots())
