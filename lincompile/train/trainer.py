"""The two-stage training loop: attention transfer (stage 1), then fine-tuning (stage 2), resumable and distributed.

Global steps 0 .. stage1_steps-1 are stage 1, the next stage2_steps are stage 2. Invariants:
- the batch of global step s is `batch_indices(seed, s, batch_size, len(blocks))`, a function of (seed, s) only, so a
  resumed run sees exactly the batches of an uninterrupted one;
- each step's loss is the mean over the global batch whatever the world size and `grad_accum`: every rank takes
  its shard of each micro-batch, gradients are summed across ranks (DDP semantics through one bucketed all-reduce
  per optimizer step) and the learning rate is a pure function of the step within its stage (linear warm-up,
  then constant or a cosine decay to 0 over the stage);
- only the parameters of the current stage require grad while training; the flags are restored afterwards;
- rank 0 alone evaluates and writes checkpoints (atomic; see `lincompile.train.checkpoint`).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, fx
from tqdm.auto import tqdm

from lincompile.jsonconfig import JsonConfig
from lincompile.backends.eager import LinearizedModel
from lincompile.diagnostics import warn
from lincompile.runtime.state import check_positions
from lincompile.train.attention_transfer import TransferObjective, attention_parameters
from lincompile.train.checkpoint import (Checkpoint, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint,
                                         source_fingerprint)
from lincompile.train.eval import perplexity
from lincompile.train.finetune import FinetuneObjective, frozen_teacher, stage2_parameters
from lincompile.train.lora import DEFAULT_TARGETS, LORA_MODULE, apply_lora

TRAIN_CONFIG_VERSION = 1
#: Fields that may differ between a checkpoint and the run that resumes it (they do not change past steps).
RESUMABLE_CHANGES = frozenset({"stage2_steps", "eval_every", "eval_blocks", "checkpoint_every", "keep_checkpoints"})
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Hyper-parameters of a run. `batch_size` is the global number of blocks per optimizer step, split into
    `grad_accum` micro-batches and across ranks; `lora_rank` 0 means no adapters; `full` trains every parameter
    (no LoRA); `eval_every` / `checkpoint_every` 0 mean only at the end of each stage; `lr_schedule` applies
    after each stage's warm-up ("cosine" decays to 0 at the stage's end)."""

    stage1_steps: int = 100
    stage2_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int = 256
    stage1_lr: float = 1e-2
    lr: float = 1e-4
    warmup_steps: int = 20
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    full: bool = False
    train_norms: bool = False
    train_embeddings: bool = False
    kl_weight: float = 0.0
    eval_every: int = 0
    eval_blocks: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    bf16: bool = True
    version: int = TRAIN_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        counts = ("stage1_steps", "stage2_steps", "warmup_steps", "eval_every", "checkpoint_every", "lora_rank")
        negative = [n for n in counts if getattr(self, n) < 0]
        if negative:
            raise ValueError(f"{negative} must be >= 0")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum "
                             f"({self.grad_accum})")
        if self.block_size < 2 or self.keep_checkpoints < 1 or not self.kl_weight >= 0:  # NaN too
            raise ValueError(f"need block_size >= 2, keep_checkpoints >= 1 and kl_weight >= 0, got "
                             f"{self.block_size}, {self.keep_checkpoints} and {self.kl_weight}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 (the adapters' scale is lora_alpha / lora_rank), got "
                             f"{self.lora_alpha}")
        negative = [name for name in ("lr", "stage1_lr", "weight_decay", "max_grad_norm")
                    if not getattr(self, name) >= 0]  # NaN too
        if negative:
            raise ValueError(f"{negative} must be >= 0 (max_grad_norm 0: no clipping), got "
                             f"{[getattr(self, name) for name in negative]}")
        if self.eval_blocks < 0:
            raise ValueError(f"eval_blocks must be >= 0, got {self.eval_blocks}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.full and self.lora_rank:
            raise ValueError("full fine-tuning trains every weight; set lora_rank=0 with full=True")

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


@dataclass
class Distributed:
    """This process's place in a torch.distributed job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str | None = None) -> "Distributed":
        """Join the job torchrun describes (WORLD_SIZE > 1: nccl on GPU, gloo on CPU), else a single process.

        `device` None picks CUDA when available (cuda:LOCAL_RANK under torchrun); "cpu" or "cuda[:N]" otherwise.
        Under torchrun each process takes cuda:LOCAL_RANK, so a GPU index there is refused rather than ignored."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device is not None:
            try:
                kind, index = torch.device(device).type, torch.device(device).index
            except RuntimeError:
                kind, index = device, None
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"device {device!r}: use cpu or cuda (cuda:N for one GPU)")
            if world > 1 and index is not None:
                raise ValueError(f"device {device!r}: under torchrun each process uses cuda:LOCAL_RANK; "
                                 "pass --device cuda (no index), and choose GPUs with CUDA_VISIBLE_DEVICES")
            if kind == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {device!r}: this PyTorch sees no CUDA GPU; use cpu, or drop --device")
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if world <= 1:
            return cls(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        target = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(target)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), target, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum over ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every gradient over ranks with one bucketed all-reduce (a missing gradient counts as zero)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(seed: int, step: int, batch: int, n: int) -> Tensor:
    """Rows of global step `step`: positions step*batch .. of the stream of per-epoch permutations of range(n)."""
    positions = range(step * batch, (step + 1) * batch)
    return torch.stack([_permutation(seed, pos // n, n)[pos % n] for pos in positions])


def learning_rate(base: float, warmup: int, step_in_stage: int, schedule: str = "constant",
                  stage_steps: int = 0) -> float:
    """Linear warm-up over `warmup` steps (first step base/warmup), then constant, or ("cosine") half a cosine
    from `base` after warm-up to 0 after the stage's last step `stage_steps - 1`."""
    if step_in_stage < warmup:
        return base * (step_in_stage + 1) / warmup
    if schedule == "constant":
        return base
    decay_steps = max(1, stage_steps - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step_in_stage - warmup) / decay_steps)))


@dataclass
class TrainResult:
    """Per-step records (`step`, `stage`, `lr`, `loss`, and `site_mse` or `ce`/`kl`) and evaluations."""

    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    checkpoint: Path | None


@dataclass
class _Stage:
    number: int
    objective: Callable[[Tensor], tuple[Tensor, Tensor]]
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    base_lr: float
    first_step: int


def _teacher(linear: LinearizedModel, config: TrainConfig) -> fx.GraphModule | None:
    """Stage 2's KL teacher when it has one: the original model, so built before `init`, a checkpoint or stage 1
    change any weight (and before LoRA exists)."""
    if not (config.stage2_steps and config.kl_weight > 0):
        return None
    return frozen_teacher(linear, set(stage2_parameters(linear, config.full, config.train_norms,
                                                        config.train_embeddings)))


def _setup_stage(number: int, linear: LinearizedModel, config: TrainConfig,
                 teacher: fx.GraphModule | None) -> _Stage:
    """Build the objective, freeze everything but this stage's parameters, and create its optimizer."""
    objective: Callable[[Tensor], tuple[Tensor, Tensor]]
    if number == 1:
        params, objective = attention_parameters(linear), TransferObjective(linear)
        base_lr, first = config.stage1_lr, 0
    else:
        if config.lora_rank:
            apply_lora(linear.graph, config.lora_targets, config.lora_rank, config.lora_alpha, config.seed)
        params = stage2_parameters(linear, config.full, config.train_norms, config.train_embeddings)
        objective = FinetuneObjective(linear, config.kl_weight, teacher)
        base_lr, first = config.lr, config.stage1_steps
    if not params:
        fix = ("skip attention transfer with --stage1-steps 0 (stage1_steps=0)" if number == 1 else
               "use a LoRA rank > 0 or full fine-tuning")
        raise ValueError(f"stage {number} has nothing to train ({linear.config.spec.name} has no attention "
                         f"parameters): {fix}")
    trained = {id(p) for p in params.values()}
    for p in linear.graph.parameters():
        p.requires_grad_(id(p) in trained)
    optimizer = torch.optim.AdamW(list(params.values()), lr=base_lr, weight_decay=config.weight_decay)
    return _Stage(number, objective, params, optimizer, base_lr, first)


def _check_resumable(checkpoint: Checkpoint, linear: LinearizedModel, config: TrainConfig) -> None:
    if checkpoint.linearize != linear.config.to_dict():
        raise ValueError(f"{checkpoint.path} was trained with another LinearizeConfig: {checkpoint.linearize}")
    saved, now = TrainConfig.from_dict(checkpoint.train_config).to_dict(), config.to_dict()  # defaults filled in
    resumable = RESUMABLE_CHANGES if config.lr_schedule == "constant" else RESUMABLE_CHANGES - {"stage2_steps"}
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in resumable)
    if changed:
        raise ValueError(f"cannot resume {checkpoint.path}: the training config changed in {changed}")


def _run_step(stage: _Stage, blocks: Tensor, indices: Tensor, config: TrainConfig, parallel: Distributed,
              lr: float) -> list[float]:
    """One optimizer step on the global batch `indices`; returns [loss, extras...] averaged over the batch."""
    for group in stage.optimizer.param_groups:
        group["lr"] = lr
    stage.optimizer.zero_grad(set_to_none=True)
    micro = config.batch_size // (config.grad_accum * parallel.world)
    weight = micro / config.batch_size
    device = parallel.device
    totals: Tensor | None = None
    for m in range(config.grad_accum):
        start = (m * parallel.world + parallel.rank) * micro
        ids = blocks[indices[start:start + micro]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and config.bf16):
            loss, extras = stage.objective(ids)
        (loss * weight).backward()
        part = torch.cat([loss.detach().float().reshape(1), extras.float().reshape(-1)]) * weight
        totals = part if totals is None else totals + part
    params = list(stage.params.values())
    parallel.reduce_gradients(params)
    parallel.all_reduce(totals)
    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
    if not bool(torch.isfinite(norm)):  # the same on every rank (reduced gradients): no step, the caller stops
        return [math.nan, *totals.tolist()[1:]]
    stage.optimizer.step()
    return totals.tolist()


def _record(stage: _Stage, step: int, lr: float, values: list[float]) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "stage": stage.number, "lr": lr, "loss": values[0]}
    if stage.number == 1:
        record["site_mse"] = values[1:]
    else:
        record["ce"], record["kl"] = values[1:]
    return record


def train(linear: LinearizedModel, blocks: Tensor, config: TrainConfig, out_dir: str | Path, *,
          eval_blocks: Tensor | None = None, resume: bool = False, parallel: Distributed | None = None,
          progress: bool = True, on_step: Callable[[int, dict[str, Any]], None] | None = None,
          init: dict[str, Tensor] | None = None, desc: str = "train") -> TrainResult:
    """Train `linear` in place on `blocks` [N, T] and return its history; checkpoints go to out_dir/checkpoints.

    A fresh run seeds torch and `random` with `config.seed`; with `resume`, it continues from the newest complete
    checkpoint there instead (the same LinearizeConfig and training config, up to `RESUMABLE_CHANGES`), RNG states
    included. `parallel` defaults to a single process on the model's device. LoRA adapters stay in the graph
    afterwards (`merge_lora` folds them).
    `on_step(step, record)` runs after each step, once its checkpoint (if any) is written. `desc` names the run on
    its progress bar (or, without one, on its evaluation lines).
    `init` sets trained tensors by name before training, e.g. a previous run's method parameters and LoRA adapters
    (`lincompile.pretrained.trained_tensors`) to continue from; LoRA-adapter tensors are set when stage 2 creates
    the adapters, and every tensor must find a parameter of the same shape. Checkpoints record its names: resuming
    such a run takes the same `init` (the checkpoint's tensors then replace what it holds), and resuming one
    started without it refuses one. Checkpoints also record hashes of `blocks` and the model's first weight: a
    resume on others is refused.
    """
    linear.require_float("training", "train the float model, then quantize it")
    parallel = parallel or Distributed(device=linear.device)
    per_step = config.grad_accum * parallel.world
    if config.batch_size % per_step:
        raise ValueError(f"batch_size {config.batch_size} is not a multiple of grad_accum x world size ({per_step})")
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] != config.block_size:
        raise ValueError(f"blocks must be [num_blocks, block_size={config.block_size}], got {tuple(blocks.shape)}")
    if config.batch_size > blocks.shape[0]:
        raise ValueError(f"batch_size {config.batch_size} is more than the {blocks.shape[0]} training blocks: a batch "
                         "would hold a block twice; lower --batch-size, or give more text (or a larger "
                         "--max-train-blocks)")
    short = [f"stage {n}'s {steps}" for n, steps in ((1, config.stage1_steps), (2, config.stage2_steps))
             if 0 < steps < config.warmup_steps]
    if short:
        warn(f"warmup_steps {config.warmup_steps} is longer than {' and '.join(short)} steps: the learning rate "
             "never reaches its base value there (--warmup-steps sets the warm-up)")
    check_positions(linear, config.block_size, f"a block of {config.block_size} tokens (--block-size)")
    linear.to(parallel.device)
    root = Path(out_dir) / "checkpoints"
    found = latest_checkpoint(root) if resume else None
    checkpoint = load_checkpoint(found) if found is not None else None
    fingerprint = _fingerprint(linear, blocks, init)  # before any tensor is trained, restored or set from `init`
    if checkpoint is not None:
        _check_resumable(checkpoint, linear, config)
        _check_same_inputs(checkpoint, fingerprint)
        if checkpoint.step > config.total_steps:
            raise ValueError(f"{checkpoint.path} is at step {checkpoint.step}, past this run's {config.total_steps} "
                             "steps (stage 1 + stage 2): resume with at least as many, or start a new run with "
                             "--init that checkpoint")
    step = checkpoint.step if checkpoint else 0
    history: list[dict[str, Any]] = list(checkpoint.state["history"]) if checkpoint else []
    evals: list[dict[str, Any]] = list(checkpoint.state["evals"]) if checkpoint else []
    flags = [(p, p.requires_grad) for p in linear.graph.parameters()]
    stage: _Stage | None = None
    teacher = _teacher(linear, config)
    pending = dict(init or {})
    init_names = sorted(pending) if checkpoint is None else checkpoint.state.get("init", [])
    if checkpoint is not None:
        # the run's starting point before any stage is set up; the checkpoint's tensors replace what it holds, so
        # only what it lacks stays pending (LoRA after stage 1)
        rest = _copy_by_name(linear, _resume_init(checkpoint, init, fingerprint), "init", final=False)
        pending = {name: value for name, value in rest.items() if name not in checkpoint.tensors}
    _check_init(pending, config, linear)
    last_stage = 2 if config.stage2_steps else 1
    saved: Path | None = found
    bar = tqdm(total=config.total_steps, initial=step, disable=not (progress and parallel.is_main), desc=desc)
    postfix: dict[str, str] = {}

    def evaluate(number: int) -> None:
        if eval_blocks is None or not parallel.is_main:
            return
        result = perplexity(linear, eval_blocks.to(parallel.device), max(1, config.batch_size // per_step),
                            progress=False)
        evals.append({"step": step, "stage": number, "ppl": result.ppl})
        postfix["eval_ppl"] = f"{result.ppl:.4g}"
        bar.set_postfix(postfix)
        if not progress:  # no bar to carry the number: one line per evaluation
            loss = f", loss {history[-1]['loss']:.4g}" if history else ""
            print(f"[{desc}] step {step}/{config.total_steps} (stage {number}){loss}: held-out ppl {result.ppl:.4g}",
                  file=sys.stderr, flush=True)

    try:
        fresh = checkpoint is None
        if fresh:
            torch.manual_seed(config.seed)
            random.seed(config.seed)
        while step < config.total_steps:
            number = 1 if step < config.stage1_steps else 2
            if stage is None or stage.number != number:
                stage = _setup_stage(number, linear, config, teacher)
                bar.set_description(f"{desc} stage {number}")
                if checkpoint is not None:
                    _restore(checkpoint, linear, stage)
                    checkpoint = None
                pending = _copy_by_name(linear, pending, "init", final=number == last_stage)
                if fresh:  # the starting point, once the stage's adapters (zero deltas) and `init` are in place
                    evaluate(number)
                    fresh = False
            lr = learning_rate(stage.base_lr, config.warmup_steps, step - stage.first_step, config.lr_schedule,
                               config.stage1_steps if number == 1 else config.stage2_steps)
            indices = batch_indices(config.seed, step, config.batch_size, blocks.shape[0])
            record = _record(stage, step + 1, lr, _run_step(stage, blocks, indices, config, parallel, lr))
            if not math.isfinite(record["loss"]):  # stop before a checkpoint of broken weights prunes good ones
                raise FloatingPointError(
                    f"step {step + 1}: the loss or its gradient is not finite: training diverged, and nothing from "
                    "this step on was saved; " + (f"resume from {saved} (--resume) with a lower --lr or more "
                                                  "--warmup-steps" if saved else
                                                  "train again with a lower --lr or more --warmup-steps"))
            history.append(record)
            step += 1
            postfix.update(loss=f"{record['loss']:.4g}", lr=f"{lr:.2g}")
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            stage_end = step in (config.stage1_steps, config.total_steps)
            if stage_end or (config.eval_every and step % config.eval_every == 0):
                evaluate(number)
            if parallel.is_main and (stage_end or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                saved = _save(root, step, linear, stage, config, history, evals, init_names, fingerprint)
            if on_step is not None:
                on_step(step, record)
        if checkpoint is not None:  # resumed a finished run: load its final parameters
            _restore(checkpoint, linear, _setup_stage(2 if config.stage2_steps else 1, linear, config, teacher))
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
    return TrainResult(history, evals, saved)


def _trained_tensors(linear: LinearizedModel, stage: _Stage) -> dict[str, Tensor]:
    """Everything trained so far: the method parameters and this stage's parameters."""
    return {**attention_parameters(linear), **stage.params}


def _resume_init(checkpoint: Checkpoint, init: dict[str, Tensor] | None,
                 fingerprint: dict[str, str]) -> dict[str, Tensor]:
    """The `init` a resumed run starts from: a run started from `init` must be resumed with the same tensors (its
    checkpoints record their names and a digest of their values), one started without it without (older
    checkpoints recorded neither, or no digest: not checked)."""
    names = checkpoint.state.get("init", [])
    if not names:
        if init and "init" in checkpoint.state:
            raise ValueError(f"{checkpoint.path}: this run started without init tensors; resume it without --init")
        return {}
    if init is None or sorted(init) != names:
        given = "none" if init is None else f"{len(init)} other tensors"
        raise ValueError(f"{checkpoint.path}: this run started from {len(names)} init tensors ({given} given now); "
                         "resume it with the same --init")
    saved = checkpoint.state.get("fingerprint", {}).get("init")
    if saved is not None and saved != fingerprint["init"]:
        raise ValueError(f"{checkpoint.path}: this run started from init tensors of the same names but other values; "
                         "resume it with the same --init")
    return dict(init)


def _fingerprint(linear: LinearizedModel, blocks: Tensor, init: dict[str, Tensor] | None) -> dict[str, str]:
    """Hashes of what a resumed run must share with the run it continues: the training tokens, the model's first
    weight (the embeddings) as loaded, and the `init` tensors (names and values)."""
    def update(hasher: Any, t: Tensor) -> Any:
        data = t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)  # the bytes, whatever the dtype
        hasher.update(memoryview(data.numpy()))
        return hasher

    tensors = hashlib.sha256()
    for name in sorted(init or {}):
        update(tensors, init[name]).update(name.encode())
    return {"data": update(hashlib.sha256(), blocks).hexdigest()[:16],
            "model": update(hashlib.sha256(), next(linear.graph.parameters())).hexdigest()[:16],
            "init": tensors.hexdigest()[:16], "source": source_fingerprint(linear.graph)}


def _check_same_inputs(checkpoint: Checkpoint, fingerprint: dict[str, str]) -> None:
    """Refuse to resume on other training tokens (--data, --max-train-blocks, tokenizer) or another model; older
    checkpoints, which recorded neither, are not checked."""
    saved = checkpoint.state.get("fingerprint", {})
    what = {"data": "training tokens (--data, --max-train-blocks)", "model": "model weights"}
    changed = [what[k] for k in what if k in saved and saved[k] != fingerprint[k]]
    if changed:
        raise ValueError(f"cannot resume {checkpoint.path}: other {' and '.join(changed)} than the run it continues")


def _save(root: Path, step: int, linear: LinearizedModel, stage: _Stage, config: TrainConfig,
          history: list[dict[str, Any]], evals: list[dict[str, Any]], init: list[str],
          fingerprint: dict[str, str]) -> Path:
    tensors = _trained_tensors(linear, stage)
    state = {"stage": stage.number, "optimizer_params": list(stage.params), "history": history, "evals": evals,
             "init": init, "fingerprint": fingerprint}
    return save_checkpoint(root, step, tensors, stage.optimizer.state_dict(), linear.config.to_dict(),
                           config.to_dict(), state, config.keep_checkpoints)


def _check_init(pending: dict[str, Tensor], config: TrainConfig, linear: LinearizedModel) -> None:
    """Refuse `init` tensors no step of this run would start from: none trains, adapters without a stage 2, or
    names that are neither a parameter nor an adapter (which stage 2 adds), before any step rather than at the
    stage that would copy them."""
    if pending and not config.total_steps:
        raise ValueError("init sets tensors for training to continue from, and this run trains 0 steps: use them as "
                         "they are with --weights in eval, generate or export (Python: "
                         "lincompile.pretrained.linearized(model, method, weights=...))")
    adapters = sorted(name for name in pending if name.startswith(LORA_MODULE + "."))
    if adapters and not config.stage2_steps:
        raise ValueError(f"init holds LoRA adapters ({adapters[0]}, ...), which stage 2 adds, and this run has no "
                         "stage 2 (stage2_steps=0, --stage2-steps 0): give it stage-2 steps, or start from tensors "
                         "without adapters")
    params = dict(linear.graph.named_parameters())
    unknown = sorted(name for name in pending if name not in params and not name.startswith(LORA_MODULE + "."))
    if unknown:
        raise ValueError(f"init: tensors {unknown[:4]} match no parameter of this model (another model, or another "
                         "method?)")


@torch.no_grad()
def _copy_by_name(linear: LinearizedModel, tensors: dict[str, Tensor], source: str,
                  final: bool) -> dict[str, Tensor]:
    """Copy the `tensors` the graph has a parameter for now; return the rest (an error when `final`). Every
    check runs before the first copy, and a shape mismatch is always an error."""
    params = dict(linear.graph.named_parameters())
    rest = {name: value for name, value in tensors.items() if name not in params}
    if final and rest:
        raise ValueError(f"{source}: tensors {sorted(rest)[:4]} match no parameter of this model (trained with "
                         "other LoRA targets, or another model?)")
    present = {name: value for name, value in tensors.items() if name in params}
    for name, value in present.items():
        if params[name].shape != value.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model "
                             f"{tuple(params[name].shape)} (another LoRA rank or model?)")
    for name, value in present.items():
        params[name].copy_(value)
    return rest


@torch.no_grad()
def _restore(checkpoint: Checkpoint, linear: LinearizedModel, stage: _Stage) -> None:
    """Load trained tensors, the optimizer (if saved by this stage) and the RNG states into a fresh stage."""
    _copy_by_name(linear, checkpoint.tensors, str(checkpoint.path), final=True)
    if checkpoint.state["stage"] == stage.number:
        if checkpoint.state["optimizer_params"] != list(stage.params):
            raise ValueError(f"{checkpoint.path}: the optimizer was built over other parameters")
        stage.optimizer.load_state_dict(checkpoint.optimizer)
    restore_rng(checkpoint.rng)
