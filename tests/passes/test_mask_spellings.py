"""Masks as models spell them: custom patterns that never look ahead, a boolean mask beside ALiBi, scores
multiplied by a 0/1 mask, filled or added large negative values (-1e4, -1e9, the dtype's minimum, in bf16 too),
`add(..., alpha=)`: read as masks where they are, reported where they are not."""
import pytest
import torch

import lincompile
from lincompile.api import UnrecognizedAttentionError
from lincompile.testing.tiny import perturb_new_parameters


def test_custom_masks_that_never_look_ahead_are_causal():
    """A mask no pattern knows (here: every other past key) is custom; it is causal when no query sees a later key,
    so linear methods keep the model causal."""

    class EveryOther(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 16)  # example_inputs draws ids below 100 without a config
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids)
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            t = input_ids.shape[1]
            i = torch.arange(t, device=x.device)
            allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :]) % 2 == 0)
            scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)

    sites = lincompile.inspect(EveryOther())
    assert [(s.mask_kind, s.causal, s.window) for s in sites] == [("custom", True, None)]


def test_a_boolean_mask_beside_alibi_is_exact_under_softmax_and_decodes_linearized():
    """MPT adds ALiBi and masks with a boolean term: once refused, now one additive bias (clamped: a fully padded
    query row stays finite, so no NaN reaches the real rows). A linear method drops the bias: its sites keep a
    state, and a padded batch prefills and decodes as its rows alone."""
    import transformers as tf

    config = tf.MptConfig(vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                          attn_config={"alibi": True})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = tf.MptForCausalLM(config).eval()
    linear = lincompile.optimize(hf, "softmax", strict=True)
    assert [(s.mask_kind, s.causal) for s in linear.sites] == [("custom", True)] * 2
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ours, theirs = linear(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1, 3:], theirs[1, 3:], rtol=1e-5, atol=1e-5)
    assert not linear.supports_state  # exact softmax keeps the bias, which a state cannot continue
    # a linear method drops ALiBi, so its causal sites decode through the state (with the padding kept)
    augmented = perturb_new_parameters(lincompile.optimize(hf, "augmented"), 0.1)
    assert augmented.supports_state
    full = augmented(ids, attention_mask=mask).logits
    alone = augmented(ids[1:, 3:]).logits
    torch.testing.assert_close(full[1, 3:], alone[0], rtol=1e-5, atol=1e-5)
    out = augmented(ids[:, :8], attention_mask=mask[:, :8])
    steps = [out.logits]
    for i in range(8, 12):
        out = augmented(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_state=out.past_state)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1)[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1)[1, 3:], full[1, 3:], rtol=1e-5, atol=1e-5)


class _Multiplied(torch.nn.Module):
    """OpenAI GPT's attention: K split into heads and transposed by one permute, the scores multiplied by a causal
    0/1 buffer (as long as its position table) plus c * (1 - buffer), then a padding bias; `variant` changes the
    buffer or c."""

    def __init__(self, variant: str = "causal"):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)  # example_inputs draws ids below 100 without a config
        self.positions_embed = torch.nn.Embedding(64, 16)  # unused: it bounds the sequence as OpenAI GPT's does
        self.qkv = torch.nn.Linear(16, 48)
        keep = torch.ones(64, 64).tril()
        if variant == "weighting":
            keep = keep * 0.5
        self.register_buffer("keep", keep[None, None], persistent=False)
        self.low = -1.0 if variant == "small constant" else -1e4

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        q, k, v = self.qkv(self.embed(input_ids)).chunk(3, -1)
        q, v = (x.view(b, t, 2, 8).permute(0, 2, 1, 3) for x in (q, v))
        scores = q @ k.view(b, t, 2, 8).permute(0, 2, 3, 1) / 8 ** 0.5
        keep = self.keep[:, :, :t, :t]
        scores = scores * keep + self.low * (1 - keep)
        scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_scores_multiplied_by_a_causal_mask_are_exact_and_decode():
    """OpenAI GPT's spelling is causal+padding: exact under softmax on a padded batch, and `augmented` keeps the
    padding (the OpenAI GPT row of test_families checks its decoding)."""
    model = _Multiplied()
    exact = lincompile.optimize(model, "softmax", strict=True)
    assert [(s.mask_kind, s.causal, s.key_mask_input) for s in exact.sites] == [
        ("causal+padding", True, "attention_mask")]
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    torch.testing.assert_close(exact(ids, attention_mask=mask).logits[mask.bool()], model(ids, mask)[mask.bool()],
                               rtol=1e-5, atol=1e-5)
    linear = perturb_new_parameters(lincompile.optimize(model, "augmented", strict=True), 0.1)
    torch.testing.assert_close(linear(ids, attention_mask=mask).logits[1, 2:], linear(ids[1:, 2:]).logits[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,reason", [("weighting", "holds values other than 0 and 1"),
                                            ("small constant", "score chain")])
def test_multiplied_scores_that_are_no_mask_are_reported(variant, reason):
    """Scores weighted by 0.5 are not masked, and c = -1 does not drop a key: neither is a site."""
    with pytest.raises(UnrecognizedAttentionError, match=reason):
        lincompile.optimize(_Multiplied(variant), "softmax", strict=True)


class _Filled(torch.nn.Module):
    """Scores where a causal mask holds replaced by `fill` (masked_fill or where): -1e9 masks, 0 does not."""

    def __init__(self, spelling: str, fill: float):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.spelling, self.fill = spelling, fill

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        q, k, v = (x.view(b, t, 2, 8).transpose(1, 2) for x in self.qkv(self.embed(input_ids)).chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        future = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
        if self.spelling == "masked_fill":
            scores = scores.masked_fill(future, self.fill)
        else:
            scores = torch.where(~future, scores, self.fill)
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("spelling", ["masked_fill", "where"])
def test_scores_filled_with_a_value_that_keeps_weight_are_no_mask(spelling):
    assert [s.causal for s in lincompile.optimize(_Filled(spelling, -1e9), "softmax", strict=True).sites] == [True]
    with pytest.raises(UnrecognizedAttentionError):
        lincompile.optimize(_Filled(spelling, 0.0), "softmax", strict=True)


class _Added(torch.nn.Module):
    """Scores plus an additive mask of `value` at future keys (and, with `padding`, BERT's `(1 - mask) * value` at
    padding keys), spelled `add(scores, mask, alpha=alpha)` (or with the two swapped: the scores scaled by alpha)."""

    def __init__(self, value: float, padding: bool = False, alpha: float = 1.0, swapped: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.value, self.padding, self.alpha, self.swapped = value, padding, alpha, swapped

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        q, k, v = (x.view(b, t, 2, 8).transpose(1, 2) for x in self.qkv(self.embed(input_ids)).chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        future = torch.ones(t, t, device=scores.device, dtype=scores.dtype).triu(1)
        mask = future[None, None] + (1 - attention_mask[:, None, None, :].to(scores.dtype)) if self.padding else future
        mask = mask * self.value / self.alpha
        pair = (mask, scores) if self.swapped else (scores, mask)
        scores = torch.add(*pair, alpha=self.alpha)
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("value,dtype", [(-1e4, torch.float32), (-1e9, torch.float32), (-1e4, torch.bfloat16)])
def test_additive_masks_of_large_finite_values_are_masks(value, dtype):
    """-1e4 and -1e9 weigh a key exactly 0 as the dtype's minimum does: a causal or padding mask, not a bias (a
    bias would leave linear methods bidirectional and blind to padding); bf16 holds -1e4 as -9984."""
    sites = lincompile.optimize(_Added(value).to(dtype), "softmax", strict=True).sites
    assert [(s.mask_kind, s.causal) for s in sites] == [("causal", True)]
    sites = lincompile.optimize(_Added(value, padding=True).to(dtype), "softmax", strict=True).sites
    assert [(s.mask_kind, s.causal, s.key_mask_input) for s in sites] == [("causal+padding", True, "attention_mask")]
    assert [s.mask_kind for s in lincompile.optimize(_Added(-100.0), "softmax").sites] == ["custom"]


@pytest.mark.parametrize("swapped", [False, True])
def test_add_with_alpha_scales_the_right_term(swapped):
    """`add(a, b, alpha=c)` is a + c b: exact softmax stays exact whichever term holds the scores."""
    torch.manual_seed(0)
    model = _Added(-0.7, alpha=3.0, swapped=swapped).eval()  # a bias of -0.7 per future key: kept by softmax
    linear = lincompile.optimize(model, "softmax", strict=True)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(linear(input_ids=ids, attention_mask=mask).logits,
                                   model(ids, mask), rtol=1e-5, atol=1e-5)
