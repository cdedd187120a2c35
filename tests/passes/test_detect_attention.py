"""Detection finds every attention form, reads mask kinds right, and leaves other softmaxes alone."""
import pytest
import torch
import torch.nn.functional as F

import lincompile
from lincompile.api import UnrecognizedAttentionError
from lincompile.testing.tiny import FAMILIES, attn_implementations, expected_sites, tiny_model

CASES = [(f, impl) for f in FAMILIES for impl in attn_implementations(f)]
EXPECTED_KINDS = {
    "bert": {("padding", False, False)},
    "t5": {("custom", False, False), ("custom", True, False), ("padding", False, True)},
}


@pytest.mark.parametrize("family,impl", CASES)
def test_site_count_and_mask_kinds(family, impl):
    sites = lincompile.inspect(tiny_model(family, impl))
    assert len(sites) == expected_sites(family)
    kinds = {(s.mask_kind, s.causal, s.cross) for s in sites}
    assert kinds == EXPECTED_KINDS.get(family, {("causal+padding", True, False)})
    assert all(s.form == ("sdpa_op" if impl == "sdpa" else "eager_matmul_softmax") for s in sites)
    if family in ("llama", "qwen2", "mistral"):
        assert all(s.heads == 4 and s.kv_heads == 2 for s in sites)
    assert all(abs(s.scale - 1 / 16 ** 0.5) < 1e-6 for s in sites if family in ("llama", "gpt2", "bert"))


class RouterAndClassifier(torch.nn.Module):
    """One causal attention, an MoE-style router softmax and a classifier-head softmax."""

    def __init__(self, dim=16, heads=2, vocab=50):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.router = torch.nn.Linear(dim, 2)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2))
        self.head = torch.nn.Linear(dim, 5)
        self.heads = heads

    def forward(self, input_ids):
        x = self.embed(input_ids)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        gate = torch.softmax(self.router(a), dim=-1)
        x = sum(gate[..., i:i + 1] * e(a) for i, e in enumerate(self.experts))
        return torch.softmax(self.head(x), dim=-1)


def test_router_and_classifier_softmax_are_left_alone():
    model = RouterAndClassifier().eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 6))}
    sites = lincompile.inspect(model, inputs)
    assert len(sites) == 1 and sites[0].mask_kind == "causal"
    linear = lincompile.optimize(model, "softmax", inputs=inputs, strict=True)
    assert linear.report.unmatched == []
    notes = " ".join(n for p in linear.report.passes for n in p.notes)
    assert notes.count("left alone") == 2
    with torch.no_grad():
        assert torch.allclose(linear(inputs["input_ids"]).logits, model(**inputs), atol=1e-6)


class SoftCappedAttention(torch.nn.Module):
    """Attention with tanh soft-capping on the scores: a form no pattern knows."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(50, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        scores = torch.tanh(q @ k.transpose(-1, -2) / 30.0) * 30.0
        return torch.softmax(scores, dim=-1) @ v


def test_unrecognized_attention_is_reported_and_strict_raises():
    model = SoftCappedAttention().eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 6))}
    with pytest.warns(UserWarning, match="softmax"):
        linear = lincompile.optimize(model, "softmax", inputs=inputs)
    assert len(linear.report.unmatched) == 1
    assert "softmax" in linear.report.unmatched[0].node
    with pytest.raises(UnrecognizedAttentionError, match="score chain"):
        lincompile.optimize(model, "softmax", inputs=inputs, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_smollm2_has_30_causal_gqa_sites(impl):
    model, _ = lincompile.load_model("smollm2-135m", attn_implementation=impl)
    sites = lincompile.inspect(model)
    assert len(sites) == 30
    assert {(s.heads, s.kv_heads, s.head_dim, s.mask_kind) for s in sites} == {(9, 3, 64, "causal+padding")}
    assert [s.path for s in sites] == [f"model.layers.{i}.self_attn" for i in range(30)]
