"""A draft with no model at decode time: prompt lookup, filled up to k tokens from an n-gram table of the
target's own greedy predictions.

`NgramTable` maps the last one, two or three tokens to the token the target predicted most often after them when
it was run (teacher-forced) over training text: the longest context seen in that text wins (trigram, then bigram,
then unigram).
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

from lincompile.atomic import atomic_directory
from lincompile.runtime.drafts import DraftContext, PromptLookupDraft, Proposal
from lincompile.runtime.sampling import SamplingConfig

FORMAT = "lincompile-ngram"
FORMAT_VERSION = 1
TABLE_FILE = "ngram.json"


@dataclass(frozen=True)
class NgramTable:
    """unigram {a: next}, bigram {(a, b): next}, trigram {(a, b, c): next}: the target's most frequent greedy
    token after a / a b / a b c. A table without trigrams (files from before they existed) backs off to bigrams."""

    vocab_size: int
    unigram: dict[int, int]
    bigram: dict[tuple[int, int], int]
    metadata: dict[str, Any] = field(default_factory=dict)
    trigram: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def next_token(self, context: list[int]) -> int | None:
        """The table's prediction after `context` (its longest seen suffix of up to three tokens), or None when
        it never saw even the last token."""
        if len(context) >= 3:
            hit = self.trigram.get((context[-3], context[-2], context[-1]))
            if hit is not None:
                return hit
        if len(context) >= 2:
            hit = self.bigram.get((context[-2], context[-1]))
            if hit is not None:
                return hit
        return self.unigram.get(context[-1]) if context else None

    def save(self, directory: str | Path) -> Path:
        """Write DIR/ngram.json atomically (a directory of this kind, or a new or empty one: see
        `lincompile.atomic.atomic_directory`)."""
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                   "metadata": self.metadata, "unigram": sorted(self.unigram.items()),
                   "bigram": sorted([a, b, n] for (a, b), n in self.bigram.items()),
                   "trigram": sorted([a, b, c, n] for (a, b, c), n in self.trigram.items())}
        with atomic_directory(directory, TABLE_FILE) as tmp:
            (tmp / TABLE_FILE).write_text(json.dumps(payload, separators=(",", ":")))
        return Path(directory) / TABLE_FILE

    @classmethod
    def load(cls, directory: str | Path) -> "NgramTable":
        path = Path(directory) / TABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build a table with `lincompile build-ngram MODEL --out DIR`")
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is damaged ({error}): build the table again with `lincompile build-ngram`"
                             ) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file (format {payload.get('format')!r}, "
                             f"version {payload.get('version')!r})")
        vocab = int(payload["vocab_size"])
        table = cls(vocab, {int(a): int(n) for a, n in payload["unigram"]},
                    {(int(a), int(b)): int(n) for a, b, n in payload["bigram"]}, dict(payload.get("metadata", {})),
                    {(int(a), int(b), int(c)): int(n) for a, b, c, n in payload.get("trigram", [])})
        tokens = [*table.unigram.keys(), *table.unigram.values(),
                  *(t for entries in (table.bigram, table.trigram) for key, n in entries.items() for t in (*key, n))]
        if any(not 0 <= t < vocab for t in tokens):
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
    trigram: defaultdict[tuple[int, int, int], Counter[int]] = defaultdict(Counter)
    for row, predicted in zip(ids.tolist(), greedy.tolist()):
        for t, (token, nxt) in enumerate(zip(row, predicted)):
            unigram[token][nxt] += 1
            if t:
                bigram[(row[t - 1], token)][nxt] += 1
            if t > 1:
                trigram[(row[t - 2], row[t - 1], token)][nxt] += 1

    def best(counts: defaultdict[Any, Counter[int]]) -> dict[Any, int]:
        return {context: c.most_common(1)[0][0] for context, c in counts.items()}

    return NgramTable(vocab_size, best(unigram), best(bigram), dict(metadata or {}), best(trigram))


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
