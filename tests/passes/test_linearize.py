"""Rewriting: exact with the softmax method, stateful decoding, hybrids, fuel."""
import pytest
import torch

import lincompile
from lincompile.testing.decoding import prefill_then_steps
from lincompile.testing.tiny import FAMILIES, attn_implementations, example_inputs, tiny_model

CASES = [(f, impl) for f in FAMILIES for impl in attn_implementations(f)]


def _reference_and_graph(model, linear, seed=1):
    inputs = lincompile.example_inputs(model, batch=3, seq=12, seed=seed)
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        out = model(**inputs)
        ref = out.logits if hasattr(out, "logits") else out.last_hidden_state
        values = {**tensors, **linear.initial_state(3).tensors}
        got = linear.graph(*[values[n] for n in linear.input_names])[0]
    keep = tensors["attention_mask"].bool() if ref.shape[1] == tensors["attention_mask"].shape[1] else None
    return ref, got, keep


@pytest.mark.parametrize("family,impl", CASES)
def test_softmax_rewrite_is_exact(family, impl):
    model = tiny_model(family, impl)
    linear = lincompile.optimize(model, "softmax", strict=True)
    assert len(linear.rewritten) == len(linear.sites) > 0
    ops = [n for n in linear.graph.graph.nodes if n.target is torch.ops.lincompile.attention.default]
    assert len(ops) == len(linear.sites)
    leftover = [n for n in linear.graph.graph.nodes if "softmax" in str(n.target) or "scaled_dot" in str(n.target)]
    assert leftover == []  # the original attention cores are gone, not computed and thrown away
    ref, got, keep = _reference_and_graph(model, linear)
    diff = (ref - got).abs()
    assert (diff[keep] if keep is not None else diff).max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_linear_rewrite_changes_outputs_but_stays_causal(family):
    model = tiny_model(family)
    linear = lincompile.optimize(model, "linear-elu")
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert not torch.allclose(linear(ids).logits, model(ids).logits, atol=1e-3)
        changed = ids.clone()
        changed[:, 6:] = torch.randint(3, 128, (2, 4))
        a, b = linear(ids).logits, linear(changed).logits
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("method,layers", [("linear-elu", None), ("softmax", None), ("linear-elu", [1])])
def test_prefill_then_steps_equals_full_forward(method, layers):
    model = tiny_model("llama").double()
    linear = lincompile.optimize(model, method, layers=layers)
    diff, _, state = prefill_then_steps(linear, torch.randint(3, 128, (2, 11)), 7)
    assert state.length == 11
    assert diff <= 1e-10


def test_hybrid_keeps_unselected_sites_exact_softmax():
    model = tiny_model("llama")
    linear = lincompile.optimize(model, "linear-elu", layers=[0])
    assert [r.method for r in linear.rewritten] == ["linear-elu", "softmax"]
    with pytest.raises(ValueError, match="not attention sites"):
        lincompile.optimize(model, "linear-elu", layers=[5])


def test_linear_state_does_not_grow_with_context():
    linear = lincompile.optimize(tiny_model("llama"), "linear-elu")
    with torch.no_grad():
        short = linear(torch.randint(3, 128, (1, 4))).past_state
        long = linear(torch.randint(3, 128, (1, 64))).past_state
    assert short.shapes() == long.shapes() and short.nbytes() == long.nbytes()


@pytest.mark.parametrize("tokens", [3, 70])
def test_draft_outputs_hold_the_last_tokens_and_free_keys_early(tokens):
    """`draft.{i}.keys|values` are the op's k and v for the call's last VERIFY_WINDOW tokens, right-aligned (a short
    call's first token fills the rest); one index serves every site, and each site's k and v are gathered right
    after its op, so a long prefill does not keep every layer's keys and values to the graph's end."""
    from lincompile.passes.linearize import VERIFY_WINDOW

    linear = lincompile.optimize(tiny_model("llama"), "linear-elu")
    nodes = list(linear.graph.graph.nodes)
    assert sum(n.target is torch.ops.aten.cumsum.default for n in nodes) == 1
    calls = [n for n in nodes if n.target is torch.ops.lincompile.attention.default]
    for call, following in zip(calls, calls[1:]):
        assert all(nodes.index(u) < nodes.index(following) for u in (*call.args[1].users, *call.args[2].users))
    seen = []  # each site's k and v, in call order (= site order)
    op = torch.ops.lincompile.attention.default

    def spy(q, k, v, *rest):
        seen.append((k, v))
        return op(q, k, v, *rest)

    for call in calls:
        call.target = spy
    linear.graph.recompile()
    ids = torch.randint(3, 128, (2, tokens))
    with torch.no_grad():
        out = linear(ids)
    index = torch.arange(tokens - VERIFY_WINDOW, tokens).clamp_min(0)
    assert len(seen) == len(calls)
    for i, (k, v) in enumerate(seen):
        assert torch.equal(out.extras[f"draft.{i}.keys"], k[:, :, index])
        assert torch.equal(out.extras[f"draft.{i}.values"], v[:, :, index])


def test_fuel_limits_rewrites_and_disables_state():
    model = tiny_model("llama")
    linear = lincompile.optimize(model, "linear-elu", config=lincompile.LinearizeConfig("linear-elu", fuel=1))
    assert len(linear.rewritten) == 1 and not linear.supports_state
    with pytest.raises(ValueError, match="without a recurrent state"):
        linear(torch.randint(3, 128, (1, 4)), past_state=linear.initial_state(1))


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    linear = lincompile.optimize(model, "linear-elu", layers=[0])
    path = linear.save_pretrained(str(tmp_path / "saved"))
    loaded = lincompile.load(path)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, linear(ids).logits)
    assert loaded.config == linear.config
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="not a saved lincompile model"):
        lincompile.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing is not an existing directory"):
        lincompile.load(tmp_path / "missing")


@pytest.mark.parametrize("family", ["bert", "t5"])
@pytest.mark.parametrize("method", ["linear-elu", "augmented-hedgehog"])
def test_encoders_and_cross_attention_convert_to_linear_methods(family, method):
    model = tiny_model(family)
    linear = lincompile.optimize(model, method)
    assert [r.method for r in linear.rewritten] == [method] * len(linear.sites)
    ref, got, _ = _reference_and_graph(model, linear)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    if method == "linear-elu":  # (Hedgehog starts close to softmax by design)
        assert not torch.allclose(got, ref, atol=1e-3)


def test_method_parameters_are_trainable_and_saved(tmp_path):
    linear = lincompile.optimize(tiny_model("llama"), "augmented")
    names = {n for n, _ in linear.named_parameters() if "lincompile_params" in n}
    assert names == {f"graph.lincompile_params.site_{i}.{p}" for i in (0, 1) for p in ("alpha", "conv_weight")}
    with torch.no_grad():
        for name, p in linear.named_parameters():
            if "lincompile_params" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    loaded = lincompile.load(linear.save_pretrained(str(tmp_path / "aug")))
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, linear(ids).logits)


def test_cross_attention_is_found_when_both_lengths_are_equal():
    """Queries computed from tokens the keys are not (T5's decoder over its encoder) are cross-attention even when
    the example's two lengths are equal; its decoder then keeps no state and takes other lengths."""
    model = tiny_model("t5")
    inputs = example_inputs("t5", seq=8)
    inputs["decoder_input_ids"] = inputs["input_ids"].clone()
    inputs["decoder_attention_mask"] = torch.ones_like(inputs["input_ids"])
    linear = lincompile.optimize(model, "linear-elu", inputs=inputs)
    assert [s.cross for s in linear.sites] == [False, False, False, True, False, True]
    assert not any(r.state_inputs for r in linear.rewritten)
    ids, dec = torch.randint(3, 128, (1, 8)), torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        assert linear(ids, decoder_input_ids=dec, decoder_attention_mask=torch.ones_like(dec)).logits.shape[1] == 5


def test_a_method_reading_later_tokens_warns_and_keeps_no_state():
    """The centered conv (the leakage ablation) sees later tokens on a causal site: optimize says so, and the site
    keeps no state, so the model runs whole sequences only (a state would give other numbers than the parallel
    form)."""
    with pytest.warns(UserWarning, match=r"2 causal sites run a method that reads later tokens.*\n"
                                         r".*site 0 .* is causal, but augmented-centered reads later tokens"):
        linear = lincompile.optimize(tiny_model("llama"), "augmented-centered")
    assert not linear.supports_state and not any(r.state_inputs for r in linear.rewritten)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_encoders_save_and_load_as_their_own_class(family, tmp_path):
    linear = lincompile.optimize(tiny_model(family), "linear-elu")
    loaded = lincompile.load(linear.save_pretrained(str(tmp_path / family)))
    ids = torch.randint(3, 128, (1, 6))
    extra = {"decoder_input_ids": ids[:, :3], "decoder_attention_mask": torch.ones(1, 3, dtype=torch.long)} \
        if family == "t5" else {}
    with torch.no_grad():
        assert torch.equal(loaded(ids, **extra).logits, linear(ids, **extra).logits)
        if family == "t5":  # the decoder's mask is optional, as in Hugging Face: all real
            assert torch.equal(linear(ids, decoder_input_ids=ids[:, :3]).logits, linear(ids, **extra).logits)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_models_without_a_recurrent_state_refuse_past_state_and_generate(family):
    linear = lincompile.optimize(tiny_model(family), "linear-elu")
    assert not linear.supports_state
    ids = torch.randint(3, 128, (1, 6))
    with pytest.raises(ValueError, match="without a recurrent state"):
        linear(ids, past_state=linear.initial_state(1))
    with pytest.raises(ValueError, match="generate needs a causal language model"):
        linear.generate(ids, 2)


def test_a_bf16_model_loaded_by_hugging_face_reloads_exactly(tmp_path):
    """`from_pretrained(dtype=bfloat16)` keeps the rotary table's inverse frequencies in float32 (a buffer not in
    the saved weights); load builds the model as Hugging Face does, not cast after (it differed by 5e-3)."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "hf")
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    linear = lincompile.optimize(source, "augmented")
    loaded = lincompile.load(linear.save_pretrained(str(tmp_path / "saved")))
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, linear(ids).logits)


def test_modules_kept_in_another_dtype_load_in_it(tmp_path):
    """Hugging Face keeps T5's `wo` in float32 in a float16 model (`_keep_in_fp32_modules`): load keeps it too."""
    source = tiny_model("t5").half()
    for name, module in source.named_modules():
        if name.endswith(".wo"):
            module.float()
    linear = lincompile.optimize(source, "linear-elu")
    loaded = lincompile.load(linear.save_pretrained(str(tmp_path / "t5")))
    assert {n: p.dtype for n, p in loaded.graph.named_parameters()} == {
        n: p.dtype for n, p in linear.graph.named_parameters()}
    assert torch.float32 in {p.dtype for p in loaded.parameters()}
    ids = torch.randint(3, 128, (1, 6))
    extra = {"decoder_input_ids": ids[:, :3], "decoder_attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(ids, **extra).logits, linear(ids, **extra).logits)


def test_bf16_model_saves_and_loads_in_bf16_or_in_the_dtype_asked_for(tmp_path):
    linear = lincompile.optimize(tiny_model("llama").to(torch.bfloat16), "augmented")
    loaded = lincompile.load(linear.save_pretrained(str(tmp_path / "bf16")))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, linear(ids).logits)
    with pytest.raises(ValueError, match=r"cast to torch.float32 since.*lincompile.load\(dir, dtype=...\)"):
        loaded.float()(ids)
    widened = lincompile.load(tmp_path / "bf16", dtype=torch.float32)
    assert widened.captured_dtype == torch.float32
    ours = linear.graph.state_dict()
    assert all(torch.equal(ours[name].float(), tensor) for name, tensor in widened.graph.state_dict().items())
    fp32 = lincompile.optimize(tiny_model("llama").to(torch.bfloat16).float(), "augmented")
    fp32.graph.load_state_dict(widened.graph.state_dict())
    with torch.no_grad():
        assert torch.equal(widened(ids).logits, fp32(ids).logits)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        lincompile.load(tmp_path / "bf16", dtype="float32")


def test_config_and_contradicting_arguments_are_refused():
    model = tiny_model("llama")
    config = lincompile.LinearizeConfig("local")
    with pytest.raises(ValueError, match="method='hedgehog'"):
        lincompile.optimize(model, "hedgehog", config=config)
    with pytest.raises(ValueError, match=r"layers=\(0,\)"):
        lincompile.optimize(model, layers=[0], config=config)
    with pytest.raises(TypeError, match="iterable of site indices"):
        lincompile.optimize(model, "local", layers="01")


def test_captured_graph_of_another_model_is_refused():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    captured = lincompile.api.capture_model(llama)
    assert lincompile.optimize(llama, "local", captured=captured).sites
    with pytest.raises(ValueError, match="another model's weights"):
        lincompile.optimize(gpt2, "local", captured=captured)
    with pytest.raises(ValueError, match="inputs= would be ignored"):
        lincompile.optimize(llama, "local", captured=captured, inputs=example_inputs("llama"))
    llama.to(torch.bfloat16)  # in place: the capture shares the weights, but its graph keeps float32 casts
    with pytest.raises(ValueError, match="traced with float32 weights, the model's are now bfloat16"):
        lincompile.optimize(llama, "softmax", captured=captured)


def test_casting_after_optimize_is_refused_with_the_fix():
    linear = lincompile.optimize(tiny_model("llama"), "local")
    linear.half()
    with pytest.raises(ValueError, match="captured in torch.float32 .* cast the Hugging Face model first"):
        linear(torch.randint(3, 128, (1, 4)))


def test_cleanup_removes_the_old_attention_cores_linearize_leaves_dead():
    """`linearize` rewires each site's output and leaves the softmax core unread; `cleanup` removes it (the pass
    would otherwise run in the default pipeline for nothing)."""
    from lincompile.api import run_pipeline
    from lincompile.config import LinearizeConfig

    def softmax_cores(gm):
        return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]

    config = LinearizeConfig(method="augmented")
    names = ("normalize", "detect_attention", "linearize")
    rewritten, _ = run_pipeline(tiny_model("llama", attn_implementation="sdpa"), config, names=names)
    cleaned, report = run_pipeline(tiny_model("llama", attn_implementation="sdpa"), config,
                                   names=names + ("cleanup",))
    assert len(softmax_cores(rewritten.gm)) == 2 and not softmax_cores(cleaned.gm)
    assert report.passes[-1].notes[0].startswith("removed ") and report.passes[-1].notes[0] != "removed 0 dead nodes"


@pytest.mark.parametrize("spelling", ["q * s", "q / d", "s * q"])
def test_queries_scaled_before_attention_linearize_as_scores_scaled_after(spelling):
    """OPT, XGLM and BART multiply the queries by 1/sqrt(d) before attention (and pass scale 1): the site's scale
    takes the constant and the op gets the unscaled queries, so a feature map that ignores the scale (elu + 1,
    Hedgehog's) sees what it sees in a model that scales its scores."""

    class Attention(torch.nn.Module):
        def __init__(self, prescaled: bool):
            super().__init__()
            self.prescaled = prescaled
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(100, 32)
            self.q, self.kv = torch.nn.Linear(32, 32), torch.nn.Linear(32, 64)

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids)
            q = self.q(x)
            if self.prescaled:
                q = {"q * s": lambda: q * 0.25, "q / d": lambda: q / 4.0, "s * q": lambda: 0.25 * q}[spelling]()
            q = q.unflatten(-1, (2, 16)).transpose(1, 2)
            k, v = self.kv(x).unflatten(-1, (2, 2, 16)).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   scale=1.0 if self.prescaled else 0.25)
            return out.transpose(1, 2).flatten(2)

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    for method in ("softmax", "linear-elu", "hedgehog"):
        pre, post = (lincompile.optimize(Attention(prescaled), method) for prescaled in (True, False))
        assert [s.scale for s in pre.sites] == [0.25] and len(pre.sites[0].match.q_scaled) == 3
        torch.testing.assert_close(pre(ids).logits, post(ids).logits, rtol=1e-6, atol=1e-6)
