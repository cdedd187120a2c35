"""Tiny random models of many Hugging Face causal-LM families, and one check of lincompile on each.

`family_model(name)` builds a 2-layer model (hidden 64, 4 heads, 2 key/value heads where the family has them,
vocab 128, 128 positions, no dropout) from a config alone. `check_family(name)` linearizes it and measures:
the exact `softmax` rewrite against Hugging Face on a batch with a left-padded row, and the `augmented` method's
prefill plus single-token decode against its own full forward. `bench/families.py` runs it on every family
here and prints the table; `tests/passes/test_families.py` holds the popular ones to it.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

#: Config keywords every family gets (each family's config keeps the ones it knows).
_COMMON: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, n_embd=64, d_model=64, num_hidden_layers=2, n_layer=2, num_layers=2,
    num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
    n_inner=128, max_position_embeddings=128, n_positions=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False, attention_dropout=0.0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    hidden_dropout=0.0, dropout=0.0, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    embed_dropout=0.0, resid_dropout=0.0, initializer_range=0.2,
)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(head_dim=None, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16)
#: Family (Hugging Face `model_type`) -> its own keywords (None drops a common one).
FAMILIES: dict[str, dict[str, Any]] = {
    "gemma": {}, "gemma3_text": {}, "phi": {}, "phi3": dict(original_max_position_embeddings=128), "stablelm": {},
    "gpt_neox": {}, "gptj": dict(rotary_dim=8), "codegen": dict(rotary_dim=8),
    "falcon": dict(head_dim=None, new_decoder_architecture=True, num_kv_heads=2), "starcoder2": {}, "olmo": {},
    "olmo2": {}, "cohere": {}, "granite": {}, "mixtral": _MOE, "qwen3": {}, "qwen3_moe": _MOE,
    "qwen2_moe": dict(_MOE, shared_expert_intermediate_size=32), "gpt_bigcode": dict(multi_query=True),
    "biogpt": {}, "persimmon": {}, "helium": {}, "glm": {}, "smollm3": {}, "exaone4": {},
    "minicpm3": _MLA, "deepseek_v3": dict(_MLA, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "gemma2": dict(attn_logit_softcapping=0.5),  # tiny scores: a small cap, so that capping changes them
    "bloom": {}, "mpt": dict(expansion_ratio=2, attn_config={"alibi": True}), "jetmoe": {},
    "gpt_oss": _MOE, "xglm": dict(attention_heads=4, ffn_dim=128), "openai-gpt": {}, "opt": dict(ffn_dim=128),
}


def family_model(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """The tiny random causal LM of `family` (eval mode, fp32); `attn_implementation` as Hugging Face takes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    keywords = {k: v for k, v in {**_COMMON, **FAMILIES[family]}.items() if v is not None}
    config = AutoConfig.for_model(family, **keywords)
    config.use_cache = False
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # configs warn about keywords of other families
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model.to(torch.float32).eval()


@torch.no_grad()
def check_family(family: str, attn_implementation: str = "sdpa", onnx_dir: str | None = None) -> dict[str, Any]:
    """What lincompile does with `family`: sites found (and layers), sliding windows, unmatched softmaxes, the
    exact rewrite's largest logit difference from Hugging Face over real tokens (2 rows of 12, the second
    left-padded on 3; fewer where a sliding window limits the exact rewrite), and `augmented`'s (new parameters
    perturbed) prefill plus 4 single steps against its full forward, relative to the largest logit. With
    `onnx_dir`, also `augmented` exported there and run by onnxruntime, the same prefill and steps from its own
    state against the torch ones ("onnx_rel"). Raises whatever lincompile raises."""
    import lincompile
    from lincompile.testing.tiny import perturb_new_parameters

    model = family_model(family, attn_implementation)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    captured = lincompile.api.capture_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = lincompile.optimize(model, "softmax", captured=captured)
    tokens = min(12, exact.max_positions or 12)
    ids, mask = ids[:, :tokens], mask[:, :tokens]
    real = mask.bool()
    theirs = model(ids, attention_mask=mask).logits
    result: dict[str, Any] = {
        "family": family, "attn": attn_implementation, "layers": model.config.num_hidden_layers,
        "sites": len(exact.sites), "unmatched": len(exact.report.unmatched),
        "kinds": sorted({s.mask_kind for s in exact.sites}), "windows": [s.window for s in exact.sites],
        "softmax_diff": float((exact(ids, attention_mask=mask).logits - theirs).abs()[real].max()),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmatched softmaxes: counted above
        linear = lincompile.optimize(model, "augmented", captured=captured)
    perturb_new_parameters(linear, 0.1)
    one = ids[:1]
    full = linear(one).logits
    if not linear.supports_state:
        return {**result, "decode_rel": None}
    steps = torch.cat(_decode(linear, one, tokens - 4), 1)
    result["decode_rel"] = float((steps - full).abs().max() / full.abs().max())
    if onnx_dir is not None:
        from lincompile.backends.ort import OrtModel

        ort = OrtModel.from_dir(linear.export_onnx(onnx_dir), providers=["CPUExecutionProvider"])
        result["onnx_rel"] = float((torch.cat(_decode(ort, one, tokens - 4), 1) - steps).abs().max()
                                   / steps.abs().max())
    return result


def _decode(model: Any, ids: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """The logits of a `prompt`-token prefill of `ids` [1, T], then of each later token decoded from the state."""
    out = model(ids[:, :prompt])
    logits = [out.logits]
    for i in range(prompt, ids.shape[1]):
        out = model(ids[:, i:i + 1], past_state=out.past_state)
        logits.append(out.logits)
    return logits
