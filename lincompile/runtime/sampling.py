"""Turning logits into a next-token distribution: repetition penalty, temperature, top-k, top-p; and argument
checks."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """do_sample=False is greedy; otherwise sample from softmax(logits / temperature) after top-k/top-p. Either
    way the target's logits get `repetition_penalty` first, in fp32 (`penalize`, applied by `generate` and the
    speculative verify, which know the tokens so far). Drafts propose without it: verification keeps the output
    exact, a draft just gets fewer tokens accepted."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.do_sample and not self.temperature > 0:  # greedy ignores it, as Hugging Face's generate does
            raise ValueError(f"temperature must be > 0 to sample, got {self.temperature} (do_sample=False for greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def eos_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """End-of-sequence ids as a tuple (empty for None): one id, or several, any of which ends a sequence (as in
    Hugging Face generation configs)."""
    if eos_token_id is None:
        return ()
    if hasattr(eos_token_id, "tolist"):  # a tensor or NumPy value
        eos_token_id = eos_token_id.tolist()
    given = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    try:
        ids = tuple(operator.index(i) for i in given if not isinstance(i, bool))
    except TypeError:
        ids = ()
    if not ids or len(ids) != len(given) or min(ids) < 0:
        raise ValueError(f"eos_token_id must be a token id or a non-empty list of them, got {eos_token_id!r}")
    return ids


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty: in each row of `logits` [..., vocab], the logit of every token id in the
    same row of `seen` [..., n] is divided by `penalty` where positive and multiplied by it where negative (> 1
    discourages repeats); `logits` itself when the penalty is 1."""
    if penalty == 1.0 or seen.shape[-1] == 0:
        return logits
    seen = seen.to(logits.device, torch.int64)
    score = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(score < 0, score * penalty, score / penalty))


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution the sampler draws from, [..., vocab], in fp32 (one-hot argmax when greedy)."""
    logits = logits.float()
    if not config.do_sample:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    # shifted first: the largest becomes 0, so a tiny temperature gives -inf and 0 (the argmax), never inf or NaN
    logits = (logits - logits.amax(-1, keepdim=True)) / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if config.top_p is not None and config.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= config.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [...], from logits [..., vocab]."""
    if not config.do_sample:
        return logits.argmax(-1)
    probs = probabilities(logits, config)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
