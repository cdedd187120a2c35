"""Medusa heads: zero-init equals the base lm_head, save/load round trip and its errors, trees, chain sampling."""
from __future__ import annotations

import json

import pytest
import torch

from lincompile.runtime.medusa import (
    TREES, MedusaConfig, MedusaHeads, attach, medusa_tree, read_metadata, sample_chain, tree_spec)
from lincompile.runtime.sampling import SamplingConfig
from lincompile.testing.tiny import tiny_model

H, V = 16, 50


def _heads(num_heads: int = 3, num_layers: int = 1, seed: int = 0) -> MedusaHeads:
    gen = torch.Generator().manual_seed(seed)
    heads = MedusaHeads(MedusaConfig(num_heads=num_heads, hidden_size=H, vocab_size=V, num_layers=num_layers),
                        torch.randn(V, H, generator=gen))
    return heads


def _perturb(heads: MedusaHeads) -> None:
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)


def test_config_json_round_trip_and_checks():
    config = MedusaConfig(num_heads=5, hidden_size=8, vocab_size=11, num_layers=2)
    assert MedusaConfig.from_json(config.to_json()) == config
    assert MedusaConfig(hidden_size=8, vocab_size=11).num_heads == 4
    with pytest.raises(ValueError, match="num_heads"):
        MedusaConfig(num_heads=0, hidden_size=8, vocab_size=11)
    with pytest.raises(ValueError, match="unknown MedusaConfig fields"):
        MedusaConfig.from_dict({"hidden_size": 8, "vocab_size": 11, "heads": 2})


def test_zero_initialised_heads_equal_the_base_lm_head():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    weight = model.get_output_embeddings().weight
    heads = MedusaHeads(MedusaConfig(num_heads=3, hidden_size=64, vocab_size=128, num_layers=2), weight)
    logits = heads(out.hidden_states[-1])
    assert logits.shape == (2, 7, 3, 128)
    for i in range(3):
        torch.testing.assert_close(logits[:, :, i], out.logits, rtol=1e-5, atol=1e-5)
    assert heads.lm_head_weight.data_ptr() == weight.data_ptr() and not heads.lm_head_weight.requires_grad
    assert all("lm_head" not in name for name in heads.state_dict())


def test_save_load_round_trip(tmp_path):
    heads = _heads(num_layers=2)
    _perturb(heads)
    heads.save(tmp_path / "m", {"note": "x"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["medusa.json", "medusa.safetensors"]
    assert read_metadata(tmp_path / "m")["metadata"] == {"note": "x"}
    back = MedusaHeads.load(tmp_path / "m", heads.lm_head_weight)
    assert back.config == heads.config
    hidden = torch.randn(1, 4, H)
    torch.testing.assert_close(back(hidden), heads(hidden), rtol=0, atol=0)


def test_load_errors_are_clear(tmp_path):
    heads = _heads()
    path = heads.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"hidden size 16 and vocabulary 50.*\[50, 12\]"):
        MedusaHeads.load(path, torch.zeros(V, 12))
    with pytest.raises(FileNotFoundError, match="no medusa.json"):
        MedusaHeads.load(tmp_path, heads.lm_head_weight)
    (path / "medusa.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read the head weights"):
        MedusaHeads.load(path, heads.lm_head_weight)
    _heads(num_layers=2).save(tmp_path / "two")
    (path / "medusa.safetensors").write_bytes((tmp_path / "two" / "medusa.safetensors").read_bytes())
    with pytest.raises(ValueError, match="weights do not match medusa.json"):
        MedusaHeads.load(path, heads.lm_head_weight)
    meta = json.loads((path / "medusa.json").read_text())
    (path / "medusa.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match="not a lincompile-medusa file"):
        MedusaHeads.load(path, heads.lm_head_weight)


def test_attach_sets_heads_without_registering_them(tmp_path):
    model = tiny_model("llama")
    weight = model.get_output_embeddings().weight
    MedusaHeads(MedusaConfig(num_heads=2, hidden_size=64, vocab_size=128), weight).save(tmp_path / "m")
    before = sorted(model.state_dict())
    heads = attach(model, tmp_path / "m")
    assert model.medusa is heads and sorted(model.state_dict()) == before
    assert heads.lm_head_weight.data_ptr() == weight.data_ptr()


def test_attach_to_a_linearized_model_uses_its_graph_lm_head(tmp_path):
    import lincompile

    model = tiny_model("llama")
    linear = lincompile.optimize(model, "augmented")
    MedusaHeads(MedusaConfig(num_heads=2, hidden_size=64, vocab_size=128),
                model.get_output_embeddings().weight).save(tmp_path / "m")
    heads = attach(linear, tmp_path / "m")
    assert linear.medusa is heads and not any(n.startswith("medusa") for n in linear.state_dict())
    assert heads.lm_head_weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


@pytest.mark.parametrize("name", sorted(TREES))
def test_named_trees_are_topological_and_prefix_closed(name):
    spec = tree_spec(name, 4)
    assert len(spec) == len(set(spec.paths))
    for i, (path, parent) in enumerate(zip(spec.paths, spec.parents)):
        assert (parent == -1) == (len(path) == 1)
        assert parent < i and (parent == -1 or spec.paths[parent] == path[:-1])
    assert spec.depth <= 4


def test_default_tree_is_mc_sim_63_and_chain_follows_top1():
    assert len(tree_spec("default", 4)) == 63 and tree_spec("default", 4).topk == (10, 10, 10, 2)
    assert 30 <= len(tree_spec("small", 4)) <= 64
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    tokens, parents = medusa_tree(logits, "chain")
    assert tokens.tolist() == logits.argmax(-1).tolist() and parents.tolist() == [-1, 0, 1]
    tokens, parents = medusa_tree(logits)  # named trees are cut to the heads available
    assert len(tokens) == len(tree_spec("default", 3)) and tokens.dtype == parents.dtype == torch.long


def test_tree_nodes_hold_the_ranked_choices():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    tokens, parents = medusa_tree(logits, [(1,), (0,), (0, 2), (1, 0), (0, 0)])
    ranked = logits.argsort(-1, descending=True)
    # sorted by (depth, path): (0,) (1,) (0,0) (0,2) (1,0)
    assert tokens.tolist() == [ranked[0, 0], ranked[0, 1], ranked[1, 0], ranked[1, 2], ranked[1, 0]]
    assert parents.tolist() == [-1, -1, 0, 0, 1]


@pytest.mark.parametrize("choices, message", [
    ([(0, 1)], "no parent path"), ([(0,), (0,)], "distinct"), ([()], "non-empty"), ([(0,), (-1,)], ">= 0"),
    ([(0,), (0, 0), (0, 0, 0)], "deeper than the 2 heads"), ("nope", "unknown tree")])
def test_bad_trees_are_refused(choices, message):
    with pytest.raises(ValueError, match=message):
        medusa_tree(torch.randn(2, V), choices)


def test_tree_wider_than_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocabulary has 5"):
        medusa_tree(torch.randn(4, 5))


def test_sample_chain_draws_each_head_from_its_distribution():
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    config = SamplingConfig(do_sample=True, temperature=0.7, top_k=4)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_chain(logits, config, gen)[0] for _ in range(1000)])
    tokens, q = sample_chain(logits, config, gen)
    assert tokens.shape == (3,) and q.shape == (3, 6) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(-1), torch.ones(3))
    for i in range(3):
        freq = torch.bincount(draws[:, i], minlength=6).float() / len(draws)
        assert (freq - q[i]).abs().max() < 0.07  # > 4 sigma at 1000 draws
        assert (freq[q[i] == 0] == 0).all()
    greedy, one_hot = sample_chain(logits, SamplingConfig())
    assert greedy.tolist() == logits.argmax(-1).tolist() and (one_hot.sum(-1) == 1).all()
