"""Per-layer recurrent state of a linearized model.

`RecurrentState.tensors` maps graph input names `past_key_values.{site}.{part}` to tensors; `length` is how many
tokens the state has absorbed (it offsets position ids). For linear methods every tensor's shape is
independent of `length`; only exact-softmax sites (hybrids) keep a growing KV cache. `tensors` may hold
onnxruntime OrtValues when the state comes from an `OrtModel`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RecurrentState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def _torch(self) -> dict[str, torch.Tensor]:
        """The tensors as torch tensors (an `OrtModel`'s OrtValues copied to the CPU)."""
        import numpy as np

        return {name: t if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t.numpy()))
                for name, t in self.tensors.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._torch().values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self._torch().items()}

    def clone(self) -> "RecurrentState":
        """A copy in torch tensors (also of an `OrtModel`'s state, which then feeds either runtime)."""
        return RecurrentState({k: v.clone() for k, v in self._torch().items()}, self.length)

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> "RecurrentState":
        """The state on `device`, its floating parts in `dtype` (integer parts, the position counters, keep
        theirs); `state.to(torch.float16)` works as for a tensor. A linear method's state accumulates in fp32
        whatever the model's dtype, so a lower `dtype` only loses precision."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return RecurrentState({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                               for k, v in self._torch().items()}, self.length)


def hf_cache_keyword(model: nn.Module) -> str:
    """The keyword a Hugging Face model's forward takes its KV cache by: `cache` in recent transformers,
    `past_key_values` before (5.17, the GPU image's). The cache object grows in place either way."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def require_decodable(model: object, what: str) -> None:
    """Refuse, naming `what`, a model that cannot continue through a recurrent state (a `LinearizedModel` or an
    `OrtModel` whose `supports_state` is False: an encoder, or causal attention sites left without a state)."""
    meta = getattr(model, "meta", None) or {}
    if not getattr(model, "supports_state", True) or not meta.get("supports_state", True):
        raise ValueError(f"{what} needs a causal language model whose causal attention sites all keep a recurrent "
                         "state; this model has none to continue from (an encoder or encoder-decoder, sites left "
                         "unrewritten, exact-softmax sites with an additive bias such as ALiBi, which a state "
                         "cannot continue, or a method that reads later tokens such as augmented-centered): call it "
                         "on whole sequences instead")


def check_token_ids(input_ids: torch.Tensor, vocab: int | None) -> None:
    """Refuse a prompt holding ids outside the vocabulary 0..vocab - 1 (an embedding lookup would say only "index
    out of range", or read another row on a GPU); `vocab` None checks the sign only."""
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"input_ids holds ids outside the vocabulary 0..{vocab - 1 if vocab else '?'} (min {low}, "
                         f"max {high}): encode the prompt with the model's tokenizer, and pad with its pad id, not "
                         "-1 or -100")


def check_attention_mask(attention_mask: object) -> None:
    """Refuse a mask (a torch tensor or an array; nonzero keeps a token) with negative values: an additive mask
    (0 keeps, -inf drops) would be read the other way round. The values of a mask on a GPU are not read."""
    import numpy as np

    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.device.type != "cpu" or attention_mask.dtype == torch.bool or not attention_mask.numel():
            return
        least = attention_mask.detach().min().item()  # (in torch: numpy has no bf16)
    else:
        values = np.asarray(attention_mask)
        if not values.size or values.dtype == np.bool_:
            return
        least = values.min()
    if least < 0:
        raise ValueError(f"attention_mask holds negative values (min {least}), as an additive mask does: "
                         "pass 1 for each token to keep and 0 for each to drop")


def check_logits_to_keep(logits_to_keep: object) -> None:
    """Refuse a `logits_to_keep` that is not a whole number >= 0 (0: every token's logits; k: the last k)."""
    import numbers

    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, numbers.Integral) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an integer >= 0 (0: every token's logits, k: the last k "
                         f"tokens'), got {logits_to_keep!r}")


def check_position_ids(position_ids: object, batch: int, tokens: int, keep: object = None) -> None:
    """Refuse position ids (a torch tensor or an array) a graph would read wrongly instead of failing: not whole
    numbers (a cast truncates them), not shaped [batch, tokens] or [1, tokens], or negative at a token the mask
    `keep` (nonzero: kept; None: all) keeps (a learned table would be read out of range, RoPE would turn
    backwards; a masked token's position reaches no kept token, and the runtimes set it to 0). The values of
    position ids on a GPU are not read: that would cost a sync per call."""
    import numpy as np

    if isinstance(position_ids, torch.Tensor):
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must hold integers, got dtype {position_ids.dtype}")
        if position_ids.device.type != "cpu":
            values = None
        else:
            values = position_ids.detach().numpy()
        shape = tuple(position_ids.shape)
    else:
        values = np.asarray(position_ids)
        if not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"position_ids must hold integers, got dtype {values.dtype}")
        shape = values.shape
    if shape not in ((batch, tokens), (1, tokens)):
        raise ValueError(f"position_ids must be [batch, tokens] = {(batch, tokens)} (or [1, tokens]), got {shape}")
    if values is None:
        return
    if keep is not None:
        kept = keep.detach().cpu().numpy() if isinstance(keep, torch.Tensor) else np.asarray(keep)
        values = np.broadcast_to(values, (batch, tokens))[kept != 0]
    if values.size and values.min() < 0:
        raise ValueError(f"position_ids holds negative positions at kept tokens (min {values.min()}); number "
                         "tokens from 0 (a masked pad may have any position)")


def check_state(state: RecurrentState, names: list[str], batch: int,
                shapes: dict[str, tuple[int | str, ...]] | None = None) -> None:
    """Refuse a `past_state` that is not this model's (other parts, or parts of other sizes per row: `shapes`, a
    str for a dim that grows: a KV cache's, which holds `state.length` tokens) or not this call's (another batch
    size)."""
    have, want = set(state.tensors), set(names)
    if have != want:
        raise ValueError(f"past_state does not belong to this model (missing {sorted(want - have)[:3]}, unexpected "
                         f"{sorted(have - want)[:3]}): pass the past_state this model returned")
    for name, tensor in state.tensors.items():
        shape = tuple(tensor.shape() if callable(tensor.shape) else tensor.shape)  # an OrtValue's shape is a method
        if shape[0] != batch:
            raise ValueError(f"past_state holds {shape[0]} rows ({name}), input_ids {batch}: continue each batch "
                             "from its own state")
        expected = (shapes or {}).get(name)
        if expected is not None and (len(shape) != len(expected) + 1 or any(
                isinstance(e, int) and e != got for e, got in zip(expected, shape[1:]))):
            raise ValueError(f"past_state part {name} is {list(shape[1:])} per row, this model's is "
                             f"{list(expected)}: a state of another model (method or size) cannot continue here")
        grown = [got for e, got in zip(expected or (), shape[1:]) if isinstance(e, str) and got != state.length]
        if grown:
            raise ValueError(f"past_state part {name} holds {grown[0]} past tokens, and its length is {state.length}: "
                             "pass the RecurrentState this model returned (its length numbers the next tokens)")


#: Position tables by attribute name: GPT-2's and GPT-Neo's `wpe`, the BERT family's `position_embeddings`, OPT's
#: `embed_positions` (an embedding), GPT-J's and CodeGen's `embed_positions` (a precomputed rotary buffer), the
#: original GPT's `positions_embed`.
POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions", "positions_embed")


def _tables(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Embedding]]:
    """(embeddings module, position table) pairs: each `nn.Embedding` named as in `POSITION_TABLES`, with its parent."""
    for module in model.modules():
        for name, child in module.named_children():
            if name in POSITION_TABLES and isinstance(child, nn.Embedding):
                yield module, child


def _numbered_after_padding(module: nn.Module, table: nn.Embedding) -> bool:
    """Whether `module` numbers positions after `table`'s padding row: it holds that row as its own `padding_idx`
    (RoBERTa's embeddings do; LXMERT's table has a padding row 0 but numbers its tokens from 0)."""
    return table.padding_idx is not None and getattr(module, "padding_idx", None) == table.padding_idx


def position_padding(model: nn.Module) -> int | None:
    """The padding id a RoBERTa-style Hugging Face module numbers its positions after (RoBERTa, XLM-R, CamemBERT,
    Data2VecText, ESM, ...): the padding row of the position table beside its input embedding, when that
    embeddings module numbers after it. Hugging Face numbers such a model's tokens padding_idx + 1, + 2, ... and
    gives pad tokens padding_idx. None for a model numbering from 0 and for encoder-decoder models. (Runners
    carry theirs as `.position_padding`.)"""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        inputs = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a Hugging Face model, or one without a single input table
        inputs = None
    for module, table in _tables(model):
        beside_inputs = inputs is None or any(child is inputs for child in module.children())
        if beside_inputs and _numbered_after_padding(module, table):
            return table.padding_idx
    return None


def first_position(model: object) -> int:
    """The position id of a sequence's first token for a lincompile runner (`LinearizedModel`, `OrtModel`):
    its `position_padding` + 1, else 0."""
    padding = getattr(model, "position_padding", None)
    return 0 if padding is None else padding + 1


def mask_positions(attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Position ids [B, T] that count real (nonzero) tokens from `start`; padding repeats its neighbour's (>= start)."""
    return (attention_mask.ne(0).long().cumsum(-1) - 1).clamp_min(0) + start


def numbered_from_mask(model: nn.Module) -> bool:
    """Whether `model` (a Hugging Face model) numbers a call's tokens from its attention mask when it is given no
    position ids, so that left padding takes no position (OPT does; LLaMA, GPT-2 and the rest count every token).
    Found by calling it on a left-padded row with no position ids, with counted ones and with plain ones; asked
    only of a model with an absolute position table (with rotary positions all three give the same outputs)."""
    if position_padding(model) is not None or position_tables(model) is None:
        return False
    param = next(model.parameters(), None)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if param is None or not isinstance(vocab, int) or vocab < 2:
        return False
    ids = (torch.arange(3, 9, device=param.device) % vocab).unsqueeze(0)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]], device=param.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            given, counted, plain = [
                model(ids, attention_mask=mask, **({} if p is None else {"position_ids": p}))[0][0, -1].float()
                for p in (None, mask_positions(mask), torch.arange(6, device=param.device).unsqueeze(0))]
            tolerance = 1e-3 * float(given.abs().max()) + 1e-6
            return bool((given - counted).abs().max() <= tolerance < (given - plain).abs().max())
    except Exception:  # a model this call does not fit (no position ids, other inputs): it keeps counting every token
        return False
    finally:
        model.train(training)


def default_positions(input_ids: torch.Tensor, start: int, padding: int | None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The position ids [B, T] of a call given none, after `start` tokens: start + arange(T), or for a model
    numbered after `padding`, Hugging Face's: the count of non-pad tokens, + start + padding (pads get padding).
    `mask`, for a model `numbered_from_mask`: its attention mask, whose real tokens are counted from `start` (from
    0 when it also covers the `start` past tokens: exact then even if the past was padded)."""
    batch, tokens = input_ids.shape
    if mask is not None:
        mask = mask.to(input_ids.device)
        return mask_positions(mask)[:, -tokens:] if mask.shape[1] > tokens else mask_positions(mask, start)
    if padding is None:
        return torch.arange(start, start + tokens, device=input_ids.device).unsqueeze(0).expand(batch, tokens)
    real = input_ids.ne(padding).long()
    return (real.cumsum(1) + start) * real + padding


#: Why a model takes at most `max_positions` tokens, by default: its learned position table ...
LEARNED_POSITIONS = "learned positions (it cannot extrapolate its position embeddings)"
#: ... or a fairseq-style precomputed sinusoidal table (XGLM's).
SINUSOIDAL_POSITIONS = ("positions of its precomputed sinusoidal table (Hugging Face regrows the table past them; a "
                        "captured graph keeps the rows it was captured with)")
#: ... when an exact softmax site keeps a sliding window shorter than the position table (or without one).
SLIDING_WINDOW = ("tokens, the sliding window of its exact softmax sites (lincompile's softmax op has no window; a "
                  "linear method drops it)")
#: ... when a cosFormer site's horizon M is shorter: its weights cos(pi/2 (i - j) / M) turn negative past M tokens.
COSFORMER_HORIZON = ("positions, the horizon M of its cosFormer sites (their weights cos(pi/2 (i - j) / M) turn "
                     "negative past it and the outputs diverge; a custom MethodSpec with a larger horizon reaches "
                     "further)")


def position_tables(model: nn.Module) -> tuple[int, str] | None:
    """(how many positions `model`'s position tables cover, why): the smallest table's, net of an offset or padding
    rows (OPT's and XGLM's offset of 2, RoBERTa's rows up to its padding index). The tables: learned embeddings,
    precomputed buffers named as in `POSITION_TABLES` (GPT-J's rotary one), and fairseq-style sinusoidal tables (a
    module named so holding a 2-D `weights` buffer, as XGLM's). None for a model without one (rotary positions
    computed on the fly, relative ones) and for encoder-decoder models, whose two tables differ."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    limits = [(table.num_embeddings - int(getattr(table, "offset", 0) or 0)
               - (table.padding_idx + 1 if _numbered_after_padding(module, table) else 0), LEARNED_POSITIONS)
              for module, table in _tables(model)]
    limits += [(buffer.shape[0], LEARNED_POSITIONS) for name, buffer in model.named_buffers()
               if name.rsplit(".", 1)[-1] in POSITION_TABLES and buffer.dim() == 2]
    limits += [(module.weights.shape[0] - int(getattr(module, "offset", 0) or 0), SINUSOIDAL_POSITIONS)
               for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in POSITION_TABLES and not isinstance(module, nn.Embedding)
               and isinstance(getattr(module, "weights", None), torch.Tensor) and module.weights.dim() == 2]
    return min(limits, key=lambda limit: limit[0]) if limits else None


def position_limit(model: object) -> int | None:
    """A linearized model's (or ONNX runner's) `max_positions`, else a torch module's `position_tables` limit."""
    if hasattr(model, "max_positions"):
        return model.max_positions
    table = position_tables(model) if isinstance(model, nn.Module) else None
    return None if table is None else table[0]


def limit_reason(model: object) -> str:
    """What `position_limit(model)` stands for: its `limit_reason` (a runner's), else its table's."""
    table = position_tables(model) if isinstance(model, nn.Module) and not hasattr(model, "max_positions") else None
    return getattr(model, "limit_reason", None) or (LEARNED_POSITIONS if table is None else table[1])


def check_positions(model: object, end: int, what: str = "this call") -> None:
    """Refuse a sequence that reaches past `model`'s position limit (`end` tokens in all)."""
    limit = position_limit(model)
    if limit is not None and end > limit:
        raise ValueError(f"{what} reaches token {end}, past the model's {limit} {limit_reason(model)}: stay within "
                         f"{limit} tokens")


def check_new_tokens(model: object, prompt: int, max_new_tokens: int) -> None:
    """Refuse, before any work, a generation that would feed the model past its position limit (the last new
    token is never fed: prompt + max_new_tokens - 1 tokens are)."""
    limit = position_limit(model)
    if limit is not None and prompt > limit:
        raise ValueError(f"the prompt has {prompt} tokens, past the model's {limit} {limit_reason(model)}: shorten "
                         f"it to at most {limit} tokens")
    if limit is not None and prompt + max_new_tokens - 1 > limit:
        raise ValueError(f"a prompt of {prompt} tokens plus max_new_tokens={max_new_tokens} passes the model's "
                         f"{limit} {limit_reason(model)}: use max_new_tokens <= {max(limit - prompt + 1, 0)}, or a "
                         "shorter prompt")
