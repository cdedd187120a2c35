"""LoRA as a graph rewrite: exact at creation, and merge_lora folds it back without changing the function."""
from __future__ import annotations

import pytest
import torch

import lincompile
from lincompile.testing.tiny import tiny_model
from lincompile.train.lora import LORA_MODULE, apply_lora, lora_parameters, merge_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _perturb(params: dict[str, torch.nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _check_roundtrip(linear, targets: tuple[str, ...], expected: list[str]) -> None:
    ids = _ids()
    keys = sorted(linear.graph.state_dict())
    shared = {n: (p, p.detach().clone()) for n, p in linear.graph.named_parameters()}  # also the original's
    with torch.no_grad():
        base = linear(ids).logits
        params = apply_lora(linear.graph, targets, rank=4, alpha=8.0, seed=0)
        assert sorted({n.rsplit(".", 1)[0] for n in params}) == sorted(f"{LORA_MODULE}.{e}" for e in expected)
        assert torch.equal(linear(ids).logits, base), "LoRA must start exact (B = 0)"
        _perturb(params)
        adapted = linear(ids).logits
        assert (adapted - base).abs().max() > 1e-3
        assert merge_lora(linear.graph) == len(expected)
        torch.testing.assert_close(linear(ids).logits, adapted, atol=2e-5, rtol=2e-5)
    assert sorted(linear.graph.state_dict()) == keys and not hasattr(linear.graph, LORA_MODULE)
    assert lora_parameters(linear.graph) == {}
    assert all(torch.equal(p, before) for p, before in shared.values()), "merging changed the original's weights"


def test_llama_lora_is_exact_then_merges(linearize):
    expected = [f"model_layers_{i}_self_attn_{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    _check_roundtrip(linearize("augmented"), ("q_proj", "k_proj", "v_proj", "o_proj"), expected)


def test_gpt2_conv1d_lora_targets_attention_only(one_thread):
    linear = lincompile.optimize(tiny_model("gpt2", seed=0), "linear-elu")
    expected = [f"transformer_h_{i}_attn_{p}" for i in (0, 1) for p in ("c_attn", "c_proj")]
    _check_roundtrip(linear, ("c_attn", "attn.c_proj"), expected)


def test_lora_errors(linearize):
    linear = linearize("augmented")
    with pytest.raises(ValueError, match="named .*down_proj.*q_proj"):
        apply_lora(linear.graph, ("c_attn",))
    apply_lora(linear.graph)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(linear.graph)
