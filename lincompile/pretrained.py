"""Shipped trained linearizations: only the trained tensors (new attention parameters and LoRA deltas).

A shipped linearization is a directory `lincompile/weights/<model>-<method>/` with `trained.safetensors` and
`recipe.json` (the LinearizeConfig, the LoRA layout, how it was trained and what it scored). `linearized`
rebuilds it on the base model: optimize with the recorded config, add the same LoRA adapters, load the
tensors, merge the adapters. `ship` writes such a directory from a `lincompile train` checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lincompile.atomic import atomic_directory
from lincompile.config import LinearizeConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TENSORS_FILE = "trained.safetensors"
RECIPE_FILE = "recipe.json"


def shipped_dir(model: str, method: str) -> Path:
    return WEIGHTS_DIR / f"{model}-{method}"


def available() -> list[str]:
    """Names (`<model>-<method>`) of the shipped linearizations."""
    return sorted(p.name for p in WEIGHTS_DIR.glob("*") if (p / RECIPE_FILE).is_file())


def linearized(model: torch.nn.Module, method: str = "augmented", weights: str | Path = "default",
               model_name: str = "smollm2-135m", **optimize_kwargs: Any) -> Any:
    """`model` linearized with `method`, its trained tensors loaded from `weights` and LoRA merged (into new
    tensors: `model` itself is left unchanged). `weights`: "default" (the shipped one for `model_name`), a
    directory written by `ship`, "none" (untrained), or "auto" (the shipped one when there is one, else none).
    The result's `recipe` is the loaded recipe.json, or None when untrained."""
    from safetensors.torch import load_file

    from lincompile.api import optimize
    from lincompile.train.lora import apply_lora, merge_lora

    if str(weights) == "auto":
        weights = "default" if f"{model_name}-{method}" in available() else "none"
    if str(weights) == "none":
        linear = optimize(model, method, **optimize_kwargs)
        linear.recipe = None
        return linear
    path = shipped_dir(model_name, method) if str(weights) == "default" else Path(weights)
    if not (path / RECIPE_FILE).is_file():
        raise FileNotFoundError(f"no trained linearization at {path} (shipped: {', '.join(available()) or 'none'}); "
                                "train one with `lincompile train` and `lincompile.pretrained.ship`, or use "
                                "weights='none' for an untrained one")
    recipe = json.loads((path / RECIPE_FILE).read_text())
    config = LinearizeConfig.from_dict(recipe["linearize"])
    if config.method != method:
        raise ValueError(f"{path} holds a {config.method} linearization, not {method}")
    linear = optimize(model, config=config, **optimize_kwargs)
    lora = recipe.get("lora")
    if lora:
        apply_lora(linear.graph, tuple(lora["targets"]), lora["rank"], lora["alpha"], lora.get("seed", 0))
    tensors = load_file(path / TENSORS_FILE)
    own = dict(linear.graph.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:4]} do not belong to this model's linearized graph")
    for name, value in tensors.items():
        if own[name].shape != value.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(own[name].shape)}")
        owner_name, _, attr = name.rpartition(".")
        setattr(linear.graph.get_submodule(owner_name), attr,  # a new tensor: never write into `model`'s weights
                torch.nn.Parameter(value.to(own[name].dtype), requires_grad=own[name].requires_grad))
    if lora:
        merge_lora(linear.graph)
    linear.recipe = recipe
    return linear


def ship(checkpoint_dir: str | Path, out_dir: str | Path, notes: dict[str, Any]) -> Path:
    """Write a shipped linearization from a `lincompile train` checkpoint: its trained tensors in fp32, its
    LinearizeConfig and LoRA layout, plus `notes` (command, tokens, time, machine, scores). Atomic."""
    from safetensors.torch import save_file

    from lincompile.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_dir)
    train = checkpoint.train_config
    lora = ({"targets": list(train["lora_targets"]), "rank": train["lora_rank"], "alpha": train["lora_alpha"],
             "seed": train["seed"]} if train.get("lora_rank") and not train.get("full") else None)
    tensors = {k: v.detach().float().contiguous() for k, v in checkpoint.tensors.items()}
    recipe = {"linearize": checkpoint.linearize, "lora": lora, "step": checkpoint.step, "train_config": train,
              **notes}
    with atomic_directory(Path(out_dir)) as tmp:
        save_file(tensors, tmp / TENSORS_FILE)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    return Path(out_dir)
