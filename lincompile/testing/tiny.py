"""Tiny, randomly initialised Hugging Face models for fast tests (no hub access needed).

Every model is built from a config only, in eval mode and fp32, with 2 layers, 4 query heads,
hidden size 64 (head dim 16), a small vocabulary (128), 128 positions, all dropout probabilities
at 0 and ``config.use_cache = False``. Llama, Qwen2 and Mistral use GQA (2 key/value heads).
Typical use::

    model = tiny_model("llama", attn_implementation="eager")
    kwargs = forward_kwargs(model, example_inputs("llama"))   # adds use_cache=False
    ep = torch.export.export(model, (), kwargs, strict=False,
                             dynamic_shapes=dynamic_shapes(kwargs))
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "MAX_POS",
    "NUM_LAYERS",
    "VOCAB_SIZE",
    "attn_implementations",
    "char_tokenizer",
    "dynamic_shapes",
    "example_inputs",
    "expected_sites",
    "forward_kwargs",
    "make_config",
    "tiny_model",
    "valid_positions",
]

FAMILIES: tuple[str, ...] = ("llama", "gpt2", "bert", "t5", "opt", "qwen2", "mistral")
NUM_LAYERS = 2
VOCAB_SIZE = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2  # only for the GQA families below
MAX_POS = 128
GQA_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral")
ENCODER_FAMILIES: tuple[str, ...] = ("bert", "t5")  # right padding; bidirectional (encoder) attention


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_config(family: str, num_layers: int = NUM_LAYERS) -> Any:
    """Return the tiny `PretrainedConfig` for ``family`` (no dropout, small sizes, no KV cache)."""
    config = _make_config(family, num_layers)
    config.use_cache = False  # so that forward/export return no Cache object even without the kwarg
    return config


def _make_config(family: str, num_layers: int) -> Any:
    _check(family)
    import transformers as tf

    if family in GQA_FAMILIES:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family]
        extra: dict[str, Any] = {"sliding_window": None} if family == "mistral" else {}
        return cls(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=num_layers,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POS,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB_SIZE, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=num_layers, n_head=HEADS,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        )
    if family == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
            intermediate_size=2 * HIDDEN, max_position_embeddings=MAX_POS, type_vocab_size=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        )
    if family == "t5":
        return tf.T5Config(
            vocab_size=VOCAB_SIZE, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN, num_layers=num_layers,
            num_decoder_layers=num_layers, num_heads=HEADS, relative_attention_num_buckets=8,
            relative_attention_max_distance=MAX_POS, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
    # opt
    return tf.OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=num_layers, ffn_dim=2 * HIDDEN,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _model_class(family: str) -> type:
    import transformers as tf

    return {
        "llama": tf.LlamaForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
        "bert": tf.BertModel,
        "t5": tf.T5ForConditionalGeneration,
        "opt": tf.OPTForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "mistral": tf.MistralForCausalLM,
    }[family]


def _auto_class(family: str) -> Any:
    import transformers as tf

    if family == "bert":
        return tf.AutoModel
    return tf.AutoModelForSeq2SeqLM if family == "t5" else tf.AutoModelForCausalLM


def attn_implementations(family: str) -> tuple[str, ...]:
    """Which of ("sdpa", "eager") transformers supports for ``family`` (all seven support both)."""
    _check(family)
    cls = _model_class(family)
    return ("sdpa", "eager") if getattr(cls, "_supports_sdpa", False) else ("eager",)


def tiny_model(
    family: str, attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = NUM_LAYERS
) -> torch.nn.Module:
    """Build a tiny randomly initialised model (eval mode, fp32); deterministic for a given ``seed``."""
    _check(family)
    if attn_implementation not in attn_implementations(family):
        raise ValueError(f"{family} does not support attn_implementation={attn_implementation!r}")
    config = make_config(family, num_layers)
    # Seed a private generator state so that building a model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # transformers 5: `from_config(config, attn_implementation=..., dtype=...)`; it sets
        # `config._attn_implementation` (recursively on sub-configs).
        model = _auto_class(family).from_config(config, attn_implementation=attn_implementation,
                                                dtype=torch.float32)
    assert type(model) is _model_class(family), type(model)
    return model.to(torch.float32).eval()


def example_inputs(
    family: str, batch: int = 2, seq: int = 8, pad_row: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Forward kwargs: ``input_ids`` + ``attention_mask`` (int64, 1 = keep).

    With ``pad_row`` the last row is padded on 2 tokens: left padding for decoder-only families,
    right padding for the encoders (bert, t5). T5 also gets ``decoder_input_ids`` (length ``seq``,
    starting with the decoder start token) and an all-ones ``decoder_attention_mask``. Token ids
    avoid the special ids 0-2 except at padded positions. Does not include ``use_cache``; see
    :func:`forward_kwargs`.
    """
    _check(family)
    if pad_row and seq <= 2:
        raise ValueError("seq must be > 2 when pad_row is True")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch, seq), generator=gen, dtype=torch.long)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_row:
        if family in ENCODER_FAMILIES:
            attention_mask[-1, -2:] = 0
            input_ids[-1, -2:] = 0
        else:
            attention_mask[-1, :2] = 0
            input_ids[-1, :2] = 0
    out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "bert":
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    if family == "t5":
        dec = torch.randint(3, VOCAB_SIZE, (batch, seq), generator=gen, dtype=torch.long)
        dec[:, 0] = 0  # decoder_start_token_id
        out["decoder_input_ids"] = dec
        out["decoder_attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return out


def forward_kwargs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Return ``inputs`` plus ``use_cache=False`` when ``model.forward`` accepts ``use_cache``."""
    out = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        out["use_cache"] = False
    return out


def expected_sites(family: str, num_layers: int = NUM_LAYERS) -> int:
    """Number of softmax-attention sites: one per layer; t5 has 3 per layer (enc self, dec self, dec cross)."""
    _check(family)
    return 3 * num_layers if family == "t5" else num_layers


def dynamic_shapes(inputs: dict[str, Any], max_seq: int = MAX_POS) -> dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export.export(model, (), inputs, ...)``.

    Batch and sequence dims of every 2-D tensor are dynamic; ``decoder_*`` tensors get their own
    sequence dim (T5 encoder and decoder lengths vary independently); non-tensors get ``None``.
    Example sizes must be >= 2 (export specialises dims of size 0/1).
    """
    from torch.export import Dim

    batch, seq = Dim("batch", min=1), Dim("seq", min=1, max=max_seq)
    dec_seq = Dim("dec_seq", min=1, max=max_seq)
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            out[name] = {0: batch, 1: dec_seq if name.startswith("decoder_") else seq}
        else:
            out[name] = None
    return out


def valid_positions(family: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool ``[batch, out_seq]`` mask of output positions that are comparable across implementations.

    Left-padded query rows of decoder-only models attend to nothing, and eager and sdpa then give
    different (meaningless) outputs there; everything else agrees to ~1e-6. For bert and t5 all
    positions are comparable (t5 outputs follow ``decoder_input_ids``).
    """
    _check(family)
    if family == "t5":
        return torch.ones_like(inputs["decoder_input_ids"], dtype=torch.bool)
    if family in ENCODER_FAMILIES or "attention_mask" not in inputs:
        return torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    return inputs["attention_mask"].bool()


def perturb_new_parameters(linear: Any, scale: float = 0.1, seed: int = 0) -> Any:
    """Move a linearized model's new parameters off their initial values (alpha and conv taps start at zero)
    by `scale` * N(0, 1), in place, so every branch of the method counts in a test; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in linear.graph.named_parameters():
            if name.startswith("lincompile"):
                param.add_(scale * torch.randn(param.shape, generator=gen))
    return linear


def char_tokenizer() -> Any:
    """A character-level fast tokenizer for the tiny models: ids 0-3 are <pad> <s> </s> <unk>, then printable
    ASCII and newline (4..99, inside VOCAB_SIZE)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
