"""A draft with no model at decode time: prompt lookup, filled up to k tokens from an n-gram table of the
target's own greedy predictions.

`NgramTable` maps the last one or two tokens to the token the target predicted most often after them when it
was run (teacher-forced) over training text: a bigram context seen in that text wins over the unigram one.
`build_ngram_table(ids, greedy)` makes it from blocks of token ids and the target's argmax at each position
(`lincompile build-ngram` runs the target). `NgramDraft` proposes what prompt lookup finds in the context,
then continues the chain from the table until k tokens or an unseen context. Greedy verification keeps the
output identical to plain decoding whatever the table says; the table only decides how much is accepted.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lincompile.atomic import atomic_write_text
from lincompile.runtime.drafts import DraftContext, PromptLookupDraft, Proposal
from lincompile.runtime.sampling import SamplingConfig

FORMAT = "lincompile-ngram"
FORMAT_VERSION = 1
TABLE_FILE = "ngram.json"


@dataclass(frozen=True)
class NgramTable:
    """unigram {a: next}, bigram {(a, b): next}: the target's most frequent greedy token after a / after a b."""

    vocab_size: int
    unigram: dict[int, int]
    bigram: dict[tuple[int, int], int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def next_token(self, context: list[int]) -> int | None:
        """The table's prediction after `context` (its last two tokens), or None when it never saw them."""
        if len(context) >= 2:
            hit = self.bigram.get((context[-2], context[-1]))
            if hit is not None:
                return hit
        return self.unigram.get(context[-1]) if context else None

    def save(self, directory: str | Path) -> Path:
        """Write DIR/ngram.json atomically (a temporary file renamed into place)."""
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                   "metadata": self.metadata, "unigram": sorted(self.unigram.items()),
                   "bigram": sorted([a, b, n] for (a, b), n in self.bigram.items())}
        return atomic_write_text(Path(directory) / TABLE_FILE, json.dumps(payload, separators=(",", ":")))

    @classmethod
    def load(cls, directory: str | Path) -> "NgramTable":
        path = Path(directory) / TABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build a table with `lincompile build-ngram MODEL --out DIR`")
        payload = json.loads(path.read_text())
        if payload.get("format") != FORMAT or payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file (format {payload.get('format')!r}, "
                             f"version {payload.get('version')!r})")
        vocab = int(payload["vocab_size"])
        table = cls(vocab, {int(a): int(n) for a, n in payload["unigram"]},
                    {(int(a), int(b)): int(n) for a, b, n in payload["bigram"]}, dict(payload.get("metadata", {})))
        tokens = [*table.unigram.items(), *((a, n) for (a, _), n in table.bigram.items()),
                  *((b, n) for (_, b), n in table.bigram.items())]
        if any(not (0 <= t < vocab and 0 <= n < vocab) for t, n in tokens):
            raise ValueError(f"{path} holds token ids outside its vocabulary of {vocab}: the file is damaged; "
                             "build it again with `lincompile build-ngram`")
        return table


def build_ngram_table(ids: Tensor, greedy: Tensor, vocab_size: int,
                      metadata: dict[str, Any] | None = None) -> NgramTable:
    """The table from blocks ids [N, T] and the target's argmax at each position greedy [N, T] (its
    prediction of the token after ids[:, t]). Contexts never cross a block boundary; ties go to the token
    seen first."""
    if ids.shape != greedy.shape or ids.dim() != 2:
        raise ValueError(f"ids and greedy must both be [blocks, tokens], got {tuple(ids.shape)} and "
                         f"{tuple(greedy.shape)}")
    if ids.numel() and max(int(ids.max()), int(greedy.max())) >= vocab_size:
        raise ValueError(f"token ids reach {max(int(ids.max()), int(greedy.max()))}, beyond vocab_size {vocab_size}")
    unigram: defaultdict[int, Counter[int]] = defaultdict(Counter)
    bigram: defaultdict[tuple[int, int], Counter[int]] = defaultdict(Counter)
    for row, predicted in zip(ids.tolist(), greedy.tolist()):
        for t, (token, nxt) in enumerate(zip(row, predicted)):
            unigram[token][nxt] += 1
            if t:
                bigram[(row[t - 1], token)][nxt] += 1
    return NgramTable(vocab_size, {a: c.most_common(1)[0][0] for a, c in unigram.items()},
                      {ab: c.most_common(1)[0][0] for ab, c in bigram.items()}, dict(metadata or {}))


class NgramDraft:
    """Prompt lookup in the context, then the n-gram table, as one chain of up to k tokens (deterministic:
    for greedy decoding and, with q one-hot, for speculative sampling)."""

    name = "prompt-lookup+ngram"

    def __init__(self, table: NgramTable, lookup: PromptLookupDraft | None = None) -> None:
        self.table = table
        self.lookup = lookup or PromptLookupDraft()
        self.vocab_size = table.vocab_size

    def propose(self, context: DraftContext, k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        found = self.lookup.propose(context, k, sampling, generator).tokens.tolist()
        chain = context.tokens.tolist() + found
        while len(found) < k:
            token = self.table.next_token(chain)
            if token is None:
                break
            found.append(token)
            chain.append(token)
        return Proposal(torch.tensor(found, dtype=torch.long))

    def accepted(self, path: list[int]) -> None:
        pass
