"""A draft with no model at decode time: prompt lookup and an n-gram table of the target's own greedy
predictions, mixed token by token and cut where the chain stops being likely.

`NgramTable` maps contexts of one to `order` tokens (3 by default) to the token the target predicted most often
after them when it was run (teacher-forced) over training text, with how often it did and how often the context
was seen: the longest context seen wins. `build_ngram_table(ids, greedy)` makes it from blocks of token ids and
the target's argmax at each position (`lincompile build-ngram` runs the target).

`NgramDraft` drafts one token at a time: the token that followed the latest earlier occurrence of the chain's
last `min_match` to `max_match` tokens in the context (prompt lookup), else the table's. Each token has a
confidence (a lookup token `lookup_confidence`; a table token count / (seen + 1), 1 with a version-1 table, which
has no counts); the chain stops before the token that takes the product below `min_confidence` (the first token is
always drafted), since every drafted token costs verify time. Greedy verification keeps the
output identical to plain decoding whatever the draft says (but for near-ties with 8-bit weights); the draft only
decides how much is accepted.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from lincompile.atomic import atomic_directory
from lincompile.runtime.drafts import DraftContext, Proposal
from lincompile.runtime.sampling import SamplingConfig

FORMAT = "lincompile-ngram"
FORMAT_VERSION = 2
TABLE_FILE = "ngram.json"
DEFAULT_ORDER = 3


class Prediction(NamedTuple):
    """The target's most frequent greedy token after a context: `count` times out of the context's `seen`
    (both 0 in a version-1 file, which kept no counts)."""

    token: int
    count: int
    seen: int

    @property
    def confidence(self) -> float:
        """count / (seen + 1): a context seen once gives 1/2, one always followed by the token in 9 sightings
        gives 9/10; 1.0 when the counts are unknown."""
        return self.count / (self.seen + 1) if self.seen else 1.0


@dataclass(frozen=True)
class NgramTable:
    """contexts: token tuple (1 to `order` tokens) -> (token, count, seen), a `Prediction`'s fields (plain tuples
    load faster)."""

    vocab_size: int
    contexts: dict[tuple[int, ...], tuple[int, int, int]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def order(self) -> int:
        """The longest context the table holds (0 when empty)."""
        return max(map(len, self.contexts), default=0)

    def counts_by_order(self) -> dict[int, int]:
        """{context length: number of contexts}."""
        return dict(sorted(Counter(map(len, self.contexts)).items()))

    def predict(self, context: Sequence[int]) -> Prediction | None:
        """The prediction for the longest seen suffix of `context`, or None when even its last token is unseen."""
        for n in range(min(self.order, len(context)), 0, -1):
            hit = self.contexts.get(tuple(context[len(context) - n:]))
            if hit is not None:
                return Prediction(*hit)
        return None

    def save(self, directory: str | Path) -> Path:
        """Write DIR/ngram.json atomically (a directory of this kind, or a new or empty one: see
        `lincompile.atomic.atomic_directory`). A row is [*context, token, count, seen]."""
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                   "metadata": self.metadata,
                   "contexts": sorted([*context, *hit] for context, hit in self.contexts.items())}
        with atomic_directory(directory, TABLE_FILE) as tmp:
            (tmp / TABLE_FILE).write_text(json.dumps(payload, separators=(",", ":")))
        return Path(directory) / TABLE_FILE

    @classmethod
    def load(cls, directory: str | Path) -> "NgramTable":
        """Read DIR/ngram.json; a version-1 file (one to three tokens of context, no counts) loads with counts 0."""
        path = Path(directory) / TABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build a table with `lincompile build-ngram MODEL --out DIR`")
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is damaged ({error}): build the table again with `lincompile build-ngram`"
                             ) from None
        version = payload.get("version") if isinstance(payload, dict) else None
        if (not isinstance(payload, dict) or payload.get("format") != FORMAT or type(version) is not int
                or version not in (1, FORMAT_VERSION)):
            raise ValueError(f"{path} is not a {FORMAT} v1 or v{FORMAT_VERSION} file (format "
                             f"{payload.get('format') if isinstance(payload, dict) else None!r}, version {version!r})")
        damaged = "the file is damaged; build it again with `lincompile build-ngram`"
        lists = [payload.get(key, []) for key in ("unigram", "bigram", "trigram")] if version == 1 else [
            payload.get("contexts")]
        vocab, metadata = payload.get("vocab_size"), payload.get("metadata", {})
        if type(vocab) is not int or vocab < 1 or not isinstance(metadata, dict) or not all(
                isinstance(rows, list) and all(isinstance(row, list) for row in rows) for rows in lists):
            raise ValueError(f"{path} lacks a vocab_size, metadata or list of rows of the {FORMAT} v{version} layout: "
                             f"{damaged}")
        rows = [[*row, 0, 0] for rows in lists for row in rows] if version == 1 else lists[0]
        if not all(len(row) >= 4 and all(type(v) is int for v in row) and 0 <= row[-2] <= row[-1] for row in rows):
            raise ValueError(f"{path} has a row that is not a context, token and counts (integers, 0 <= count <= "
                             f"seen): {damaged}")
        contexts = {tuple(row[:-3]): tuple(row[-3:]) for row in rows}
        tokens = [t for context, hit in contexts.items() for t in (*context, hit[0])]
        if tokens and not 0 <= min(tokens) <= max(tokens) < vocab:
            raise ValueError(f"{path} holds token ids outside its vocabulary of {vocab}: {damaged}")
        return cls(vocab, contexts, dict(metadata))


def build_ngram_table(ids: Tensor, greedy: Tensor, vocab_size: int, metadata: dict[str, Any] | None = None,
                      order: int = DEFAULT_ORDER) -> NgramTable:
    """The table from blocks ids [N, T] and the target's argmax at each position greedy [N, T] (its
    prediction of the token after ids[:, t]), for contexts of 1 to `order` tokens. Contexts never cross a block
    boundary; ties go to the token seen first."""
    if ids.shape != greedy.shape or ids.dim() != 2:
        raise ValueError(f"ids and greedy must both be [blocks, tokens], got {tuple(ids.shape)} and "
                         f"{tuple(greedy.shape)}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if ids.numel() and max(int(ids.max()), int(greedy.max())) >= vocab_size:
        raise ValueError(f"token ids reach {max(int(ids.max()), int(greedy.max()))}, beyond vocab_size {vocab_size}")
    counts: defaultdict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
    for row, predicted in zip(ids.tolist(), greedy.tolist()):
        for t, nxt in enumerate(predicted):
            for n in range(1, min(order, t + 1) + 1):
                counts[tuple(row[t + 1 - n:t + 1])][nxt] += 1
    contexts = {}
    for context, c in counts.items():
        token, count = c.most_common(1)[0]
        contexts[context] = (token, count, sum(c.values()))
    return NgramTable(vocab_size, contexts, dict(metadata or {}))


class NgramDraft:
    """Prompt lookup and the table, token by token, as one chain of up to k tokens cut at `min_confidence`
    (deterministic: for greedy decoding and, with q one-hot, for speculative sampling). The defaults were chosen
    on training-split prompts of the embedded model (README, speculative decoding)."""

    name = "prompt-lookup+ngram"
    default_num_draft_tokens = 8  # bench/speculative.py: the fastest k or within 1% of it, on both runtimes

    def __init__(self, table: NgramTable, min_match: int = 3, max_match: int = 4, lookup_confidence: float = 0.9,
                 min_confidence: float = 0.05) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match}, {max_match}")
        if not 0 < lookup_confidence <= 1 or not 0 <= min_confidence <= 1:
            raise ValueError(f"need 0 < lookup_confidence <= 1 and 0 <= min_confidence <= 1, got "
                             f"{lookup_confidence}, {min_confidence}")
        self.table = table
        self.vocab_size = table.vocab_size
        self.min_match, self.max_match = min_match, max_match
        self.lookup_confidence, self.min_confidence = lookup_confidence, min_confidence
        self._tokens: list[int] = []  # the context indexed so far
        self._follow: dict[tuple[int, ...], int] = {}  # n-gram -> the token after its latest occurrence

    def _index(self, tokens: list[int]) -> None:
        """Index every n-gram (min_match..max_match tokens) of `tokens` that has a token after it; only the new
        ones when `tokens` continues the context indexed before."""
        done = len(self._tokens)
        if done > len(tokens) or tokens[:done] != self._tokens:
            self._follow, done = {}, 0
        for end in range(max(done - 1, 0), len(tokens) - 1):  # the n-gram tokens[.. end] is followed by end + 1
            for n in range(self.min_match, min(self.max_match, end + 1) + 1):
                self._follow[tuple(tokens[end + 1 - n:end + 1])] = tokens[end + 1]
        self._tokens = tokens

    def _lookup(self, chain: list[int]) -> int | None:
        for n in range(min(self.max_match, len(chain)), self.min_match - 1, -1):
            hit = self._follow.get(tuple(chain[len(chain) - n:]))
            if hit is not None:
                return hit
        return None

    def propose(self, context: DraftContext, k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        committed = context.tokens.tolist()
        self._index(committed)
        chain = list(committed)
        found: list[int] = []
        confidence = 1.0
        while len(found) < k:
            token = self._lookup(chain)
            if token is not None:
                confidence *= self.lookup_confidence
            else:
                hit = self.table.predict(chain)
                if hit is None:
                    break
                token = hit.token
                confidence *= hit.confidence
            if found and confidence < self.min_confidence:
                break
            found.append(token)
            chain.append(token)
        return Proposal(torch.tensor(found, dtype=torch.long))

    def accepted(self, path: list[int]) -> None:
        pass
