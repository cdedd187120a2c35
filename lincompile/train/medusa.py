"""Training Medusa heads on a frozen target: precomputed hidden states, self-distilled labels, per-head CE.

Pipeline: `precompute_features` runs the target once over the token blocks and keeps its final hidden states
(the lm_head input) and its greedy predictions; `train_medusa` then trains the heads on random token positions
of those features, so the target never runs again and many epochs are cheap. Invariants:
- the target is frozen and only read; the heads' lm_head is the target's (in fp32 for training);
- head i (1-based) at position t is trained toward token t+1+i: by default the target's own greedy prediction
  at position t+i ("self": drafts must match the target, not the corpus), or the corpus token ("corpus");
- positions whose label falls past the end of a block are ignored for that head;
- the held-out metric always compares with the target's greedy predictions, whatever the training labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lincompile.runtime.medusa import MedusaConfig, MedusaHeads

__all__ = ["HiddenFn", "HiddenTarget", "Features", "MedusaTrainResult", "LABEL_SOURCES", "hf_target",
           "linearized_target", "as_target", "precompute_features", "head_labels", "evaluate_heads",
           "train_medusa"]

#: input_ids [B, T] -> (logits [B, T, V], final hidden state [B, T, H]).
HiddenFn = Callable[[Tensor], tuple[Tensor, Tensor]]
LABEL_SOURCES = ("self", "corpus")
IGNORE = -100


@dataclass(frozen=True)
class HiddenTarget:
    """A frozen target seen through its final hidden states, and its lm_head weight [V, H]."""

    hidden_fn: HiddenFn
    lm_head_weight: Tensor


def hf_target(model: nn.Module) -> HiddenTarget:
    """A Hugging Face causal LM: the last `hidden_states` entry (after the final norm) and its output embeddings."""
    def hidden_fn(input_ids: Tensor) -> tuple[Tensor, Tensor]:
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        return out.logits, out.hidden_states[-1]

    return HiddenTarget(hidden_fn, model.get_output_embeddings().weight)


def linearized_target(model: nn.Module) -> HiddenTarget:
    """A `LinearizedModel`, through `lincompile.runtime.graphs` (hidden states of every position)."""
    from lincompile.runtime.graphs import forward_with_hidden, lm_head_weight

    def hidden_fn(input_ids: Tensor) -> tuple[Tensor, Tensor]:
        out, hidden = forward_with_hidden(model, input_ids)
        return out.logits, hidden

    return HiddenTarget(hidden_fn, lm_head_weight(model))


def as_target(model: nn.Module | HiddenTarget) -> HiddenTarget:
    """`model` as a HiddenTarget: a LinearizedModel, a Hugging Face causal LM, or a HiddenTarget already."""
    from lincompile.backends.eager import LinearizedModel

    if isinstance(model, HiddenTarget):
        return model
    return linearized_target(model) if isinstance(model, LinearizedModel) else hf_target(model)


@dataclass(frozen=True)
class Features:
    """What the heads learn from, for blocks [N, T]: `hidden` [N, T, H] (storage dtype), `greedy` [N, T] (the
    target's argmax at each position, i.e. its prediction of the next token) and the corpus `ids` [N, T]."""

    hidden: Tensor
    greedy: Tensor
    ids: Tensor

    @property
    def tokens(self) -> int:
        return self.ids.numel()


@torch.no_grad()
def precompute_features(target: nn.Module | HiddenTarget, blocks: Tensor, batch_size: int = 4,
                        dtype: torch.dtype = torch.float16, progress: bool = True,
                        keep_hidden: bool = True) -> Features:
    """Run the target once over `blocks` [N, T] (batches of `batch_size` blocks); hidden states kept in `dtype`
    (`keep_hidden=False`: not kept, `hidden` is [N, T, 0], for callers that need only the greedy tokens)."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [num_blocks, block_size >= 2], got {tuple(blocks.shape)}")
    target = as_target(target)
    device = target.lm_head_weight.device
    hidden, greedy = [], []
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="target features", disable=not progress,
                      leave=False):
        logits, h = target.hidden_fn(blocks[start:start + batch_size].to(device))
        hidden.append(h.to("cpu", dtype) if keep_hidden else h.new_zeros(h.shape[:-1] + (0,), device="cpu",
                                                                         dtype=dtype))
        greedy.append(logits.argmax(-1).cpu())
    return Features(torch.cat(hidden), torch.cat(greedy), blocks.cpu())


def head_labels(features: Features, num_heads: int, source: str = "self") -> Tensor:
    """Labels [N, T, num_heads]; [..., t, i-1] is the target of head i at t, IGNORE (-100) past the block end."""
    if source not in LABEL_SOURCES:
        raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {source!r}")
    tokens, offset = (features.greedy, 0) if source == "self" else (features.ids, 1)
    n, t = tokens.shape
    labels = torch.full((n, t, num_heads), IGNORE, dtype=torch.long)
    for i in range(1, num_heads + 1):
        shift = i + offset
        if shift < t:
            labels[:, : t - shift, i - 1] = tokens[:, shift:]
    return labels


@torch.no_grad()
def evaluate_heads(heads: MedusaHeads, features: Features, batch_tokens: int = 256) -> dict[str, Any]:
    """Held-out agreement with the target's greedy decoding.

    `accuracy[i-1]`: top-1 accuracy of head i vs the target's argmax at t+i; `top5`: the same within the head's
    top 5; `chain_tokens`: mean tokens per target call a greedy chain of all heads would yield (1 + the number of
    leading heads that are right), over positions where every head has a label."""
    k = heads.config.num_heads
    labels = head_labels(features, k).reshape(-1, k)
    hidden = features.hidden.reshape(-1, features.hidden.shape[-1])
    right = torch.zeros(labels.shape, dtype=torch.bool)
    in_top5 = torch.zeros(labels.shape, dtype=torch.bool)
    for start in range(0, hidden.shape[0], batch_tokens):
        logits = heads(hidden[start:start + batch_tokens].to(heads.lm_head_weight.device, torch.float32)).cpu()
        rows = labels[start:start + batch_tokens]  # logits [b, K, V]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        right[start:start + rows.shape[0]] = top[..., 0] == rows
        in_top5[start:start + rows.shape[0]] = (top == rows.unsqueeze(-1)).any(-1)
    valid = labels != IGNORE
    full = valid.all(-1)
    leading = right[full].int().cumprod(-1).sum(-1).float()
    return {"accuracy": [round(float(right[:, i][valid[:, i]].float().mean()), 4) for i in range(k)],
            "top5": [round(float(in_top5[:, i][valid[:, i]].float().mean()), 4) for i in range(k)],
            "chain_tokens": round(1 + float(leading.mean()), 4) if full.any() else None,
            "positions": int(valid[:, 0].sum())}


@dataclass
class MedusaTrainResult:
    """The trained heads, per-step records (`step`, `lr`, `loss`, `ce` per head), evaluations and the save path."""

    heads: MedusaHeads
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    saved: Path | None


def _lr(base: float, warmup: int, steps: int, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_medusa(target: nn.Module | HiddenTarget, blocks: Tensor | Features, config: MedusaConfig, steps: int,
                 lr: float = 1e-3, batch_size: int = 512, out_dir: str | Path | None = None, *,
                 heldout: Tensor | Features | None = None, labels: str = "self", warmup_steps: int = 20,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, eval_every: int = 0, seed: int = 0,
                 feature_batch: int = 4, progress: bool = True,
                 metadata: dict[str, Any] | None = None) -> MedusaTrainResult:
    """Train `config.num_heads` heads on the frozen `target` and save them to `out_dir` (if given), atomically.

    `blocks` [N, T] token blocks, or their precomputed `Features`; `batch_size` is token positions per step,
    drawn uniformly with replacement from the training features (seeded by `seed`). Each head's loss is the mean
    CE over its labelled positions; the step loss is their sum. `heldout` (blocks or features) is evaluated
    (`evaluate_heads`) before training, every `eval_every` steps and at the end. `metadata` goes to medusa.json
    with the training settings and the last evaluation."""
    if labels not in LABEL_SOURCES:
        raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if steps < 0 or batch_size < 1 or warmup_steps < 0 or eval_every < 0 or not lr > 0:
        raise ValueError("need steps >= 0, batch_size >= 1, warmup_steps >= 0, eval_every >= 0 and lr > 0")
    source = as_target(target)
    weight = source.lm_head_weight.detach().float()
    train_features = blocks if isinstance(blocks, Features) else precompute_features(
        source, blocks, feature_batch, progress=progress)
    held = heldout if heldout is None or isinstance(heldout, Features) else precompute_features(
        source, heldout, feature_batch, progress=progress)
    heads = MedusaHeads(config, weight).to(weight.device)  # the blocks where the target's lm_head is
    hidden = train_features.hidden.reshape(-1, config.hidden_size)
    targets = head_labels(train_features, config.num_heads, labels).reshape(-1, config.num_heads)
    usable = (targets != IGNORE).any(-1).nonzero().squeeze(-1)
    if usable.numel() == 0:
        raise ValueError("no training position has a label: blocks are too short for these heads")
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        if held is not None:
            heads.eval()
            evals.append({"step": step, **evaluate_heads(heads, held)})
            heads.train()
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}" if history else "-",
                            acc1=evals[-1]["accuracy"][0], refresh=False)

    bar = tqdm(total=steps, desc="medusa heads", disable=not progress)
    try:
        heads.train()
        evaluate(0)
        for step in range(steps):
            rate = _lr(lr, warmup_steps, steps, step)
            for group in optimizer.param_groups:
                group["lr"] = rate
            rows = usable[torch.randint(usable.numel(), (batch_size,), generator=generator)]
            h, y = hidden[rows].to(weight.device, torch.float32), targets[rows].to(weight.device)
            optimizer.zero_grad(set_to_none=True)
            ce = []
            for i, head in enumerate(heads.heads):  # one head at a time: one [batch, V] logits tensor alive
                if (y[:, i] == IGNORE).all():
                    ce.append(0.0)
                    continue
                loss = F.cross_entropy(F.linear(head(h), weight), y[:, i], ignore_index=IGNORE)
                loss.backward()
                ce.append(float(loss.detach()))
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            history.append({"step": step + 1, "lr": rate, "loss": sum(ce), "ce": ce})
            bar.set_postfix(loss=f"{sum(ce):.4g}", refresh=False)
            bar.update(1)
            if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
                evaluate(step + 1)
    finally:
        bar.close()
        heads.eval()
    saved = None
    if out_dir is not None:
        info = {"steps": steps, "lr": lr, "batch_size": batch_size, "labels": labels, "seed": seed,
                "train_tokens": train_features.tokens, "final_loss": history[-1]["loss"] if history else None,
                "heldout": evals[-1] if evals else None}
        saved = heads.save(out_dir, {**(metadata or {}), "training": info})
    return MedusaTrainResult(heads, history, evals, saved)

