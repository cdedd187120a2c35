"""Training Medusa heads: labels, cached target features, loss and held-out accuracy on tiny and real models."""
from __future__ import annotations

import pytest
import torch

from lincompile.runtime.medusa import MedusaConfig, MedusaHeads, read_metadata
from lincompile.testing.tiny import tiny_model
from lincompile.train.medusa import (
    IGNORE, Features, HiddenTarget, evaluate_heads, hf_target, head_labels, precompute_features, train_medusa)

pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(n: int, t: int, seed: int) -> torch.Tensor:
    """Deterministic text: each row steps through the vocabulary by 7 from a random start (ids 3..127)."""
    starts = torch.randint(0, 125, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + 7 * torch.arange(t)) % 125 + 3


@pytest.fixture(scope="module")
def model():
    """A tiny Llama with a sharp lm_head (x30), so its logits are peaked like a trained model's."""
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def test_head_labels_shift_by_head():
    ids = torch.arange(10).view(1, 10)
    features = Features(torch.zeros(1, 10, 4), ids + 100, ids)
    own = head_labels(features, 3)
    assert own[0, :, 0].tolist() == [101 + t for t in range(9)] + [IGNORE]
    assert own[0, :, 2].tolist() == [103 + t for t in range(7)] + [IGNORE] * 3
    corpus = head_labels(features, 3, "corpus")
    assert corpus[0, :, 0].tolist() == [2 + t for t in range(8)] + [IGNORE] * 2
    with pytest.raises(ValueError, match="labels must be one of"):
        head_labels(features, 3, "gold")


def test_features_are_the_targets_hidden_states_and_argmax(model):
    blocks = _blocks(3, 12, 0)
    features = precompute_features(model, blocks, batch_size=2, dtype=torch.float32, progress=False)
    out = model(input_ids=blocks, output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(features.hidden, out.hidden_states[-1])
    assert torch.equal(features.greedy, out.logits.argmax(-1)) and torch.equal(features.ids, blocks)
    assert precompute_features(model, blocks, progress=False).hidden.dtype == torch.float16


def test_linearized_target_features_match_the_original(model):
    import lincompile
    from lincompile.train.medusa import as_target

    linear = lincompile.optimize(model, "softmax")  # exact: its hidden states are the original's
    target = as_target(linear)
    assert target.lm_head_weight.data_ptr() == model.lm_head.weight.data_ptr()
    blocks = _blocks(2, 70, 4)  # longer than one verify window of hidden-state outputs
    ours = precompute_features(linear, blocks, dtype=torch.float32, progress=False)
    reference = precompute_features(model, blocks, dtype=torch.float32, progress=False)
    torch.testing.assert_close(ours.hidden, reference.hidden, rtol=1e-4, atol=1e-4)
    assert (ours.greedy == reference.greedy).float().mean() > 0.99


def test_untrained_heads_score_like_the_shifted_base_prediction(model):
    features = precompute_features(model, _blocks(4, 16, 1), dtype=torch.float32, progress=False)
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=64, vocab_size=128), hf_target(model).lm_head_weight)
    result = evaluate_heads(heads, features)
    # an untrained head i predicts the target's argmax at t, scored against the argmax at t+i
    same = (features.greedy[:, :-1] == features.greedy[:, 1:]).float().mean()
    assert result["accuracy"][0] == pytest.approx(float(same), abs=1e-4)
    assert result["positions"] == 4 * 15 and 1 <= result["chain_tokens"] <= 3


def test_training_lowers_the_loss_raises_accuracy_and_saves(model, tmp_path):
    calls = []
    base = hf_target(model)

    def hidden_fn(ids):
        calls.append(ids.shape[0])
        return base.hidden_fn(ids)

    target = HiddenTarget(hidden_fn, base.lm_head_weight)
    config = MedusaConfig(num_heads=3, hidden_size=64, vocab_size=128)
    result = train_medusa(target, _blocks(24, 32, 2), config, steps=40, lr=1e-2, batch_size=256,
                          out_dir=tmp_path / "heads", heldout=_blocks(6, 32, 3), warmup_steps=0, progress=False,
                          metadata={"target": "tiny"})
    assert calls == [4] * 6 + [4, 2]  # every block through the target exactly once (train, then held-out)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    before, after = result.evals[0], result.evals[-1]
    assert [e["step"] for e in result.evals] == [0, 40]
    assert all(a > b + 0.25 for a, b in zip(after["accuracy"], before["accuracy"])), (before, after)
    meta = read_metadata(result.saved)
    assert meta["metadata"]["target"] == "tiny" and meta["metadata"]["training"]["heldout"] == after
    back = MedusaHeads.load(result.saved, base.lm_head_weight)
    hidden = torch.randn(1, 3, 64)
    torch.testing.assert_close(back(hidden), result.heads(hidden))
    assert not any(p.requires_grad for p in model.parameters() if p.grad is not None)


def test_corpus_labels_and_precomputed_features(model):
    features = precompute_features(model, _blocks(24, 32, 2), dtype=torch.float32, progress=False)
    held = precompute_features(model, _blocks(4, 32, 3), progress=False)
    config = MedusaConfig(num_heads=2, hidden_size=64, vocab_size=128)
    result = train_medusa(model, features, config, steps=30, lr=1e-2, batch_size=256, heldout=held,
                          labels="corpus", warmup_steps=0, progress=False)
    assert result.saved is None and result.history[-1]["loss"] < result.history[0]["loss"]
    with pytest.raises(ValueError, match="labels must be one of"):
        train_medusa(model, features, config, steps=1, labels="gold")


@pytest.mark.slow
def test_heads_train_on_real_smollm2(smollm2):
    from lincompile.train.data import heldout_blocks, load_texts, token_blocks

    model, tokenizer = smollm2
    blocks = token_blocks(tokenizer, load_texts("train"), 128, 12)
    held = heldout_blocks(tokenizer, 128, 2)
    config = MedusaConfig(num_heads=2, hidden_size=576, vocab_size=49152)
    result = train_medusa(model, blocks, config, steps=8, lr=3e-3, batch_size=128, heldout=held, warmup_steps=0,
                          progress=False)
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert result.evals[-1]["accuracy"][0] > result.evals[0]["accuracy"][0]
