"""Speculative decoding on the real linearized SmolLM2: greedy output identical to plain greedy decoding on
held-out prompts for every draft kind, in torch and in onnxruntime.

CI runs 4 prompts x 32 new tokens (about 8 CPU minutes); the full 20 x 64 check is
`python bench/speculative.py --prompts 20 --new-tokens 64 --ks 4 --weights none --draft-model layers:4
--medusa zero --ngram DIR` (add `--runtime ort` for onnxruntime), whose table has an `identical` column."""
import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS, PROMPT_TOKENS, NEW_TOKENS, K = 4, 32, 32, 4
# `smollm2` (model, tokenizer) is the session fixture of tests/conftest.py


@pytest.fixture(scope="module")
def target(smollm2):
    """The shipped trained augmented linearization when there is one, else the untrained one."""
    from lincompile.pretrained import linearized

    model, _ = smollm2
    return linearized(model, "augmented", weights="auto")


@pytest.fixture(scope="module")
def prompts(smollm2):
    from lincompile.train.data import heldout_blocks

    blocks = heldout_blocks(smollm2[1], PROMPT_TOKENS, PROMPTS)
    assert blocks.shape[0] == PROMPTS
    return [blocks[i:i + 1] for i in range(PROMPTS)]


@pytest.fixture(scope="module")
def drafts(smollm2, target):
    """Every draft kind: prompt lookup, prompt lookup + an n-gram table of the target's greedy predictions (on
    256 training tokens here), a shallow linearized draft model (the target's first 4 layers, as `make-draft`
    builds it, undistilled here: identity must hold whatever the draft proposes) and Medusa heads
    (zero-initialised: each head starts as the base LM head)."""
    import lincompile
    from lincompile.runtime.medusa import MedusaConfig, MedusaHeads, lm_head_weight
    from lincompile.runtime.ngram import build_ngram_table
    from lincompile.train.data import load_texts, token_blocks
    from lincompile.train.draft_model import shallow_hf

    config = target.hf_config
    heads = MedusaHeads(MedusaConfig(num_heads=4, hidden_size=config.hidden_size, vocab_size=config.vocab_size),
                        lm_head_weight(target))
    shallow = lincompile.optimize(shallow_hf(smollm2[0], 4), "augmented")
    blocks = token_blocks(smollm2[1], load_texts("train"), 128, 2)
    with torch.no_grad():
        table = build_ngram_table(blocks, target(blocks).logits.argmax(-1), config.vocab_size)
    return {"prompt-lookup": "prompt-lookup", "ngram": table, "model": shallow, "medusa": heads}


def _check_identity(model, prompts, drafts):
    from lincompile.runtime.generate import generate
    from lincompile.runtime.speculative import speculative_generate

    for i, prompt in enumerate(prompts):
        plain = generate(model, prompt, NEW_TOKENS)
        for name, draft in drafts.items():
            out, stats = speculative_generate(model, prompt, NEW_TOKENS, draft, K)
            assert torch.equal(out, plain), f"prompt {i}, draft {name}: first difference at new token " \
                f"{int((out[0, PROMPT_TOKENS:] != plain[0, PROMPT_TOKENS:]).nonzero()[0])}"
            assert stats.new_tokens == NEW_TOKENS


def test_greedy_identity_torch(target, prompts, drafts):
    _check_identity(target, prompts, drafts)


def test_greedy_identity_onnxruntime(target, prompts, drafts, tmp_path_factory):
    from lincompile.backends.ort import OrtModel

    out = tmp_path_factory.mktemp("onnx") / "smollm2"
    target.export_onnx(str(out))
    _check_identity(OrtModel.from_dir(out), prompts, drafts)
