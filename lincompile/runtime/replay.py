"""Replaying a draft against the target's greedy output, without running the target.

Greedy verification keeps exactly the drafted tokens that match the target's greedy continuation, up to the first
mismatch, and the target's own token after them. So, given the plain greedy output of a prompt, the target calls
of speculative greedy decoding, and what each drafted and kept, follow from the draft alone: `replay_draft` gives
the same calls, drafted tokens and new tokens as `speculative_generate` with that draft, and the same accepted
tokens but on a sequence's last call, where the replay counts only up to the end of the plain output (the decoder
also counts drafts that match past `max_new_tokens` or an end of text, which it then cuts). A test holds it to
that. Proposals the decoder cuts at the model's last position are not replayed. With the measured time of a
target call per width, `ReplayStats.modelled_speedup` turns the counts into a speed estimate, so draft settings
can be compared by the hundred in seconds; a measured speed is bench/speculative.py's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lincompile.runtime.drafts import DraftContext, make_draft
from lincompile.runtime.sampling import SamplingConfig
from lincompile.runtime.speculative import check_num_draft_tokens


@dataclass(frozen=True)
class ReplayStats:
    """Per target call (prefill excluded): drafted tokens and accepted ones; new_tokens as generation counts them
    (the one each sequence's prefill gives included), over `sequences` sequences."""

    drafted: tuple[int, ...]
    accepted: tuple[int, ...]
    new_tokens: int
    sequences: int

    @property
    def calls(self) -> int:
        return len(self.drafted)

    @property
    def tokens_per_call(self) -> float:
        return self.new_tokens / max(self.calls, 1)

    @property
    def drafted_per_call(self) -> float:
        return sum(self.drafted) / max(self.calls, 1)

    def modelled_speedup(self, call_seconds: Sequence[float]) -> float:
        """Plain decoding's time (a width-1 call per new token) over speculative decoding's (a call of width n + 1
        for each call that verifies n drafts), where call_seconds[w - 1] is the target's time for a call of width
        w. Overheads outside the target are left out of both."""
        if any(n + 1 > len(call_seconds) for n in self.drafted):
            raise ValueError(f"call_seconds covers widths up to {len(call_seconds)}; the replay drafted up to "
                             f"{max(self.drafted)} tokens per call (width {max(self.drafted) + 1})")
        # each sequence's prefill gives one new token, the cost of its last token's width-1 call on both sides
        spent = sum(call_seconds[n] for n in self.drafted) + self.sequences * call_seconds[0]
        return (self.new_tokens * call_seconds[0]) / spent


def replay_draft(draft: Any, sequences: Sequence[Tensor], prompt_tokens: int, num_draft_tokens: int) -> ReplayStats:
    """Replay greedy speculative decoding with `draft` (anything `generate(draft=...)` takes, except drafts that
    need the target: Medusa) over `sequences`, each a prompt of `prompt_tokens` tokens and the target's plain greedy
    continuation [L] or [1, L]. A draft object keeps its state across sequences, as in one serving process."""
    check_num_draft_tokens(num_draft_tokens)
    if (isinstance(draft, str) and draft == "medusa") or type(draft).__name__ in ("MedusaHeads", "MedusaDraft"):
        raise ValueError("Medusa heads draft from the target's hidden states, which a replay of recorded tokens "
                         "does not have: measure them with speculative decoding of the target (bench/speculative.py "
                         "--medusa DIR)")
    draft = make_draft(draft, None)
    sampling = SamplingConfig()
    drafted: list[int] = []
    accepted: list[int] = []
    new_tokens = 0
    for sequence in sequences:
        tokens = torch.as_tensor(sequence).reshape(-1).tolist()
        if len(tokens) <= prompt_tokens:
            raise ValueError(f"a sequence of {len(tokens)} tokens has no continuation after its {prompt_tokens}-token "
                             "prompt")
        committed = prompt_tokens + 1  # the prefill's token is pending
        while committed < len(tokens):
            context = DraftContext(torch.tensor(tokens[:committed]), None)
            proposal = draft.propose(context, num_draft_tokens, sampling, None).tokens.tolist()
            kept = 0
            while (kept < len(proposal) and committed + kept < len(tokens)
                   and proposal[kept] == tokens[committed + kept]):
                kept += 1
            draft.accepted(list(range(kept)))
            drafted.append(len(proposal))
            accepted.append(kept)
            committed += kept + 1
        new_tokens += len(tokens) - prompt_tokens
    return ReplayStats(tuple(drafted), tuple(accepted), new_tokens, len(sequences))
