"""Detection finds every attention form, reads mask kinds right, and leaves other softmaxes alone."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lincompile
from lincompile.api import UnrecognizedAttentionError
from lincompile.testing.tiny import (FAMILIES, attn_implementations, expected_sites, perturb_new_parameters,
                                     tiny_model)

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


class CubedScoresAttention(torch.nn.Module):
    """Attention over cubed scores: a form no pattern knows (softcapping, which this test once used, is known now)."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(50, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) ** 3
        return torch.softmax(scores, dim=-1) @ v


def test_unrecognized_attention_is_reported_and_strict_raises():
    model = CubedScoresAttention().eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 6))}
    with pytest.warns(lincompile.LincompileWarning, match="softmax") as caught:
        linear = lincompile.optimize(model, "softmax", inputs=inputs)
    assert caught[0].filename == __file__  # the caller's line, not lincompile's
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


def _windowed_mistral(impl: str, window: int) -> torch.nn.Module:
    import transformers as tf

    from lincompile.testing.tiny import make_config

    config = make_config("mistral")
    config.sliding_window = window
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tf.MistralForCausalLM._from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [4, 20])
def test_sliding_windows_are_found_and_kept_exact_or_dropped_aloud(impl, window):
    """A window shorter than the 16-token capture example is read from it (eager's once looked non-causal, and
    linear methods then read future tokens); a longer one from the long probe. Exact softmax keeps it by refusing
    longer sequences; a linear method drops it, says so, and stays causal."""
    hf = _windowed_mistral(impl, window)
    exact = lincompile.optimize(hf, "softmax")
    assert [(s.mask_kind, s.causal, s.window) for s in exact.sites] == [("causal+padding", True, window)] * 2
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exact(ids[:, :window]).logits, hf(ids[:, :window]).logits, rtol=1e-5, atol=1e-5)
    assert exact.max_positions == window
    with pytest.raises(ValueError, match=f"reaches token {window + 1}, past the model's {window} tokens, the "
                                         "sliding window of its exact softmax sites"):
        exact(ids[:, :window + 1])
    with pytest.raises(ValueError, match=f"passes the model's {window} tokens, the sliding window"):
        exact.generate(ids[:, :window], 2)
    linear = lincompile.optimize(hf, "augmented")
    assert linear.max_positions is None
    notes = [n for p in linear.report.passes for n in p.notes]
    assert f"site 0 (model.layers.0.self_attn): its sliding window of {window} keys is dropped by augmented, which " \
           "reads the whole past" in notes
    changed = ids.clone()
    changed[0, -1] = 3 if int(ids[0, -1]) != 3 else 4
    torch.testing.assert_close(linear(changed).logits[:, :-1], linear(ids).logits[:, :-1], rtol=0, atol=0)
    # attention transfer's teacher is the original attention, window included, at any block length
    from lincompile.train.attention_transfer import graph_inputs, softmax_graph

    teacher = softmax_graph(linear)(*graph_inputs(linear, ids))[0]
    torch.testing.assert_close(teacher, hf(ids).logits, rtol=1e-5, atol=1e-5)
    # a whole-sequence graph without state (the torch.compile backend's) keeps the window as a bias
    torch._dynamo.reset()
    compiled = torch.compile(hf, backend="lincompile", options={"method": "softmax", "compiler": "eager"})
    torch.testing.assert_close(compiled(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_bloom_merged_heads_and_alibi_are_found():
    """Bloom merges the heads into the batch (3-D `baddbmm` scores with ALiBi, `bmm` with V): normalize writes it
    in 4-D, so its sites are found, exact under softmax on a padded batch, and linear methods keep the padding."""
    from lincompile.testing.families import family_model

    hf = family_model("bloom", "eager")
    exact = lincompile.optimize(hf, "softmax", strict=True)
    assert [(s.mask_kind, s.causal, s.key_mask_input) for s in exact.sites] == [("custom", True, "attention_mask")] * 2
    assert [s.path for s in exact.sites] == ["transformer.h.0.self_attention", "transformer.h.1.self_attention"]
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ours, theirs = exact(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1, 3:], theirs[1, 3:], rtol=1e-5, atol=1e-5)
    augmented = perturb_new_parameters(lincompile.optimize(hf, "augmented"), 0.1)
    torch.testing.assert_close(augmented(ids, attention_mask=mask).logits[1, 3:], augmented(ids[1:, 3:]).logits[0],
                               rtol=1e-5, atol=1e-5)


def test_xglm_merged_heads_clamped_scores_and_sinusoidal_table():
    """XGLM merges heads for `bmm` scores and its softmax, clamps the masked scores at float32's minimum, and
    regrows its sinusoidal position table past its length in eager: its sites are found and exact, and the
    linearized model takes the table's length (the captured graph holds those rows) and says why past it."""
    from lincompile.testing.families import family_model

    hf = family_model("xglm", "eager")
    exact = lincompile.optimize(hf, "softmax", strict=True)
    assert [(s.mask_kind, s.path) for s in exact.sites] == [
        ("causal+padding", "model.layers.0.self_attn"), ("causal+padding", "model.layers.1.self_attn")]
    assert exact.max_positions == 128
    ids = torch.randint(3, 128, (1, 128), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exact(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reaches token 129, past the model's 128 positions of its precomputed "
                                         "sinusoidal table"):
        exact(torch.cat([ids, ids[:, :1]], 1))


def test_gpt_neo_captures_within_its_positions_and_its_local_layers_are_windows():
    """GPT-Neo builds its mask from a table as long as its positions: capture caps the sequence there (export
    refused the open range), and the long probe, capped too, cannot read past it."""
    import transformers as tf

    config = tf.GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128,
                             attention_types=[[["global", "local"], 1]], window_size=8, embed_dropout=0.0,
                             attention_dropout=0.0, resid_dropout=0.0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = tf.GPTNeoForCausalLM(config).eval()
    linear = lincompile.optimize(hf, "softmax", strict=True)
    assert [s.window for s in linear.sites] == [None, 8] and linear.max_positions == 8
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(linear(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert lincompile.optimize(hf, "augmented").max_positions == 128


def test_a_declared_window_beyond_the_probe_is_warned_about():
    """Qwen2 may slide over 8192 keys: longer than the probe, so exact softmax sites would attend past it."""
    import transformers as tf

    from lincompile.testing.tiny import make_config

    config = make_config("qwen2")
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 8192, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    hf = tf.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    with pytest.warns(UserWarning, match="declares sliding_window=8192, longer than lincompile's mask probe"):
        lincompile.optimize(hf, "softmax")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lincompile.optimize(hf, "augmented")  # linear methods drop windows anyway: nothing to warn about


def test_a_bidirectional_local_window_is_kept_exact():
    """ModernBERT's local layers see 20 keys around each query: neither padding nor full, so custom (once read as
    plain padding, the exact rewrite differed past the window); its global layer stays `padding`."""
    import transformers as tf

    config = tf.ModernBertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=256, local_attention=20,
                                 global_attn_every_n_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 cls_token_id=1, sep_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = tf.ModernBertModel._from_config(config, attn_implementation="sdpa").eval()
    linear = lincompile.optimize(hf, "softmax", strict=True)
    assert [(s.mask_kind, s.causal) for s in linear.sites] == [("padding", False)] + [("custom", False)] * 2
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    ours, theirs = linear(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1, :-5], theirs[1, :-5], rtol=1e-5, atol=1e-5)


def test_gemma2_logit_softcapping_is_found_and_kept_by_exact_softmax():
    """Gemma 2 caps its scores as c * tanh(s / c): the site records c, exact softmax applies it (here c = 0.5, which
    moves the tiny model's logits by about 1), a linear method drops it and says so."""
    from lincompile.testing.families import family_model

    hf = family_model("gemma2", "eager")
    exact = lincompile.optimize(hf, "softmax", strict=True)
    assert [s.softcap for s in exact.sites] == [0.5, 0.5]
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    theirs = hf(ids).logits
    torch.testing.assert_close(exact(ids).logits, theirs, rtol=1e-5, atol=1e-5)
    state = exact(ids[:, :8]).past_state
    torch.testing.assert_close(exact(ids[:, 8:9], past_state=state).logits[:, -1], hf(ids[:, :9]).logits[:, -1],
                               rtol=1e-5, atol=1e-5)
    for layer in hf.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (hf(ids).logits - theirs).abs().max() > 0.1  # the cap matters: the comparison above can fail
    notes = [n for p in lincompile.optimize(family_model("gemma2", "eager"), "augmented").report.passes
             for n in p.notes]
    assert "site 0 (model.layers.0.self_attn): its logit softcap (0.5) has no linear form and is dropped by " \
           "augmented" in notes


class _Capped(torch.nn.Module):
    """One causal attention whose scores are softcapped in one of several ways (`variant`)."""

    def __init__(self, variant: str):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)  # example_inputs draws ids below 100 without a config
        self.qkv = torch.nn.Linear(16, 48)
        self.variant = variant

    def forward(self, input_ids, attention_mask):
        q, k, v = self.qkv(self.embed(input_ids)).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        t = input_ids.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = (q @ k.transpose(-1, -2)) * 0.125
        if self.variant == "negative":  # -c tanh(s / -c) is c tanh(s / c)
            scores = torch.tanh(scores / -0.5) * -0.5
        elif self.variant == "mask_inside":  # a key masked under the cap still scores -c: not expressible
            scores = torch.tanh(scores.masked_fill(future, torch.finfo(scores.dtype).min) / 0.5) * 0.5
        elif self.variant == "capped_bias":  # the cap is on a bias beside the scores, not on them
            bias = torch.arange(t, device=q.device, dtype=scores.dtype)[None, :] * 0.1
            scores = torch.tanh(bias / 0.5) * 0.5 + scores
        if self.variant != "mask_inside":
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("variant,expected", [("negative", [0.5]), ("mask_inside", []), ("capped_bias", [0.0])])
def test_softcap_is_read_only_where_the_op_can_express_it(variant, expected):
    """A negative cap is its absolute value; a mask under the cap leaves the site unmatched (the op masks after the
    cap); a capped bias beside the scores is no softcap of the scores (a failed walk leaves no cap behind)."""
    model = _Capped(variant)
    sites = lincompile.inspect(model)
    assert [s.softcap for s in sites] == expected
    if sites:
        linear = lincompile.optimize(model, "softmax", strict=True)
        ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        torch.testing.assert_close(linear(ids, attention_mask=mask).logits, model(ids, mask), rtol=1e-5, atol=1e-5)


def test_softcap_and_window_travel_with_the_onnx_export(tmp_path):
    """The export records each site's window and softcap; a speculative commit on the ONNX runner rebuilds each
    exact site's spec with its own cap ("methods" is keyed by name)."""
    from lincompile.backends.ort import OrtModel
    from lincompile.runtime.verify import commit_sites
    from lincompile.testing.families import family_model

    linear = lincompile.optimize(family_model("gemma2", "eager"), "softmax")
    ort = OrtModel.from_dir(linear.export_onnx(str(tmp_path / "gemma2")), providers=["CPUExecutionProvider"])
    assert [(s["window"], s["softcap"]) for s in ort.meta["sites"]] == [(4096, 0.5), (None, 0.5)]
    assert [site.spec.softcap for site in commit_sites(ort)] == [0.5, 0.5]
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ort(ids).logits, linear(ids).logits, rtol=1e-4, atol=1e-4)


class _Chunked(torch.nn.Module):
    """Causal attention within chunks of 24 tokens (Llama 4's chunked layers): plain causal on the 16-token
    example, neither causal nor a window at length."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)  # example_inputs draws ids below 100 without a config
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, input_ids, attention_mask):
        q, k, v = self.qkv(self.embed(input_ids)).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        i = torch.arange(input_ids.shape[1], device=q.device)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] // 24 == i[:, None] // 24)
        scores = ((q @ k.transpose(-1, -2)) * 0.125).masked_fill(~allowed, torch.finfo(q.dtype).min)
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_chunked_attention_found_at_length_is_custom_and_exact():
    model = _Chunked()
    linear = lincompile.optimize(model, "softmax", strict=True)
    assert [(s.mask_kind, s.causal, s.window) for s in linear.sites] == [("custom", True, None)]
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(linear(ids, attention_mask=mask).logits, model(ids, mask), rtol=1e-5, atol=1e-5)


class _Sinks(torch.nn.Module):
    """GPT-OSS's eager attention (sinks joined, max-shifted, the sink column dropped), causal, 2 heads; `variant`
    spells it another way."""

    def __init__(self, variant: str = "max"):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)  # example_inputs draws ids below 100 without a config
        self.qkv = torch.nn.Linear(16, 48)
        self.sinks = torch.nn.Parameter(3 * torch.randn(1 if variant == "one sink" else 2))
        self.variant = variant

    def forward(self, input_ids, attention_mask):
        q, k, v = self.qkv(self.embed(input_ids)).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        i = torch.arange(input_ids.shape[1], device=q.device)
        allowed = (i[None, :] <= i[:, None]) & attention_mask.bool()[:, None, None, :]
        scores = ((q @ k.transpose(-1, -2)) * 0.125).masked_fill(~allowed, torch.finfo(q.dtype).min)
        combined = torch.cat([scores, self.sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
        if self.variant == "amax":
            combined = combined - combined.amax(-1, keepdim=True)
        elif self.variant != "cast":
            combined = combined - combined.max(-1, keepdim=True).values
        probs = torch.softmax(combined.double(), -1).float() if self.variant == "cast" else combined.softmax(-1)
        if self.variant == "first column dropped":
            return (probs[..., 1:] @ v).transpose(1, 2).flatten(2)
        keep = probs[..., :scores.shape[-1]] if self.variant == "static end" else probs[..., :-1]
        return (keep @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("variant", ["amax", "cast", "static end"])
def test_attention_sinks_in_other_spellings_are_exact(variant):
    torch.manual_seed(0)
    model = _Sinks(variant)
    linear = lincompile.optimize(model, "softmax", strict=True)
    assert [s.sinks for s in linear.sites] == ["sinks"]
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(linear(ids, attention_mask=mask).logits, model(ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,reason", [
    ("first column dropped", "sink column is not dropped"),
    ("one sink", r"attention sinks sinks of shape \(1,\), not one logit per head \(2,\)")])
def test_attention_sinks_the_op_cannot_express_are_reported(variant, reason):
    """A sink column the softmax keeps, or one sink shared by the heads, is no site: reported (strict refuses),
    and the model runs unchanged."""
    model = _Sinks(variant)
    with pytest.raises(UnrecognizedAttentionError, match=reason):
        lincompile.optimize(model, "softmax", strict=True)
    with pytest.warns(UserWarning):
        linear = lincompile.optimize(model, "softmax")
    assert linear.sites == []


def test_attention_sinks_travel_with_the_onnx_export(tmp_path):
    """The export records each site's sinks; the ONNX runner computes them, and its speculative commit rebuilds
    each exact site's spec with them ("methods" is keyed by name)."""
    from lincompile.backends.ort import OrtModel
    from lincompile.runtime.verify import commit_sites

    torch.manual_seed(0)
    model = _Sinks()
    linear = lincompile.optimize(model, "softmax", strict=True)
    assert [s.sinks for s in linear.sites] == ["sinks"]
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(linear(ids, attention_mask=mask).logits, model(ids, mask), rtol=1e-5, atol=1e-5)
    ort = OrtModel.from_dir(linear.export_onnx(str(tmp_path / "sinks")), providers=["CPUExecutionProvider"])
    assert [s["sinks"] for s in ort.meta["sites"]] == ["sinks"]
    assert [site.spec.sinks for site in commit_sites(ort)] == [True]
    torch.testing.assert_close(ort(ids).logits, model(ids, mask), rtol=1e-4, atol=1e-4)


def test_gpt_oss_attention_sinks_are_kept_by_exact_softmax_and_dropped_with_a_note():
    """GPT-OSS joins each head's learned sink logit to the softmax denominator (and drops its column after). The
    site records the parameter; exact softmax shares and applies it in prefill and decode (random sinks move the
    logits by far more than the bound, so the comparisons can fail); a linear method drops them and says so."""
    from lincompile.testing.families import family_model

    hf = family_model("gpt_oss", "eager")
    exact = lincompile.optimize(hf, "softmax", strict=True)
    assert [s.sinks for s in exact.sites] == ["model.layers.0.self_attn.sinks", "model.layers.1.self_attn.sinks"]
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = hf(ids).logits
        for layer in hf.model.layers:  # shared with the linearized graph
            layer.self_attn.sinks.copy_(3 * torch.randn(layer.self_attn.sinks.shape))
        theirs = hf(ids).logits
        assert (theirs - before).abs().max() > 0.1
        torch.testing.assert_close(exact(ids).logits, theirs, rtol=1e-5, atol=1e-5)
        state = exact(ids[:, :8]).past_state
        torch.testing.assert_close(exact(ids[:, 8:9], past_state=state).logits[:, -1], hf(ids[:, :9]).logits[:, -1],
                                   rtol=1e-5, atol=1e-5)
    linear = lincompile.optimize(hf, "augmented")
    notes = [n for p in linear.report.passes for n in p.notes]
    assert "site 1 (model.layers.1.self_attn): its attention sinks (model.layers.1.self_attn.sinks) have no linear " \
           "form and are dropped by augmented" in notes
    # attention transfer's teacher is the original attention, sinks included
    from lincompile.train.attention_transfer import graph_inputs, softmax_graph

    with torch.no_grad():
        teacher = softmax_graph(linear)(*graph_inputs(linear, ids))[0]
    torch.testing.assert_close(teacher, theirs, rtol=1e-5, atol=1e-5)
