"""What a Hugging Face user types that the runners must refuse or honour: keywords the graph does not take, ids
onnxruntime would wrap or cast, the model's own end-of-sequence id, states crossing runtimes, misplaced
arguments."""
from __future__ import annotations

import pytest
import torch

import lincompile
from lincompile.assets import AssetError, load_model
from lincompile.backends import onnx as lo
from lincompile.backends.ort import OrtModel
from lincompile.testing.tiny import perturb_new_parameters, tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny augmented llama and its ONNX export."""
    linear = perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented"))
    out = lo.export_onnx(linear, tmp_path_factory.mktemp("checks") / "onnx")
    return linear, OrtModel.from_dir(out, providers=["CPUExecutionProvider"]), out


IDS = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def test_keywords_the_graph_does_not_take_are_refused(models):
    linear, _, _ = models
    state = linear(IDS[:, :6]).past_state
    with pytest.raises(TypeError, match="past_state="):
        linear(IDS[:, 6:], past_key_values=state)  # Hugging Face's name: ignoring it would drop the state
    with pytest.raises(TypeError, match="no loss is computed"):
        linear(IDS, labels=IDS)
    with pytest.raises(TypeError, match="attention_maks"):
        linear(IDS, attention_maks=torch.ones_like(IDS))


def test_both_runtimes_refuse_ids_they_would_wrap_or_cast(models):
    """onnxruntime's Gather wraps a negative id; torch's embedding says only "index out of range"."""
    linear, ort, _ = models
    for model in (linear, ort):
        with pytest.raises(ValueError, match="outside the vocabulary 0..127 .min -1.*not -1 or -100"):
            model(torch.tensor([[5, -1]]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model(torch.tensor([[5, 10_000]]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate(torch.tensor([[5, 10_000]]), 2)
        with pytest.raises(TypeError, match="integer token ids"):
            model(IDS.float() + 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        ort(IDS[:, :0])
    assert torch.equal(ort(IDS.tolist()).logits, ort(IDS).logits)  # nested lists are ids too


def test_positions_and_masks_read_the_same_on_both_runtimes(models):
    """Position ids a graph would wrap (negative) or truncate (floats) are refused on both runtimes; [1, tokens]
    serves a batch; a mask keeps every token marked nonzero (onnxruntime's int64 input included), and an additive
    mask (negative values) is refused rather than read the other way round."""
    linear, ort, _ = models
    batch = IDS[:, :6].repeat(2, 1)
    for model in (linear, ort):
        with pytest.raises(ValueError, match="negative positions at kept tokens"):
            model(IDS[:, :3], position_ids=torch.tensor([[-3, -2, -1]]))
        with pytest.raises(TypeError, match="position_ids must hold integers"):
            model(IDS[:, :3], position_ids=torch.tensor([[0.9, 1.9, 2.9]]))
        with pytest.raises(ValueError, match=r"position_ids must be \[batch, tokens\] = \(2, 6\)"):
            model(batch, position_ids=torch.arange(6)[None].repeat(3, 1))
        shared = model(batch, position_ids=torch.arange(6)[None]).logits
        assert torch.allclose(shared, model(batch).logits, atol=1e-6)
    half = torch.full((1, 12), 0.5)
    additive = torch.zeros(1, 12).index_fill_(1, torch.tensor([0, 1]), float("-inf"))  # 0 keeps, -inf drops
    for model in (linear, ort):
        assert torch.allclose(model(IDS, attention_mask=half).logits, model(IDS).logits, atol=1e-6)
        with pytest.raises(ValueError, match=r"attention_mask holds negative values \(min -inf\), as an additive"):
            model(IDS, attention_mask=additive)
        assert torch.allclose(model(IDS, attention_mask=half.bfloat16()).logits, model(IDS).logits, atol=1e-6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    counted = mask.cumsum(-1) - 1  # a common spelling: left pads get -1, which no kept token reads
    gpt2 = lincompile.optimize(tiny_model("gpt2"), "augmented")  # a learned table: -1 would be read out of range
    for model in (linear, ort, gpt2):
        got = model(batch, attention_mask=mask, position_ids=counted).logits
        want = model(batch, attention_mask=mask, position_ids=counted.clamp_min(0)).logits
        assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-6)


def test_generate_stops_at_the_models_eos_unless_told_otherwise(models):
    """Without eos_token_id, both runtimes stop at the config's end-of-sequence id (as Hugging Face's generate
    does); eos_token_id=None generates past it."""
    linear, ort, _ = models
    free = linear.generate(IDS, 30, eos_token_id=None)[0, IDS.shape[1]:]
    eos = int(free[3])  # pretend the model's eos is the 4th token it generates
    saved = linear.hf_config.eos_token_id, ort.meta["eos_token_id"]
    linear.hf_config.eos_token_id = eos
    ort.meta["eos_token_id"] = eos
    try:
        for runner in (linear, ort):
            out = runner.generate(IDS, 30)[0, IDS.shape[1]:]
            first = free.tolist().index(eos)
            assert out.tolist()[:first + 1] == free.tolist()[:first + 1] and len(out) == first + 1
            assert torch.equal(runner.generate(IDS, 30, eos_token_id=None)[0, IDS.shape[1]:], free)
    finally:
        linear.hf_config.eos_token_id, ort.meta["eos_token_id"] = saved


def test_states_cross_runtimes_and_keep_their_counters(models):
    linear, ort, _ = models
    expected = linear(IDS).logits[:, 6:]
    from_ort = ort(IDS[:, :6]).past_state
    assert torch.allclose(linear(IDS[:, 6:], past_state=from_ort).logits, expected, atol=1e-5)
    assert from_ort.nbytes() == linear(IDS[:, :6]).past_state.nbytes() and from_ort.clone().shapes()
    for wider in (linear(IDS[:, :6]).past_state.to(dtype=torch.float64), from_ort.to(torch.float64)):
        assert {t.dtype for t in wider.tensors.values()} == {torch.float64, torch.int64}  # the counters stay


def test_an_onnxruntime_model_drafts_for_either_runtime(models):
    linear, ort, _ = models
    greedy = linear.generate(IDS, 10, eos_token_id=None)
    assert torch.equal(linear.generate(IDS, 10, eos_token_id=None, draft=ort, num_draft_tokens=3), greedy)
    assert torch.equal(ort.generate(IDS, 10, eos_token_id=None, draft=ort, num_draft_tokens=3), greedy)


def test_misplaced_arguments_name_the_fix(models, tmp_path):
    linear, ort, onnx_dir = models
    with pytest.raises(TypeError, match="tokenizer="):
        lo.export_onnx(linear, tmp_path / "a", object())  # a tokenizer in opset's place
    with pytest.raises(TypeError, match="lincompile.optimize"):
        lo.export_onnx(tiny_model("llama"), tmp_path / "b")
    with pytest.raises(AssetError, match="OrtModel.from_dir"):
        load_model(str(onnx_dir))
    with pytest.raises(FileNotFoundError, match="OrtModel.from_dir"):
        lincompile.load(onnx_dir)
    for bad in (0, -1, 1.5, True):
        ort.prefill_chunk_size = bad
        with pytest.raises(ValueError, match="prefill_chunk_size must be an integer >= 1"):
            ort.generate(IDS, 2)
    ort.prefill_chunk_size = 128
    assert torch.equal(linear.generate(IDS, 3, temperature=0.0), linear.generate(IDS, 3))  # greedy ignores it


def test_terms_a_linear_method_drops_are_warned_about():
    """T5's relative-position bias has no linear form: optimize says so, not only in the report."""
    with pytest.warns(UserWarning, match="have no linear form and are dropped"):
        linear = lincompile.optimize(tiny_model("t5"), "augmented")
    assert any(" dropped by " in note for result in linear.report.passes for note in result.notes)


def test_a_state_of_another_size_is_refused_by_name(models):
    """A state with this model's parts, one of them of another size per row (a state of another method or model
    size): refused before any op runs, in both runtimes."""
    linear, ort, _ = models
    state = linear(IDS[:, :4]).past_state
    name = next(iter(state.tensors))
    bad = dict(state.tensors, **{name: state.tensors[name][..., :1]})
    for runner in (linear, ort):
        with pytest.raises(ValueError, match=f"past_state part {name} is"):
            runner(IDS[:, 4:], past_state=type(state)(bad, state.length))


def test_a_kv_cache_state_must_keep_its_length():
    """A state rebuilt without its length would number the next tokens from 0 (silently, under RoPE)."""
    from lincompile.runtime.state import RecurrentState

    model = lincompile.optimize(tiny_model("llama"), "softmax")
    state = model(IDS[:, :4]).past_state
    with pytest.raises(ValueError, match="holds 4 past tokens, and its length is 0"):
        model(IDS[:, 4:], past_state=RecurrentState(state.tensors))
    torch.testing.assert_close(model(IDS[:, 4:], past_state=state).logits, model(IDS).logits[:, 4:], rtol=1e-5,
                               atol=1e-5)


def test_directories_missing_a_file_say_so(models, tmp_path):
    import shutil

    linear, _, onnx_dir = models
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy)
    (copy / lo.MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="damaged or copied in part"):
        OrtModel.from_dir(copy)
    saved = tmp_path / "saved"
    linear.save_pretrained(str(saved))
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        lincompile.load(saved)
    shutil.copytree(onnx_dir, tmp_path / "no-params")
    (tmp_path / "no-params" / "lincompile_params.safetensors").unlink()
    with pytest.raises(ValueError, match="lincompile_params.safetensors lacks .*damaged or copied in part"):
        OrtModel.from_dir(tmp_path / "no-params").generate(IDS, 4, draft="prompt-lookup")


def test_a_model_with_unmerged_lora_adapters_is_not_saved_half_loadable(tmp_path):
    """Training leaves LoRA adapters in the graph; `load` rebuilds the graph without them, so saving refuses until
    they are merged (what `lincompile train` does), and then saves a model that loads to the same logits."""
    import copy

    from lincompile.train.lora import apply_lora, merge_lora

    linear = copy.deepcopy(perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented")))
    apply_lora(linear.graph)
    with pytest.raises(ValueError, match=r"unmerged LoRA adapters.*merge_lora\(model.graph\)"):
        linear.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()
    merge_lora(linear.graph)
    linear.save_pretrained(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.allclose(lincompile.load(tmp_path / "saved")(IDS).logits, linear(IDS).logits, atol=1e-5)


def test_a_compiled_model_is_not_saved_under_names_load_cannot_read(models, tmp_path):
    from lincompile.runtime.timing import compiled_model

    linear, _, _ = models
    with pytest.raises(TypeError, match="save the model it was made from"):
        compiled_model(linear).save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()


def test_a_pad_id_in_a_prompt_is_padding_and_speculative_decoding_says_so(models):
    linear, _, _ = models
    prompt = torch.tensor([[5, 6, 0, 7, 9, 11]])  # the tiny llama's pad id is 0
    with pytest.raises(ValueError, match="holds the pad id 0"):
        linear.generate(prompt, 4, draft="prompt-lookup")
    assert torch.equal(linear.generate(prompt, 4, pad_token_id=None, eos_token_id=None, draft="prompt-lookup"),
                       linear.generate(prompt, 4, pad_token_id=None, eos_token_id=None))


def test_a_model_deep_copies_and_refuses_pickling_with_the_way_to_save(models):
    """`copy.deepcopy` gives an independent model whose sites read its own graph (speculative decoding commits
    through them); pickling (`torch.save(model)`) is refused, naming save_pretrained / lincompile.load."""
    import copy
    import pickle

    from lincompile.runtime.speculative import speculative_generate

    linear, _, _ = models
    copied, other = copy.deepcopy(linear), copy.deepcopy(linear)
    with torch.no_grad():
        assert torch.equal(copied(IDS).logits, linear(IDS).logits)
        next(other.graph.parameters()).add_(1.0)
        assert not torch.equal(other(IDS).logits, linear(IDS).logits)
        assert torch.equal(copied(IDS).logits, linear(IDS).logits)  # copies share no weights
    assert all(r.node in set(copied.graph.graph.nodes) for r in copied.rewritten)
    out, _ = speculative_generate(copied, IDS, 8, "prompt-lookup", 3)
    assert torch.equal(out, linear.generate(IDS, 8, eos_token_id=None))
    with pytest.raises(TypeError, match="cannot be pickled.*save_pretrained.*lincompile.load"):
        pickle.dumps(linear)
    linear.compile()  # a copy runs its own graph, not the original's compiled call
    assert copy.deepcopy(linear)._compiled_call_impl is None
    del linear._compiled_call_impl
