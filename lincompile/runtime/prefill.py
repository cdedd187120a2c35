"""Chunked prefill: feed a long prompt through the recurrent state `chunk_size` tokens at a time.

Works with any model called as `model(ids, attention_mask=, past_state=, position_ids=)` that returns
`.logits` [B, t, V] and `.past_state` (a `LinearizedModel`, an `OrtModel`). Invariant: because the state
carries everything the next tokens may see, the chunked result equals one call over the whole prompt
(up to fp reordering), whatever `chunk_size`. Each call then costs O(chunk) activations (the parallel
form inside a chunk is quadratic in the chunk only), so for constant-size states memory is linear in
the prompt length and independent of it apart from the returned logits. A model that takes `logits_to_keep`
(as Hugging Face's do) is asked for the last token's logits only, so its LM head skips the others.

Position ids: given explicitly, they are used as they are; otherwise they count the real tokens of
`attention_mask` (left padding takes no position, as in Hugging Face's `generate`) from the model's first
position (`first_position`: 0, or a RoBERTa-style model's padding id + 1), plus `past_state.length` when a
state is given (exact only if that past had no padding: pass the
`next_position_ids` a previous `prefill` returned, plus the new tokens' offsets, otherwise).
"""
from __future__ import annotations

import inspect
from typing import Callable, Literal, NamedTuple

import torch

from lincompile.runtime.state import RecurrentState, first_position, mask_positions


#: Tokens per call by default, unless the model names its own (`prefill_chunk_size`, e.g. an `OrtModel`).
DEFAULT_CHUNK = 512
ChunkSize = int | None | Literal["auto"]


def resolve_chunk(model: object, chunk_size: ChunkSize) -> int | None:
    """`chunk_size`, with "auto" read as the model's `prefill_chunk_size` attribute or `DEFAULT_CHUNK`."""
    what = "chunk_size"
    if chunk_size == "auto":
        chunk_size, what = getattr(model, "prefill_chunk_size", DEFAULT_CHUNK), "the model's prefill_chunk_size"
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{what} must be an integer >= 1 or None (one call), got {chunk_size!r}")
    return chunk_size


def _keeps_logits(model: Callable) -> bool:
    """Whether `model` takes `logits_to_keep` (a `LinearizedModel`, an `OrtModel`: it then skips the LM head of the
    tokens whose logits prefill drops). A module's own signature is its forward's (its __call__ takes anything)."""
    try:
        call = model.forward if isinstance(model, torch.nn.Module) else model
        return "logits_to_keep" in inspect.signature(call).parameters
    except (TypeError, ValueError):  # a callable without a signature (a builtin)
        return False


class Prefilled(NamedTuple):
    """What `prefill` returns; unpacks as `(logits, state, next_position_ids)`."""

    logits: torch.Tensor  # [B, V] of the last token, or [B, T, V] with all_logits=True
    state: RecurrentState  # after every prompt token
    next_position_ids: torch.Tensor  # [B, 1]: the position id of the token that follows


@torch.no_grad()
def prefill(model: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, past_state: RecurrentState | None = None,
            chunk_size: ChunkSize = "auto", *, all_logits: bool = False) -> Prefilled:
    """Run `input_ids` [B, T] through `model` in chunks of `chunk_size` tokens (None: one call; "auto": the
    model's `prefill_chunk_size`, else `DEFAULT_CHUNK`).

    `attention_mask` [B, T] covers the new tokens (1 = real); the last column must be real for the
    last-token logits to be meaningful (left padding). Returns the last token's logits [B, V] (all
    [B, T, V] with `all_logits=True`, on the CPU for an `OrtModel`), the state after the prompt and
    the next position ids [B, 1].
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got {tuple(input_ids.shape)}")
    chunk_size = resolve_chunk(model, chunk_size)
    total = input_ids.shape[1]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
    if position_ids is None:
        past = 0 if past_state is None else past_state.length
        position_ids = mask_positions(mask, first_position(model) + past)
    elif position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids must match input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(position_ids.shape)}")
    step = total if chunk_size is None else chunk_size
    keep = {} if all_logits or not _keeps_logits(model) else {"logits_to_keep": 1}  # the LM head on one token
    state, pieces = past_state, []
    for start in range(0, total, step):
        end = min(start + step, total)
        out = model(input_ids[:, start:end], attention_mask=mask[:, start:end], past_state=state,
                    position_ids=position_ids[:, start:end], **keep)
        state = out.past_state
        if state is None:
            raise ValueError("the model returned no past_state: it cannot continue from a prefill")
        pieces.append(out.logits if all_logits else out.logits[:, -1].clone())  # no view pins [B, t, V]
    logits = torch.cat(pieces, 1) if all_logits else pieces[-1]
    return Prefilled(logits, state, position_ids[:, -1:] + 1)
