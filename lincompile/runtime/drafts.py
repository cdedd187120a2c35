"""Draft sources for speculative decoding: prompt lookup, a draft model, Medusa heads on the target.

A draft sees the committed tokens (the last one is the pending token the target has not absorbed yet) and
proposes up to k tokens after them: a chain, or a tree (`parents`, -1 = child of the pending token). With
`q` it also gives the distribution each token was drawn from, which speculative sampling needs; without it
the proposal is deterministic (q is one-hot on the proposed token). After verification the runtime calls
`accepted(n)`: the first n proposed tokens were kept (a tree reports its accepted path instead).
Each draft kind names the k it drafts when the caller gives none (`default_num_draft_tokens`): for prompt lookup
and the n-gram table the fastest k measured with the shipped model or within 1% of it, in PyTorch and
onnxruntime alike (README, speculative decoding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lincompile.runtime.sampling import SamplingConfig, probabilities
from lincompile.runtime.state import hf_cache_keyword, position_limit


@dataclass(frozen=True)
class Proposal:
    """tokens [n]; parents [n] (None: a chain); q [n, vocab] (None: deterministic)."""

    tokens: Tensor
    parents: Tensor | None = None
    q: Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class DraftContext:
    """What a draft may look at: committed tokens [L] (last = pending) and the target's final hidden state
    [H] at the token before the pending one (the one whose logits gave the pending token), when known."""

    tokens: Tensor
    hidden: Tensor | None


DEFAULT_NUM_DRAFT_TOKENS = 4  # for a draft that names no k of its own


class Draft(Protocol):
    name: str
    default_num_draft_tokens: int

    def propose(self, context: DraftContext, k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Proposal: ...

    def accepted(self, path: list[int]) -> None: ...


class PromptLookupDraft:
    """n-gram prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
    `max_ngram` down to `min_ngram`) and propose the tokens that followed it. No model; deterministic."""

    name = "prompt-lookup"
    default_num_draft_tokens = 8  # bench/speculative.py: the fastest k or within 1% of it, on both runtimes

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: DraftContext, k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        tokens = context.tokens.tolist()
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            tail = tokens[length - n:]
            for start in range(length - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + k]
                    return Proposal(torch.tensor(follow, dtype=torch.long))
        return Proposal(torch.zeros(0, dtype=torch.long))

    def accepted(self, path: list[int]) -> None:
        pass


def vocab_size(model: Any) -> int | None:
    """The vocabulary a model scores: from its Hugging Face config (`hf_config` of a `LinearizedModel`, `config` of
    an HF model) or an `OrtModel`'s metadata; None when neither says."""
    config = getattr(model, "hf_config", None) or getattr(model, "config", None)
    meta = getattr(model, "meta", None)
    return getattr(config, "vocab_size", None) or (meta.get("vocab_size") if isinstance(meta, dict) else None)


class ModelDraft:
    """A smaller causal LM that shares the tokenizer: a `LinearizedModel` (its state is constant-size, so a
    snapshot per drafted token makes rollback free) or a Hugging Face model (its KV cache is cropped)."""

    name = "model"
    default_num_draft_tokens = DEFAULT_NUM_DRAFT_TOKENS  # measured at k = 4 only (bench/results/speculative_*)

    def __init__(self, model: Any) -> None:
        self.model = model
        self.linear = hasattr(model, "initial_state")
        self._cache_keyword = None if self.linear else hf_cache_keyword(model)
        self.vocab_size = vocab_size(model)
        self.max_positions = position_limit(model)
        self._fed = 0  # tokens the draft has absorbed: the first _fed of _tokens (last context + its drafts)
        self._tokens = torch.zeros(0, dtype=torch.long)
        self._state: Any = None
        self._snapshots: list[Any] = []

    def _call(self, ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        ids = ids.to(self._device())
        if self.linear:
            out = self.model(ids, past_state=state)
            return out.logits[0, -1], out.past_state
        from transformers import DynamicCache

        cache = state if state is not None else DynamicCache()
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_keyword: cache})  # grows `cache`
        return out.logits[0, -1], cache

    def _device(self) -> torch.device:
        """Where the draft takes its ids: its parameters' device; the CPU for an `OrtModel` (it takes CPU ids)."""
        parameters = getattr(self.model, "parameters", None)
        return next(parameters()).device if parameters is not None else torch.device("cpu")

    def propose(self, context: DraftContext, k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        tokens = context.tokens
        if self.max_positions is not None:  # drafting k tokens feeds len(tokens) + k - 1 in all
            k = min(k, self.max_positions - len(tokens) + 1)
            if k < 1:  # past the draft's positions: plain decoding, nothing absorbed for `accepted` to keep
                self._snapshots = []
                return Proposal(torch.zeros(0, dtype=torch.long))
        if self._fed >= len(tokens) or not torch.equal(tokens[:self._fed], self._tokens[:self._fed]):
            self._fed, self._state = 0, None  # not a continuation of what was absorbed: start over
        logits, state = self._call(tokens[None, self._fed:], self._state)
        if self.vocab_size is None:
            self.vocab_size = int(logits.shape[-1])
        self._state, self._fed = state, int(tokens.shape[0])
        self._snapshots = [state]  # model outputs are fresh tensors: keeping references is a snapshot
        drafted, qs = [], []
        for i in range(k):
            probs = probabilities(logits[None], sampling)[0]
            token = probs.argmax() if not sampling.do_sample else torch.multinomial(probs, 1, generator=generator)[0]
            drafted.append(int(token))
            qs.append(probs)
            if i + 1 < k:
                logits, state = self._call(token.reshape(1, 1), state)
                self._snapshots.append(state)
        # `accepted` keeps a prefix of the drafts: the next context continues this one
        self._tokens = torch.cat([tokens, torch.tensor(drafted, dtype=torch.long)])
        return Proposal(torch.tensor(drafted, dtype=torch.long), None, torch.stack(qs) if sampling.do_sample else None)

    def accepted(self, path: list[int]) -> None:
        if not self._snapshots:  # the proposal was empty
            return
        kept = min(len(path), len(self._snapshots) - 1)  # tokens of the proposal the draft has absorbed and keeps
        if self.linear:
            self._state = self._snapshots[kept]
        else:  # one DynamicCache, grown in place: drop what was not kept
            self._state = self._snapshots[-1]
            drop = self._state.get_seq_length() - (self._fed + kept)
            if drop:  # crop(-n) drops n tokens in every transformers 5.x; crop(0) emptied the cache in 5.0
                self._state.crop(-drop)
        self._fed += kept


class MedusaDraft:
    """Medusa-style heads on the target's last hidden state (`lincompile.runtime.medusa.MedusaHeads`): in
    greedy mode a tree of top choices per head, verified in one call; when sampling, a chain with token i
    drawn from head i (its distribution is q). Needs the target's `hidden_states` output."""

    name = "medusa"
    default_num_draft_tokens = DEFAULT_NUM_DRAFT_TOKENS  # k = 2 and 4 both slower than plain on this CPU

    def __init__(self, heads: Any, tree: bool = True) -> None:
        self.heads = heads
        self.tree = tree

    def propose(self, context: DraftContext, k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        from lincompile.runtime.medusa import medusa_tree, sample_chain

        if context.hidden is None:
            return Proposal(torch.zeros(0, dtype=torch.long))
        with torch.no_grad():
            logits = self.heads(context.hidden.reshape(1, 1, -1).to(next(self.heads.parameters()).dtype))[0, 0]
        logits = logits[:k].float()
        if sampling.do_sample:
            tokens, q = sample_chain(logits, sampling, generator)
            return Proposal(tokens, None, q)
        if not self.tree:
            return Proposal(logits.argmax(-1))
        tokens, parents = medusa_tree(logits)
        return Proposal(tokens, parents)

    def accepted(self, path: list[int]) -> None:
        pass


def make_draft(draft: Any, target: Any) -> Draft:
    """`draft=` of generate: "prompt-lookup", "medusa" (heads attached to the target as `target.medusa`), a
    MedusaHeads object, an NgramTable (an `NgramDraft`: prompt lookup and the table), a draft model, or a ready
    Draft."""
    from lincompile.runtime.ngram import NgramDraft, NgramTable

    if isinstance(draft, NgramTable):
        return NgramDraft(draft)
    if isinstance(draft, str):
        if draft == "prompt-lookup":
            return PromptLookupDraft()
        if draft == "medusa":
            heads = getattr(target, "medusa", None)
            if heads is None:
                raise ValueError("draft='medusa' needs heads: train them with `lincompile train-medusa` and attach "
                                 "them with `lincompile.runtime.medusa.attach(model, dir)`, or pass the heads")
            return MedusaDraft(heads, tree=hasattr(target, "graph"))
        raise ValueError(f"unknown draft {draft!r}; use 'prompt-lookup', 'medusa', a draft model, MedusaHeads or "
                         "an NgramTable")
    if hasattr(draft, "propose") and hasattr(draft, "accepted"):
        return draft
    if type(draft).__name__ == "MedusaHeads":
        return MedusaDraft(draft, tree=hasattr(target, "graph"))
    if isinstance(draft, torch.nn.Module) or hasattr(draft, "initial_state"):
        return ModelDraft(draft)
    raise TypeError(f"draft must be a model, 'prompt-lookup', 'medusa', MedusaHeads or an NgramTable, got "
                    f"{type(draft).__name__}")
