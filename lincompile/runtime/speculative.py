"""Speculative decoding with exact state rollback (DESIGN.md section 7).

Loop invariant: the target's state has absorbed every committed token except the last (the pending token).
Each round a draft proposes up to k tokens after the pending one; one target call scores the pending token
and every draft (a chain through the model's forward, a tree through the tree verifier); the accepted path
is committed to the state from the drafts' keys and values (`runtime.verify.commit_path`, no rerun); the
target's distribution at the path's end gives the next pending token.

Acceptance: greedy keeps the longest path whose tokens equal the target's argmax, so the output is the plain
greedy output token for token (with 8-bit weights only up to near-ties: `_warn_if_quantized`).
Sampling follows Leviathan et al. / Chen et al.: keep draft i with probability min(1, p_i(d)/q_i(d)); at the
first rejection draw from normalize(max(0, p_i - q_i)); if all are kept draw a bonus token from p_{n+1}. Every
emitted token is then distributed as the target would sample it.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lincompile.diagnostics import warn
from lincompile.passes.linearize import HIDDEN_OUTPUT, VERIFY_WINDOW
from lincompile.runtime.drafts import DEFAULT_NUM_DRAFT_TOKENS, Draft, DraftContext, Proposal, make_draft, vocab_size
from lincompile.runtime.prefill import ChunkSize, prefill
from lincompile.runtime.sampling import SamplingConfig, eos_ids, penalize, probabilities, sample
from lincompile.runtime.state import (RecurrentState, check_new_tokens, check_token_ids, first_position,
                                      position_limit, require_decodable)
from lincompile.runtime.verify import PARENTS_INPUT, commit_path, commit_sites, tree_verifier


@dataclass
class SpeculativeStats:
    """Counts of one generation: target calls (prefill excluded), drafted and accepted draft tokens."""

    target_calls: int = 0
    num_draft_tokens: int = 0  # the k asked for (the draft's default when none was given)
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    accepted_per_call: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per target call (each call also yields one token of its own)."""
        return self.accepted / max(self.target_calls, 1)

    @property
    def tokens_per_call(self) -> float:
        return self.new_tokens / max(self.target_calls, 1)


def accept_greedy(logits: Tensor, proposal: Proposal) -> tuple[list[int], int]:
    """(accepted proposal indices, root first; next token) from the verify logits [1 + n, V]: row 0 scores the
    pending token, row i + 1 draft i. Follows the child whose token is the target's argmax."""
    best = logits.argmax(-1).tolist()
    tokens = proposal.tokens.tolist()
    parents = list(range(-1, len(tokens) - 1)) if proposal.parents is None else proposal.parents.tolist()
    path: list[int] = []
    row = 0
    while True:
        parent = path[-1] if path else -1
        child = next((i for i, (t, p) in enumerate(zip(tokens, parents)) if p == parent and t == best[row]), None)
        if child is None:
            return path, best[row]
        path.append(child)
        row = child + 1


def accept_sampled(probs: Tensor, proposal: Proposal, generator: torch.Generator | None) -> tuple[list[int], int]:
    """Speculative sampling over a chain: probs [1 + n, V] are the target's distributions at the pending token
    and each draft; q (one-hot when the proposal has none) is what each draft token was drawn from."""
    if proposal.parents is not None:
        raise ValueError("speculative sampling verifies chains; tree drafts are for greedy decoding")
    tokens = proposal.tokens.tolist()
    device = generator.device if generator is not None else probs.device  # where `torch.rand` draws
    for i, token in enumerate(tokens):
        p = probs[i]
        q = proposal.q[i].to(p.device) if proposal.q is not None else torch.nn.functional.one_hot(
            torch.tensor(token, device=p.device), p.shape[-1]).to(p.dtype)
        ratio = (p[token] / q[token]).item() if q[token] > 0 else 0.0
        if torch.rand((), generator=generator, device=device).item() < ratio:
            continue
        residual = (p - q).clamp_min(0)
        residual = residual if residual.sum() > 0 else p  # p == q up to rounding: rejection had probability 0
        return list(range(i)), int(torch.multinomial(residual / residual.sum(), 1, generator=generator)[0])
    last = probs[len(tokens)]
    return list(range(len(tokens))), int(torch.multinomial(last, 1, generator=generator)[0])


def _depths(parents: Tensor) -> Tensor:
    depth: list[int] = []
    for p in parents.tolist():
        depth.append(0 if p < 0 else depth[p] + 1)
    return torch.tensor(depth, dtype=torch.long)


class SpeculativeDecoder:
    """One sequence (batch 1) decoded speculatively. `prefill(ids)`, then `step()` until done; `tokens` holds
    every committed token (the last is pending) and `state` the target state of all but the last."""

    def __init__(self, target: Any, draft: Any, num_draft_tokens: int | None = None,
                 sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
                 adaptive: bool = False, prefill_chunk_size: ChunkSize = "auto") -> None:
        if num_draft_tokens is not None:
            check_num_draft_tokens(num_draft_tokens)  # before any work
        require_decodable(target, "speculative decoding")
        self.draft = make_draft(draft, target)
        if num_draft_tokens is None:
            num_draft_tokens = getattr(self.draft, "default_num_draft_tokens", DEFAULT_NUM_DRAFT_TOKENS)
            check_num_draft_tokens(num_draft_tokens)
        _warn_if_quantized(target)
        self.target = target
        self.max_positions = position_limit(target)
        self.k = num_draft_tokens
        self.max_k = num_draft_tokens
        self.adaptive = adaptive
        self.prefill_chunk_size = prefill_chunk_size
        self.sampling = sampling or SamplingConfig()
        self.generator = generator
        self.sites = commit_sites(target)
        self.stats = SpeculativeStats(num_draft_tokens=num_draft_tokens)
        self.tokens = torch.zeros(0, dtype=torch.long)  # on the CPU; calls take theirs on `device`
        self.device = torch.device("cpu")
        self.state: RecurrentState | None = None
        self.hidden: Tensor | None = None

    def prefill(self, input_ids: Tensor) -> int:
        """Absorb the prompt [1, L]; returns the first new token (now pending)."""
        _check_one_sequence(input_ids)
        check_token_ids(input_ids, vocab_size(self.target))
        self.device = input_ids.device
        state = None
        if input_ids.shape[1] > 1:  # all but the last token in chunks; the last alone gives logits and hidden
            state = prefill(self.target, input_ids[:, :-1], chunk_size=self.prefill_chunk_size).state
        out = self.target(input_ids[:, -1:], past_state=state)
        self.state = out.past_state
        self.stats.target_calls = 0
        logits = out.logits[0, -1]
        check_draft_vocab(self.draft, vocab_size(self.target) or int(logits.shape[-1]))
        logits = penalize(logits.float(), input_ids[0].to(logits.device), self.sampling.repetition_penalty)
        token = int(sample(logits[None], self.sampling, self.generator)[0])
        self.hidden = out.extras[HIDDEN_OUTPUT][0, -1] if HIDDEN_OUTPUT in out.extras else None
        self.tokens = torch.cat([input_ids[0].cpu(), torch.tensor([token])])
        return token

    def step(self) -> list[int]:
        """One round: draft, verify in one target call, commit; returns the tokens it emitted (>= 1)."""
        context = DraftContext(self.tokens, self.hidden)
        proposal = self.draft.propose(context, self.k, self.sampling, self.generator)
        # the verify call feeds the pending token and the proposal: it may reach the last learned position
        room = VERIFY_WINDOW - 1 if self.max_positions is None else self.max_positions - len(self.tokens)
        proposal = _truncate(proposal, min(VERIFY_WINDOW - 1, room))
        n = len(proposal)
        chain = proposal.parents is None
        parents = (torch.arange(n + 1) - 1 if chain
                   else torch.cat([torch.tensor([-1]), torch.where(proposal.parents < 0, 0, proposal.parents + 1)]))
        ids = torch.cat([self.tokens[-1:], proposal.tokens.cpu()])[None].to(self.device)
        depths = _depths(parents)
        positions = (self.state.length + first_position(self.target) + depths)[None].to(self.device)
        if chain:
            out = self.target(ids, past_state=self.state, position_ids=positions)
        else:
            out = tree_verifier(self.target)(ids, past_state=self.state, position_ids=positions,
                                             **{PARENTS_INPUT: parents.to(self.device)})
        logits = _penalized(out.logits[0].float(), self.tokens, ids[0], parents, self.sampling.repetition_penalty)
        if self.sampling.do_sample:
            path, token = accept_sampled(probabilities(logits, self.sampling), proposal, self.generator)
        else:
            path, token = accept_greedy(logits, proposal)
        nodes = [0] + [i + 1 for i in path]
        self.state = commit_path(self.sites, self.state, out.extras, parents, nodes)
        if HIDDEN_OUTPUT in out.extras:
            self.hidden = out.extras[HIDDEN_OUTPUT][0, nodes[-1] - ids.shape[1]]  # right-aligned window
        self.draft.accepted(path)
        emitted = [int(t) for t in proposal.tokens[path].tolist()] + [token]
        self.tokens = torch.cat([self.tokens, torch.tensor(emitted)])
        self.stats.target_calls += 1
        self.stats.drafted += n
        self.stats.accepted += len(path)
        self.stats.accepted_per_call.append(len(path))
        if self.adaptive and n:  # an empty proposal (nothing to look up) says nothing about acceptance
            whole = len(path) == int(depths.max())  # accepted as deep as the proposal goes (a tree's depth)
            self.k = min(self.max_k, self.k + 1) if whole else max(1, min(self.k, len(path) + 1))
        return emitted


def check_draft_vocab(draft: Draft, target_vocab: int) -> None:
    """Refuse a draft (`make_draft`'s) that scores another vocabulary than the target's `target_vocab` tokens."""
    heads = getattr(draft, "heads", None)
    draft_vocab = (getattr(getattr(heads, "config", None), "vocab_size", None) if heads is not None
                   else getattr(draft, "vocab_size", None))
    if draft_vocab is not None and target_vocab != draft_vocab:
        raise ValueError(f"the draft's vocabulary has {draft_vocab} tokens, the target's {target_vocab}: a draft "
                         "must share the target's tokenizer")


def _warn_if_quantized(target: Any) -> None:
    """Warn that a target with 8-bit weights (an export's `OrtModel.meta["quantize"]`, or a PyTorch model's
    `quantized`) loses the identity with plain decoding: a verify call (several tokens) and a one-token call round
    differently in float (≤ 1e-4 in the logits), and quantizing activations to 8 bits turns such last-bit
    differences into changes as large as the quantization error (about 1 logit on SmolLM2), so a near-tie can go
    the other way when greedy, and sampling draws from the verify calls' distribution, not quite the one-token
    calls'."""
    quantize = (getattr(target, "meta", None) or {}).get("quantize")
    bits = quantize["bits"] if quantize else 8 if getattr(target, "quantized", None) == "int8" else None
    if bits:
        warn(f"speculative decoding of a model with {bits}-bit weights: its verify calls and "
             "one-token calls round differently and 8-bit activations magnify that (to about the "
             "quantization error), so greedy output can differ from plain greedy decoding where the top "
             "tokens are close, and sampling follows the verify calls' logits; each token is still this "
             "model's prediction (bench/speculative.py counts the differing sequences). Float weights "
             "keep both exact")


def _penalized(logits: Tensor, committed: Tensor, ids: Tensor, parents: Tensor, penalty: float) -> Tensor:
    """The repetition penalty on a verify call's logits [n, vocab]: node j's row is penalized by the committed
    tokens (its pending last included, which is node 0) and the drafted tokens on its path, as sequential decoding
    of that path would penalize it."""
    if penalty == 1.0:
        return logits
    paths: list[list[int]] = []
    rows = []
    for j, parent in enumerate(parents.tolist()):
        paths.append([] if parent < 0 else paths[parent] + [j])
        seen = torch.cat([committed.to(ids.device), ids[paths[j]]])
        rows.append(penalize(logits[j], seen, penalty))
    return torch.stack(rows)


def _truncate(proposal: Proposal, limit: int) -> Proposal:
    if len(proposal) <= limit:
        return proposal
    parents = None if proposal.parents is None else proposal.parents[:limit]
    q = None if proposal.q is None else proposal.q[:limit]
    return Proposal(proposal.tokens[:limit], parents, q)


def check_num_draft_tokens(k: int) -> None:
    """Refuse a draft length one verify call cannot score: 1 <= k < VERIFY_WINDOW."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"num_draft_tokens must be an integer, got {k!r}")
    if k < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {k}")
    if k >= VERIFY_WINDOW:
        raise ValueError(f"num_draft_tokens must be < {VERIFY_WINDOW} (one verify call scores at most "
                         f"{VERIFY_WINDOW} tokens), got {k}")


def _check_one_sequence(input_ids: Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"speculative decoding runs one sequence at a time: input_ids must be [1, tokens], got "
                         f"{tuple(input_ids.shape)}; loop over rows or use plain generate for batches")


@torch.no_grad()
def speculative_generate(model: Any, input_ids: Tensor, max_new_tokens: int, draft: Any,
                         num_draft_tokens: int | None = None,
                         *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, repetition_penalty: float = 1.0,
                         eos_token_id: int | None = None, streamer: Any = None,
                         generator: torch.Generator | None = None, adaptive: bool = False,
                         attention_mask: Tensor | None = None,
                         prefill_chunk_size: ChunkSize = "auto") -> tuple[Tensor, SpeculativeStats]:
    """Prompt + up to `max_new_tokens` tokens [1, prompt + new], and the acceptance statistics. `eos_token_id`:
    one id or several (any ends the sequence). `num_draft_tokens` (k): None drafts the draft's own default
    (8 for prompt lookup and the n-gram table, 4 for Medusa heads and draft models)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    input_ids = torch.as_tensor(input_ids)
    _check_one_sequence(input_ids)
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise ValueError("speculative decoding takes one unpadded sequence; drop the padding from input_ids")
    eos = set(eos_ids(eos_token_id))
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty)
    decoder = SpeculativeDecoder(model, draft, num_draft_tokens, sampling, generator, adaptive, prefill_chunk_size)
    check_new_tokens(model, input_ids.shape[1], max_new_tokens)
    start = time.perf_counter()
    prompt = input_ids.shape[1]
    tokens = input_ids[0].tolist()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    emitted = [decoder.prefill(input_ids)] if max_new_tokens else []
    while emitted:
        emitted = emitted[:prompt + max_new_tokens - len(tokens)]
        ends = [i for i, token in enumerate(emitted) if token in eos]
        if ends:
            emitted = emitted[:ends[0] + 1]
        tokens += emitted
        if streamer is not None:
            streamer.put(torch.tensor(emitted))
        if len(tokens) - prompt >= max_new_tokens or ends:
            break
        emitted = decoder.step()
    if streamer is not None:
        streamer.end()
    decoder.stats.new_tokens = len(tokens) - prompt
    decoder.stats.seconds = time.perf_counter() - start
    return torch.tensor(tokens, dtype=torch.long, device=input_ids.device)[None], decoder.stats
