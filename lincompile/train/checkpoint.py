"""Atomic training checkpoints: `<root>/step-<NNNNNNNN>/` directories that exist only when complete.

A checkpoint holds the trained parameters only (`trained.safetensors`: method parameters, LoRA adapters, and
whatever else the run trains), `optimizer.pt`, `rng.pt`, `linearize.json` (the LinearizeConfig), `train_config.json`
and `state.json` (step, trained names, loss history).

Invariants: a checkpoint is written into a temporary sibling (`.tmp-...`), every file and the directory are
fsynced, and only then is it renamed into place with `os.replace`; older checkpoints are pruned only after that.
A crash or SIGKILL at any moment therefore leaves every `step-*` directory complete and the previous one
untouched; leftover `.tmp-*` directories are ignored and removed by the next save. One writer per root.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lincompile.atomic import make_shareable

FORMAT = "lincompile-train-checkpoint"
FILES = ("trained.safetensors", "optimizer.pt", "rng.pt", "linearize.json", "train_config.json", "state.json")
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    """A loaded checkpoint; `state` is the content of state.json (`step`, `trained`, `history`, ...)."""

    path: Path
    tensors: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    linearize: dict[str, Any]
    train_config: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def source(self) -> str | None:
        """The `source_fingerprint` of the model it was trained on (None: written before it was recorded)."""
        return self.state.get("fingerprint", {}).get("source")


def source_fingerprint(graph: torch.nn.Module) -> str:
    """Which model tensors were trained on: a hash of its first weight (the embeddings) rounded to bfloat16, so the
    same model loaded in float32 or bfloat16 gives the same one."""
    first = next(graph.parameters()).detach().to("cpu", torch.bfloat16).reshape(-1).contiguous()
    return hashlib.sha256(memoryview(first.view(torch.uint8).numpy())).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may touch (torch CPU, all CUDA devices, Python's `random`)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # as many devices as both runs see (fewer may be visible now)
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _discard_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no part of it stays under its `step-*` name: it is renamed to a temp name
    first (what a crash leaves there, the next save removes)."""
    aside = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=path.parent))
    os.replace(path, aside / path.name)
    _discard(aside)


def _untied(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies; safetensors refuses tensors that share storage (tied embeddings)."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def _write_payload(tmp: Path, tensors: dict[str, Tensor], optimizer: dict[str, Any], linearize: dict[str, Any],
                   train_config: dict[str, Any], state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(_untied(tensors), tmp / "trained.safetensors")
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    _write_json(tmp / "linearize.json", linearize)
    _write_json(tmp / "train_config.json", train_config)
    _write_json(tmp / "state.json", {"format": FORMAT, **state})
    for name in FILES:
        _fsync(tmp / name)
    _fsync(tmp)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Tensor], optimizer: dict[str, Any],
                    linearize: dict[str, Any], train_config: dict[str, Any], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write `<root>/step-<step>` atomically, then keep only the `keep` newest checkpoints; returns its path.

    `state` must be JSON-serializable and is stored with `step` set. An existing checkpoint of the same step is
    replaced (it is moved aside first, so the older checkpoints stay usable throughout).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=root))
    try:
        _write_payload(tmp, tensors, optimizer, linearize, train_config, {**state, "step": step})
        make_shareable(tmp)
        if target.exists():
            os.replace(target, Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=root)) / target.name)
        os.replace(tmp, target)
        _fsync(root)
    except BaseException:
        _discard(tmp)
        raise
    for old in list_checkpoints(root)[:-keep]:
        _discard_checkpoint(old)
    for stale in root.glob(_TMP_PREFIX + "*"):
        _discard(stale)
    return target


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; raises ValueError if it is not one."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.name.startswith(_TMP_PREFIX):
        raise ValueError(f"{path} is a checkpoint being written (or left by a crash), not a complete one: use a "
                         "step-* directory beside it")
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path} is not a complete lincompile checkpoint (missing {', '.join(missing)})")
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return Checkpoint(
        path=path,
        tensors=load_file(path / "trained.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        linearize=json.loads((path / "linearize.json").read_text()),
        train_config=json.loads((path / "train_config.json").read_text()),
        state=state,
    )
