"""Plain autoregressive generation through a model's recurrent state (no drafts).

Works with any model called as `model(ids, attention_mask=, past_state=, position_ids=)` returning
`.logits` and `.past_state` (a `LinearizedModel`, or the ONNX runner). The prompt goes through
`lincompile.runtime.prefill` in chunks of `prefill_chunk_size` tokens (memory linear in its length);
left-padded batches get position ids that skip the padding, as Hugging Face's `generate` does.
"""
from __future__ import annotations

from typing import Callable

import torch

from lincompile.runtime.prefill import ChunkSize, prefill
from lincompile.runtime.sampling import SamplingConfig, eos_ids, penalize, sample
from lincompile.runtime.drafts import vocab_size
from lincompile.runtime.state import check_new_tokens, check_token_ids, require_decodable


#: New tokens when neither `max_new_tokens` nor `max_length` is given.
DEFAULT_NEW_TOKENS = 32


@torch.no_grad()
def generate(model: Callable, input_ids: torch.Tensor, max_new_tokens: int | None = None, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             max_length: int | None = None, num_beams: int = 1, streamer: object | None = None,
             generator: torch.Generator | None = None, prefill_chunk_size: ChunkSize = "auto",
             draft: object = None, num_draft_tokens: int | None = None, adaptive: bool = False) -> torch.Tensor:
    """Prompt + up to `max_new_tokens` tokens, [batch, prompt + new]; finished rows repeat `pad_token_id`, else eos
    (the first id when `eos_token_id` lists several, any of which ends a row). A padded batch must be
    left-padded. As in Hugging Face's `generate`: `max_length` counts the prompt too and applies when
    `max_new_tokens` is not given (neither: 32 new tokens); `repetition_penalty` (> 1 discourages tokens already
    in the row, prompt and padding included) applies in fp32 before temperature, top-k and top-p; without an
    `attention_mask`, `pad_token_id` tokens in `input_ids` are padding unless the id is also an eos id;
    `num_beams` must be 1 (there is no beam search).

    The output does not depend on `prefill_chunk_size` (None: the prompt in one call; "auto": the model's own
    `prefill_chunk_size`, else 512) beyond fp reordering.
    With `draft` ("prompt-lookup", "medusa", MedusaHeads, an NgramTable or a draft model), speculative decoding
    (`lincompile.runtime.speculative`, one sequence): the same tokens as greedy decoding, the same
    distribution as sampling (an ONNX export with 8-bit weights only up to its rounding: a warning says so);
    `num_draft_tokens` per target call, by default the draft's own (`speculative_generate`).
    """
    if num_beams != 1:
        raise ValueError(f"num_beams={num_beams}: lincompile decodes greedily or by sampling, without beam search; "
                         "use num_beams=1 (speculative decoding with draft= speeds greedy decoding up instead)")
    if not isinstance(input_ids, torch.Tensor):  # a list: on the model's device (an OrtModel takes CPU ids)
        input_ids = torch.as_tensor(input_ids, device=getattr(model, "device", None))
    max_new_tokens = _new_tokens(max_new_tokens, max_length, input_ids.shape[-1])
    if attention_mask is None and input_ids.dim() == 2:
        attention_mask = padding_mask(input_ids, pad_token_id, eos_token_id)
        if attention_mask is not None and draft is not None:
            raise ValueError(f"input_ids holds the pad id {pad_token_id}, which marks padding here (as in Hugging "
                             "Face's generate), and speculative decoding takes one unpadded sequence: drop the "
                             "padding, or pass pad_token_id=None to read that id as a token")
    if draft is not None:
        from lincompile.runtime.speculative import speculative_generate

        return speculative_generate(model, input_ids, max_new_tokens, draft, num_draft_tokens, do_sample=do_sample,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                                    streamer=streamer, generator=generator, adaptive=adaptive,
                                    attention_mask=attention_mask, prefill_chunk_size=prefill_chunk_size)[0]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got {tuple(input_ids.shape)}")
    check_token_ids(input_ids, vocab_size(model))
    require_decodable(model, "generate")
    check_new_tokens(model, input_ids.shape[1], max_new_tokens)
    if attention_mask is not None and attention_mask.shape == input_ids.shape and not bool(
            attention_mask[:, -1].bool().all()):
        raise ValueError("attention_mask: a row ends in padding (or is all padding); generate continues each row "
                         "from its last token, so pad on the left (tokenizer.padding_side = 'left')")
    config = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty)
    eos = torch.tensor(eos_ids(eos_token_id), dtype=torch.long, device=input_ids.device)
    fill = eos[:1] if pad_token_id is None else torch.tensor([pad_token_id], device=input_ids.device)
    batch = input_ids.shape[0]
    logits, state, next_position = prefill(model, input_ids, attention_mask, chunk_size=prefill_chunk_size)
    tokens = [input_ids]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(max_new_tokens):
        if repetition_penalty != 1.0:  # in fp32, as Hugging Face's (and the speculative verify's)
            logits = penalize(logits.float(), torch.cat(tokens, 1), repetition_penalty)
        token = sample(logits, config, generator)
        if len(eos):
            token = torch.where(done, fill, token)
            done |= torch.isin(token, eos)
        tokens.append(token[:, None])
        if streamer is not None:
            streamer.put(token.cpu())
        if bool(done.all()) or len(tokens) - 1 == max_new_tokens:
            break
        out = model(token[:, None], attention_mask=torch.ones_like(token[:, None]), past_state=state,
                    position_ids=next_position)
        state, logits = out.past_state, out.logits[:, -1]
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    return torch.cat(tokens, dim=1)


def with_model_ids(kwargs: dict[str, object], eos_token_id: object, pad_token_id: object) -> dict[str, object]:
    """`kwargs` of a model's `generate` with the model's own end-of-sequence and padding ids where the caller gave
    none, so that generation stops at the model's eos as Hugging Face's does; an explicit `eos_token_id=None`
    generates past it."""
    return {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id, **kwargs}


def _new_tokens(max_new_tokens: int | None, max_length: int | None, prompt: int) -> int:
    """How many tokens to generate after a `prompt`-token prompt: `max_new_tokens`, else `max_length` - prompt
    (Hugging Face's total length), else `DEFAULT_NEW_TOKENS`."""
    if max_new_tokens is None and max_length is not None:
        if max_length <= prompt:
            raise ValueError(f"max_length={max_length} leaves no new token after a prompt of {prompt} tokens; "
                             "max_length counts the prompt too: raise it, or give max_new_tokens")
        max_new_tokens = max_length - prompt
    if max_new_tokens is None:
        return DEFAULT_NEW_TOKENS
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return max_new_tokens


def padding_mask(input_ids: torch.Tensor, pad_token_id: int | None,
                 eos_token_id: int | list[int] | None) -> torch.Tensor | None:
    """The attention mask Hugging Face's `generate` infers when given none: `input_ids != pad_token_id` where the
    pad id occurs in `input_ids` and is no eos id; else None (every token real)."""
    if pad_token_id is None or pad_token_id in eos_ids(eos_token_id) or not bool((input_ids == pad_token_id).any()):
        return None
    return input_ids.ne(pad_token_id).long()
