"""A shallow linearized draft model for speculative decoding, distilled from its target.

`make_draft` keeps the first N decoder layers of the target (plus embeddings, final norm and lm_head),
linearizes them with the target's method, trains them to match the target's next-token distribution
(KL(target || draft) per token, plus an optional corpus CE term) and saves the result with `save_pretrained`,
so `lincompile.load(dir)` reads it back. Two sources:
- a Hugging Face model (embedded name or directory): a shallow HF copy, linearized with `method`; the teacher is
  the full original model unless one is given;
- a directory saved by lincompile (e.g. `lincompile train`'s OUT/final): the draft inherits the first N layers'
  trained weights and method parameters, and the teacher is that linearized model itself.
Invariants: the teacher is frozen and never receives gradient; the draft owns copies of its weights (training it
never changes the target); the draft shares the target's tokenizer and vocabulary.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lincompile.api import SAVE_FILE, load, optimize
from lincompile.backends.eager import LinearizedModel
from lincompile.config import LinearizeConfig
from lincompile.jsonconfig import JsonConfig
from lincompile.runtime.drafts import vocab_size
from lincompile.runtime.state import check_positions
from lincompile.train.attention_transfer import graph_inputs
from lincompile.train.finetune import embedding_parameters
from lincompile.train.trainer import batch_indices, learning_rate

__all__ = ["DistillConfig", "DraftResult", "shallow_hf", "shallow_linearized", "agreement", "distill",
           "make_draft"]


@dataclass(frozen=True)
class DistillConfig(JsonConfig):
    """Distillation hyper-parameters. `batch_size` blocks of `block_size` tokens per step; `ce_weight` adds the
    corpus next-token CE; `train_embeddings` False keeps the token embeddings (and a tied lm_head) frozen."""

    steps: int = 200
    lr: float = 3e-4
    batch_size: int = 4
    block_size: int = 256
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ce_weight: float = 0.0
    train_embeddings: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.warmup_steps < 0 or self.batch_size < 1 or self.block_size < 2:
            raise ValueError("need steps >= 0, warmup_steps >= 0, batch_size >= 1 and block_size >= 2")
        if not self.lr > 0 or self.ce_weight < 0:
            raise ValueError("need lr > 0 and ce_weight >= 0")


def _layer_count(config: Any) -> int:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ValueError(f"{type(config).__name__} has no num_hidden_layers; cannot make a shallow draft of it")
    return count


def _shallow_config(config: Any, num_layers: int) -> Any:
    """A copy of an HF config with only the first `num_layers` decoder layers (per-layer lists cut too)."""
    total = _layer_count(config)
    if not 1 <= num_layers < total:
        raise ValueError(f"a draft needs 1 <= layers < {total} (the target's layer count), got {num_layers}")
    shallow = copy.deepcopy(config)
    shallow.num_hidden_layers = num_layers
    if isinstance(getattr(shallow, "layer_types", None), list):
        shallow.layer_types = shallow.layer_types[:num_layers]
    return shallow


def shallow_hf(model: nn.Module, num_layers: int) -> nn.Module:
    """A new HF model of `model`'s class with its first `num_layers` layers, final norm and heads (copied weights)."""
    draft = type(model)(_shallow_config(model.config, num_layers)).to(next(model.parameters()).dtype)
    missing, _ = draft.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"the shallow copy has weights the target lacks: {missing[:5]}")
    return draft.eval()


def _saved_config(path: Path) -> LinearizeConfig:
    return LinearizeConfig.from_dict(json.loads((path / SAVE_FILE).read_text())["linearize"])


def shallow_linearized(directory: str | Path, num_layers: int) -> LinearizedModel:
    """The first `num_layers` layers of a model saved by lincompile: same method, trained weights and parameters.

    Site i of a decoder-only model is layer i, so the draft's names are a subset of the saved ones."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(directory)
    config = _saved_config(path)
    if config.layers is not None:
        config = dataclasses.replace(config, layers=tuple(i for i in config.layers if i < num_layers))
    hf_config = _shallow_config(AutoConfig.from_pretrained(path, local_files_only=True), num_layers)
    draft = optimize(AutoModelForCausalLM.from_config(hf_config).eval(), config=config)
    saved = load_file(path / "model.safetensors")
    wanted = draft.graph.state_dict()
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise ValueError(f"{path}: the saved model lacks the draft's weights {missing[:5]}")
    draft.graph.load_state_dict({name: saved[name] for name in wanted})
    return draft


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    return model(input_ids, use_cache=False).logits


@torch.no_grad()
def agreement(draft: nn.Module, teacher: nn.Module, blocks: Tensor, batch_size: int = 4) -> dict[str, float]:
    """How well `draft` stands in for `teacher` on `blocks` [N, T]: `top1` (fraction of positions with the same
    argmax, a proxy for greedy acceptance) and `kl` (mean per-token KL(teacher || draft))."""
    same, kl, count = 0, 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size]
        p, q = _logits(teacher, ids).float(), _logits(draft, ids).float()
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        kl += float(F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="sum"))
        count += ids.numel()
    return {"top1": round(same / count, 4), "kl": round(kl / count, 4)}


def distill(draft: LinearizedModel, teacher: nn.Module, blocks: Tensor, config: DistillConfig, *,
            heldout: Tensor | None = None, progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train `draft` in place toward `teacher`'s logits on `blocks` [N, block_size]; (history, evaluations).

    Step s uses rows `batch_indices(seed, s, ...)`; the learning rate warms up linearly, then stays constant.
    `heldout` blocks are scored with `agreement` before and after."""
    if blocks.dim() != 2 or blocks.shape[1] != config.block_size:
        raise ValueError(f"blocks must be [num_blocks, block_size={config.block_size}], got {tuple(blocks.shape)}")
    gm = draft.graph
    frozen = set() if config.train_embeddings else {id(p) for p in embedding_parameters(gm).values()}
    params = [p for p in gm.parameters() if id(p) not in frozen]
    flags = [(p, p.requires_grad) for p in gm.parameters()]
    teacher_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if heldout is not None:
        evals.append({"step": 0, **agreement(draft, teacher, heldout)})
    torch.manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="distill draft", disable=not progress)
    try:
        for p in teacher.parameters():
            p.requires_grad_(False)
        for p, _ in flags:
            p.requires_grad_(id(p) not in frozen)
        for step in bar:
            rate = learning_rate(config.lr, config.warmup_steps, step)
            for group in optimizer.param_groups:
                group["lr"] = rate
            ids = blocks[batch_indices(config.seed, step, config.batch_size, blocks.shape[0])]
            with torch.no_grad():
                target = F.log_softmax(_logits(teacher, ids).float(), -1).flatten(0, 1)
            logits = gm(*graph_inputs(draft, ids))[0].float().flatten(0, 1)
            log_q = F.log_softmax(logits, -1)
            kl = F.kl_div(log_q, target, log_target=True, reduction="sum") / logits.shape[0]
            ce = F.nll_loss(log_q.view(ids.shape[0], -1, log_q.shape[-1])[:, :-1].flatten(0, 1),
                            ids[:, 1:].flatten()) if config.ce_weight else kl.new_zeros(())
            loss = kl + config.ce_weight * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            history.append({"step": step + 1, "lr": rate, "loss": float(loss.detach()), "kl": float(kl.detach()),
                            "ce": float(ce.detach())})
            bar.set_postfix(kl=f"{float(kl.detach()):.4g}", refresh=False)
    finally:
        bar.close()
        for p, flag in flags + teacher_flags:
            p.requires_grad_(flag)
    if heldout is not None:
        evals.append({"step": config.steps, **agreement(draft, teacher, heldout)})
    return history, evals


@dataclass
class DraftResult:
    """The distilled draft, its teacher, the tokenizer, per-step records, held-out agreements and the save path."""

    draft: LinearizedModel
    teacher: nn.Module
    tokenizer: Any
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    saved: Path | None


def _is_lincompile_dir(name: str) -> bool:
    return (Path(name).expanduser() / SAVE_FILE).is_file()


def _source(model_name_or_dir: str, num_layers: int,
            method: str | None) -> tuple[LinearizedModel, nn.Module, Any]:
    """(draft, default teacher, tokenizer) for a lincompile directory or a Hugging Face model."""
    if _is_lincompile_dir(model_name_or_dir):
        from transformers import AutoTokenizer

        path = Path(model_name_or_dir).expanduser()
        own = _saved_config(path).spec.name
        if method is not None and method != own:
            raise ValueError(f"{path} is linearized with {own}; its draft uses the same method (drop --method "
                             f"{method})")
        draft = shallow_linearized(path, num_layers)
        teacher = load(path)
        has_tokenizer = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
        return draft, teacher, tokenizer
    from lincompile.assets import load_model

    model, tokenizer = load_model(model_name_or_dir)
    return optimize(shallow_hf(model, num_layers), method or "augmented"), model, tokenizer


def _check_fits(draft: LinearizedModel, teacher: nn.Module, block_size: int) -> None:
    """Refuse a teacher that scores another vocabulary, and blocks longer than either model's learned positions."""
    mine, theirs = vocab_size(draft), vocab_size(teacher)
    if mine is not None and theirs is not None and mine != theirs:
        raise ValueError(f"the teacher scores {theirs} tokens, the draft {mine} (config.vocab_size): distilling "
                         "compares their logits token by token, so the teacher needs the draft's tokenizer and "
                         "vocabulary size (the target itself, or a model of its family with the same vocab_size)")
    for model in (draft, teacher):
        check_positions(model, block_size, f"a block of {block_size} tokens (--block-size)")


def make_draft(model_name_or_dir: str, num_layers: int, method: str | None = None,
               out_dir: str | Path | None = None, *, config: DistillConfig = DistillConfig(),
               blocks: Tensor | None = None, heldout: Tensor | None = None, data: str | Path = "default",
               eval_blocks: int = 4, teacher: nn.Module | None = None, progress: bool = True) -> DraftResult:
    """Make, distill and save (to `out_dir`, if given) an N-layer linearized draft of `model_name_or_dir`.

    `method` (default "augmented") applies to a Hugging Face source; a lincompile directory keeps its own.
    `blocks` default to the first steps x batch_size training blocks of `data`, `heldout` to `eval_blocks`
    held-out blocks (0: no evaluation); both need the source's tokenizer. `teacher` overrides the default."""
    from lincompile.train.data import heldout_blocks, load_texts, token_blocks

    draft, default_teacher, tokenizer = _source(model_name_or_dir, num_layers, method)
    teacher = default_teacher if teacher is None else teacher
    _check_fits(draft, teacher, config.block_size)
    if (blocks is None and config.steps) or (heldout is None and eval_blocks):
        if tokenizer is None:
            raise ValueError(f"{model_name_or_dir} has no tokenizer; pass token blocks to distill on")
        if blocks is None and config.steps:
            blocks = token_blocks(tokenizer, load_texts("train", data), config.block_size,
                                  config.steps * config.batch_size)
        if heldout is None and eval_blocks:
            heldout = heldout_blocks(tokenizer, config.block_size, eval_blocks, data=data,
                                     skip="eval_blocks=0; make-draft: --eval-blocks 0")
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if config.steps:
        history, evals = distill(draft, teacher, blocks, config, heldout=heldout, progress=progress)
    elif heldout is not None:
        evals = [{"step": 0, **agreement(draft, teacher, heldout)}]
    saved = Path(draft.save_pretrained(str(out_dir), tokenizer)) if out_dir is not None else None
    return DraftResult(draft, teacher, tokenizer, history, evals, saved)
