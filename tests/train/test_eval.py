"""Perplexity: the textbook formula, identical for an exact rewrite."""
import math

import pytest
import torch
import torch.nn.functional as F

import lincompile
from lincompile.testing.tiny import tiny_model
from lincompile.train.eval import perplexity


def test_perplexity_matches_formula_and_softmax_rewrite():
    model = tiny_model("llama")
    blocks = torch.randint(3, 128, (5, 9))
    result = perplexity(model, blocks, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(blocks).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 128), blocks[:, 1:].reshape(-1))
    assert result.tokens == 40 and math.isclose(result.ppl, math.exp(nll.item()), rel_tol=1e-5)
    exact = perplexity(lincompile.optimize(model, "softmax"), blocks, progress=False)
    assert math.isclose(exact.ppl, result.ppl, rel_tol=1e-5)


def test_perplexity_rejects_bad_blocks():
    with pytest.raises(ValueError, match="block_size"):
        perplexity(tiny_model("llama"), torch.zeros(2, 1, dtype=torch.long))


def test_blocks_past_learned_positions_are_refused(tmp_path):
    from lincompile.train.trainer import TrainConfig, train

    hf = tiny_model("gpt2")
    blocks = torch.randint(0, 128, (2, 129))
    for model in (hf, lincompile.optimize(hf, "linear-elu")):
        with pytest.raises(ValueError, match=r"a block of 129 tokens \(--block-size\) reaches token 129, past the "
                                             "model's 128 learned positions"):
            perplexity(model, blocks, progress=False)
    config = TrainConfig(stage1_steps=1, stage2_steps=0, batch_size=2, block_size=129)
    with pytest.raises(ValueError, match="a block of 129 tokens"):
        train(lincompile.optimize(hf, "linear-elu"), blocks, config, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
