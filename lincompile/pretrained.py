"""Shipped trained linearizations: only the trained tensors (new attention parameters and LoRA deltas).

A shipped linearization is a directory `lincompile/weights/<model>-<method>/` with `trained.safetensors` and
`recipe.json` (the LinearizeConfig, the LoRA layout, how it was trained and what it scored). `linearized`
rebuilds it on the base model: optimize with the recorded config, add the same LoRA adapters, load the
tensors, merge the adapters. `ship` writes such a directory from a `lincompile train` checkpoint;
`trained_tensors` reads either kind back (`lincompile train --init` continues from it).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lincompile.atomic import atomic_directory
from lincompile.config import LinearizeConfig
from lincompile.diagnostics import warn
from lincompile.jsonconfig import read_json_object
from lincompile.methods.spec import get_method

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TENSORS_FILE = "trained.safetensors"
RECIPE_FILE = "recipe.json"


def shipped_dir(model: str, method: str) -> Path:
    return WEIGHTS_DIR / f"{model}-{method}"


def available() -> list[str]:
    """Names (`<model>-<method>`) of the shipped linearizations."""
    return sorted(p.name for p in WEIGHTS_DIR.glob("*") if (p / RECIPE_FILE).is_file())


def trained(model: Any) -> bool | None:
    """Whether `linearized` loaded trained tensors into `model` (its `recipe`); None when not known: a model from
    `lincompile.optimize` or `lincompile.load` records no recipe."""
    return model.recipe is not None if hasattr(model, "recipe") else None


def linearized(model: torch.nn.Module, method: str = "augmented", weights: str | Path = "default",
               model_name: str = "smollm2-135m", global_cap: int | None = None, **optimize_kwargs: Any) -> Any:
    """`model` linearized with `method`, its trained tensors loaded from `weights` and LoRA merged (into new
    tensors: `model` itself is left unchanged). `weights`: "default" (the shipped one for `model_name`), a
    directory written by `ship` or a training checkpoint, "none" (untrained), or "auto" (the shipped one when
    there is one, else none). `global_cap`: the grouped global branch's `MethodSpec.global_cap`; None takes the
    recipe's (`recipe.json`'s "global_cap", chosen for the trained tensors), else the method's own.
    The result's `recipe` is the loaded recipe.json, or None when untrained."""
    from lincompile.api import optimize
    from lincompile.train.checkpoint import source_fingerprint
    from lincompile.train.lora import apply_lora, merge_lora

    if str(weights) == "auto":
        weights = "default" if f"{model_name}-{method}" in available() else "none"
    if str(weights) == "none":
        linear = optimize(model, with_global_cap(LinearizeConfig(method=method), global_cap).method, **optimize_kwargs)
        linear.recipe = None
        return linear
    tensors, recipe = trained_tensors(weights, model_name, method)
    config = recipe_config(recipe, global_cap)
    layers = optimize_kwargs.pop("layers", None)
    if layers is not None and tuple(layers) != config.layers:
        raise ValueError(f"{weights} was trained with layers={config.layers} (None: every site); its tensors do not "
                         f"fit layers={tuple(layers)}: use weights='none' (--weights none) for an untrained hybrid")
    config = dataclasses.replace(config, strict=optimize_kwargs.pop("strict", config.strict))
    linear = optimize(model, config=config, **optimize_kwargs)
    source = source_fingerprint(linear.graph)  # before the trained tensors (embeddings, with --full) replace any
    lora = recipe.get("lora")
    if lora:
        apply_lora(linear.graph, tuple(lora["targets"]), lora["rank"], lora["alpha"], lora.get("seed", 0))
    own = dict(linear.graph.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{weights}: tensors {unknown[:4]} do not belong to this model's linearized graph")
    for name, value in tensors.items():
        if own[name].shape != value.shape:
            raise ValueError(f"{weights}: {name} has shape {tuple(value.shape)}, the model "
                             f"{tuple(own[name].shape)}")
        owner_name, _, attr = name.rpartition(".")
        setattr(linear.graph.get_submodule(owner_name), attr,  # a new tensor: never write into `model`'s weights
                torch.nn.Parameter(value.to(own[name]), requires_grad=own[name].requires_grad))  # its device too
    if lora:
        merge_lora(linear.graph)
    warn_other_source(recipe, source, weights)
    linear.recipe = recipe
    return linear


def side_by_side(model: torch.nn.Module, method: str, weights: list[str],
                 global_caps: list[int | None]) -> Iterator[tuple[str, Any]]:
    """(name, `linearized` model) for each of `weights` read with each of `global_caps` (None: the recipe's), one
    at a time, named "augmented (default, global_cap=64)" ("augmented (default)" for None)."""
    for weight in weights:
        for cap in global_caps:
            yield (f"{method} ({weight}" + (f", global_cap={cap})" if cap is not None else ")"),
                   linearized(model, method, weight, global_cap=cap))


def with_global_cap(config: LinearizeConfig, global_cap: int | None) -> LinearizeConfig:
    """`config` with its method's global_cap set to `global_cap` (None: as it is)."""
    if global_cap is None or config.spec.global_cap == global_cap:
        return config
    return dataclasses.replace(config, method=dataclasses.replace(config.spec, global_cap=global_cap))


def recipe_config(recipe: dict[str, Any], global_cap: int | None = None) -> LinearizeConfig:
    """The LinearizeConfig that reads a recipe's tensors: its `linearize`, with `global_cap` (None: the recipe's
    "global_cap" when it has one, else the cap it was trained with)."""
    return with_global_cap(LinearizeConfig.from_dict(recipe["linearize"]),
                           recipe.get("global_cap") if global_cap is None else global_cap)


def same_tensor_layout(a: LinearizeConfig, b: LinearizeConfig) -> bool:
    """Whether tensors trained under `a` fit `b`: the same config up to the global cap, which scales a sum and
    adds no tensor."""
    def uncapped(config: LinearizeConfig) -> dict[str, Any]:
        return dataclasses.replace(config, method=dataclasses.replace(config.spec, global_cap=0)).to_dict()
    return uncapped(a) == uncapped(b)


def trained_tensors(weights: str | Path, model_name: str, method: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The trained tensors of `weights` ("default": the shipped one for `model_name` and `method`; a directory
    written by `ship`; or a `lincompile train` checkpoint `OUT/checkpoints/step-N`), and its recipe: a dict with
    at least `linearize` (the LinearizeConfig as a dict) and `lora` (targets, rank, alpha, seed; None when
    the tensors hold no adapters). Raises ValueError when they belong to another method."""
    from safetensors.torch import load_file

    from lincompile.train.checkpoint import load_checkpoint

    path = shipped_dir(model_name, method) if str(weights) == "default" else Path(weights).expanduser()
    if (path / RECIPE_FILE).is_file():
        recipe = read_json_object(path / RECIPE_FILE, "write it again with lincompile.pretrained.ship", ("linearize",))
        tensors = load_file(path / TENSORS_FILE)
    elif (path / "state.json").is_file():
        checkpoint = load_checkpoint(path)
        recipe = {"linearize": checkpoint.linearize, "lora": lora_layout(checkpoint.train_config, checkpoint.tensors),
                  "step": checkpoint.step, "train_config": checkpoint.train_config,
                  "source": checkpoint.source}
        tensors = checkpoint.tensors
    elif (path / "checkpoints").is_dir() or (path.parent / "checkpoints").is_dir():
        run = path if (path / "checkpoints").is_dir() else path.parent
        raise FileNotFoundError(f"{path} is (in) a `lincompile train` run, whose trained tensors are its checkpoints: "
                                f"pass one, e.g. {run / 'checkpoints' / 'step-N'} (the newest is the run's end)")
    else:
        where = (f"shipped for {model_name} with {method}" if str(weights) == "default" else f"at {path}")
        raise FileNotFoundError(f"no trained linearization {where} (shipped: {', '.join(available()) or 'none'}); "
                                "train one with `lincompile train` and `lincompile.pretrained.ship`, or use "
                                "weights='none' (--weights none; `lincompile train`: no --init) for an untrained one")
    theirs = LinearizeConfig.from_dict(recipe["linearize"]).spec.name  # a name, or a spec (trained with a cap)
    if theirs != get_method(method).name:
        raise ValueError(f"{path} holds a {theirs} linearization, not {method}")
    return tensors, recipe


def warn_other_source(recipe: dict[str, Any], source: str, weights: str | Path) -> None:
    """Warn when `weights` (its `recipe`) were trained on another model than the one whose `source_fingerprint` is
    `source` (taken before any trained tensor is copied in: training may change the embeddings it hashes; tensors
    of the right shapes load into any model of the architecture); recipes from before the fingerprint say nothing."""
    if recipe.get("source") and recipe["source"] != source:
        warn(f"{weights} was trained on another model than this one (their embeddings differ): its tensors load, but "
             "they were trained for that model")


def lora_layout(train_config: dict[str, Any], tensors: Iterable[str] | None = None) -> dict[str, Any] | None:
    """The LoRA layout a training config gives its adapters (None without adapters). With the names of the
    `tensors` it saved: None too when they hold none (a checkpoint from before stage 2 added them)."""
    from lincompile.train.lora import LORA_MODULE

    if not train_config.get("lora_rank") or train_config.get("full"):
        return None
    if tensors is not None and not any(name.startswith(LORA_MODULE + ".") for name in tensors):
        return None
    return {"targets": list(train_config["lora_targets"]), "rank": train_config["lora_rank"],
            "alpha": train_config["lora_alpha"], "seed": train_config["seed"]}


def ship(checkpoint_dir: str | Path, out_dir: str | Path, notes: dict[str, Any]) -> Path:
    """Write a shipped linearization from a `lincompile train` checkpoint: its trained tensors in fp32, its
    LinearizeConfig and LoRA layout, plus `notes` (command, tokens, time, machine, scores). Atomic."""
    from safetensors.torch import save_file

    from lincompile.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_dir)
    train = checkpoint.train_config
    lora = lora_layout(train, checkpoint.tensors)
    tensors = {k: v.detach().float().contiguous() for k, v in checkpoint.tensors.items()}
    recipe = {"linearize": checkpoint.linearize, "lora": lora, "step": checkpoint.step, "train_config": train,
              "source": checkpoint.source, **notes}
    with atomic_directory(Path(out_dir), RECIPE_FILE) as tmp:
        save_file(tensors, tmp / TENSORS_FILE)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    return Path(out_dir)
