"""`LinearizedModel.quantize("int8")` on tiny models: every projection 8-bit (same-input ones stacked), outputs
within quantization error of the float model, every execution form agreeing, generation and speculative
decoding through it, and clear refusals."""
from __future__ import annotations

import collections
import operator
import warnings

import pytest
import torch

import lincompile
from lincompile.backends.eager_quantize import quantize_graph
from lincompile.diagnostics import LincompileWarning
from lincompile.kernels.int8.linear import int8_linear
from lincompile.runtime.generate import generate
from lincompile.runtime.graphs import lm_head_weight
from lincompile.runtime.speculative import speculative_generate
from lincompile.testing.tiny import perturb_new_parameters, tiny_model
from lincompile.train.trainer import TrainConfig, train

aten = torch.ops.aten


def _linear(family: str):
    return perturb_new_parameters(lincompile.optimize(tiny_model(family), "augmented"))


def _targets(model) -> collections.Counter:
    return collections.Counter(n.target for n in model.graph.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("family,stacked", [("llama", 9), ("gpt2", 9), ("opt", 9)])
def test_every_projection_is_8_bit_and_close_to_float(family, stacked):
    """Llama stacks q/k/v and gate/up (4 products a layer + the head), GPT-2 has them stacked already (addmm,
    transposed weights), OPT stacks q/k/v (then out_proj, fc1, fc2)."""
    linear = _linear(family)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = linear(ids).logits
    quantized = linear.quantize("int8")
    targets = _targets(quantized)
    assert targets[int8_linear] == stacked and not targets[aten.linear.default] and not targets[aten.addmm.default]
    assert quantized.quantized == "int8" and linear.quantized is None
    with torch.no_grad():
        got = quantized(ids).logits
        assert torch.equal(linear(ids).logits, before)  # the float model is left as it was
    assert 0 < float((got - before).norm() / before.norm()) < 0.05
    assert sum(p.numel() for p in quantized.graph.parameters()) < sum(p.numel() for p in linear.graph.parameters())


def test_weights_read_as_x_at_w_t_are_quantized_and_stacked_experts_are_named():
    """Falcon writes its linear layers `x @ self.weight.T`: capture makes them linear layers, all 8-bit. A
    mixture of experts' stacked expert weights have no linear layer: they stay float, and quantize names them."""
    from lincompile.testing.families import family_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        falcon = lincompile.optimize(family_model("falcon", "eager"), "linear-elu").quantize("int8")
    assert not [w for w in caught if "stay float" in str(w.message)]
    assert not [n for n, p in falcon.graph.named_parameters() if p.dim() >= 2 and "word_embeddings" not in n]
    mixtral = lincompile.optimize(family_model("mixtral", "eager"), "linear-elu")
    with pytest.warns(LincompileWarning, match=r"4 weights stay float: .*'model.layers.0.mlp.experts"):
        mixtral.quantize("int8")


def test_decode_steps_prefill_and_verify_agree():
    """One call over the sequence, a prefill then one-token steps, and a multi-token call from a state: the
    linear layers give each token the same output in any of them (row-wise scales, exact integer sums)."""
    quantized = _linear("llama").quantize("int8")
    ids = torch.randint(0, 128, (2, 75), generator=torch.Generator().manual_seed(1))  # crosses a group (G = 64)
    with torch.no_grad():
        whole = quantized(ids).logits
        state = quantized(ids[:, :60]).past_state
        steps = []
        for i in range(60, 70):
            out = quantized(ids[:, i:i + 1], past_state=state)
            state, _ = out.past_state, steps.append(out.logits)
        verify = quantized(ids[:, 70:], past_state=state).logits
    torch.testing.assert_close(torch.cat(steps, 1), whole[:, 60:70], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(verify, whole[:, 70:], rtol=1e-5, atol=1e-5)


def test_generation_and_speculative_decoding_run_quantized():
    quantized = _linear("llama").quantize("int8")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = generate(quantized, ids, 16, eos_token_id=None)
    with pytest.warns(LincompileWarning, match="8-bit weights: its verify calls and one-token calls round"):
        fast, _ = speculative_generate(quantized, ids, 16, "prompt-lookup", 4, eos_token_id=None)
    assert plain.shape == (1, 28) and torch.equal(fast, plain)  # no near-tie in this tiny model's 16 tokens


def test_skip_keeps_named_projections_float():
    linear = _linear("llama")
    quantized = linear.quantize("int8", skip=["lm_head", "*.down_proj"])
    targets = _targets(quantized)
    assert targets[aten.linear.default] == 3 and targets[int8_linear] == 6  # head + 2 down float; qkv, o, gate/up 8-bit
    with pytest.raises(ValueError, match=r"\['lm_hed'\] match no linear layer.*lm_head"):
        linear.quantize("int8", skip=["lm_hed"])
    assert _targets(linear.quantize("int8", skip="lm_head"))[aten.linear.default] == 1  # one pattern, not letters


def test_refusals_name_what_to_do(tmp_path):
    linear = _linear("llama")
    quantized = linear.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantized.quantize("int8")
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        linear.quantize("int4")
    with pytest.raises(ValueError, match="save needs float weights.*quantize it again after loading"):
        quantized.save_pretrained(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="export_onnx needs float weights.*quantize='int8'"):
        lincompile.export_onnx(quantized, tmp_path / "onnx")
    assert not list(tmp_path.iterdir())  # nothing written
    ids = torch.randint(0, 128, (1, 8))
    logits = quantized(ids).logits  # outside no_grad, as a plain call runs: the forward works
    with torch.no_grad():
        assert torch.equal(logits, quantized(ids).logits)
    with pytest.raises(RuntimeError, match="no gradient: train the float model"):
        logits.sum().backward()
    with pytest.raises(ValueError, match=r"once skip=\['\*'\] is applied"):
        linear.quantize("int8", skip=["*"])
    with pytest.raises(ValueError, match="LM head is int8.*skip=\\['lm_head'\\]"):
        lm_head_weight(quantized)
    assert lm_head_weight(linear.quantize("int8", skip=["lm_head"])).shape == (128, 64)
    with pytest.raises(ValueError, match="OptimizedModule.*quantize the model first, then compile"):
        linear.with_graph(torch.compile(linear.graph)).quantize("int8")
    with pytest.raises(ValueError, match="training needs float weights.*train the float model, then quantize"):
        train(quantized, torch.zeros(2, 16, dtype=torch.long), TrainConfig(block_size=16), tmp_path / "run")
    assert not list(tmp_path.iterdir())


def test_the_quantized_model_reads_its_own_attention_calls():
    """`rewritten` points into the quantized graph (what reads a site's call reads the model it is given)."""
    linear = _linear("llama")
    quantized = linear.quantize("int8")
    nodes = set(quantized.graph.graph.nodes)
    assert all(r.node in nodes for r in quantized.rewritten)
    assert all(r.node in set(linear.graph.graph.nodes) for r in linear.rewritten)


def test_a_projection_feeding_another_and_a_cast_model():
    """OPT-350m's layout (`project_out` feeds `lm_head` directly): the second product reads the first's 8-bit
    output. A model cast after capture is refused by its quantized twin too."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False)
    linear = perturb_new_parameters(lincompile.optimize(OPTForCausalLM(config).eval(), "augmented"))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = linear(ids).logits
        got = linear.quantize("int8")(ids).logits
    assert 0 < float((got - want).norm() / want.norm()) < 0.05
    cast = _linear("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="captured in torch.float32 and cast to torch.bfloat16"):
        cast.quantize("int8")(ids)


def test_quantize_graph_leaves_its_input_alone():
    linear = _linear("gpt2")
    nodes = [n.format_node() for n in linear.graph.graph.nodes]
    graph, count = quantize_graph(linear.graph)
    assert count == 9 and [n.format_node() for n in linear.graph.graph.nodes] == nodes
    assert graph is not linear.graph


def test_calibration_smooths_outlier_channels_without_changing_the_float_function():
    """A Llama whose attention inputs carry an outlier channel (one norm weight scaled up 30x, the projections'
    columns down as much: the same float function): per-token 8-bit activations lose the other channels, and
    calibrated smoothing (SmoothQuant) moves the outlier into the weights and wins much of that error back."""
    from lincompile.backends.eager_quantize import activation_ranges

    hf = tiny_model("llama")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.input_layernorm.weight[5] *= 30.0
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[:, 5] /= 30.0
    linear = perturb_new_parameters(lincompile.optimize(hf, "augmented"))
    gen = torch.Generator().manual_seed(4)
    calibration, ids = torch.randint(0, 128, (4, 32), generator=gen), torch.randint(0, 128, (2, 24), generator=gen)
    nodes = [n.format_node() for n in linear.graph.graph.nodes]
    with torch.no_grad():
        want = linear(ids).logits
    ranges = activation_ranges(linear, calibration)
    inputs = 2 * 4 + 1  # per layer the inputs of q/k/v, o, gate/up and down, then the head's
    assert len(ranges) == inputs and all(r.dim() == 1 and r.shape[0] in (64, 128) for r in ranges.values())
    assert [n.format_node() for n in linear.graph.graph.nodes] == nodes  # the observers sat in a copy
    with torch.no_grad():
        assert torch.equal(linear(ids).logits, want)
        plain = linear.quantize("int8")(ids).logits
        smoothed = linear.quantize("int8", calibration=calibration)(ids).logits
    error = {name: float((got - want).norm() / want.norm()) for name, got in (("plain", plain), ("smooth", smoothed))}
    assert error["smooth"] < 0.5 * error["plain"], error
    # 1/s joins the norms' weights (q/k/v, gate/up) and up_proj's rows (down); o_proj's input (the attention's
    # output) and the head's (the final norm's output is also the graph's hidden_states) are multiplied by it
    quantized = linear.quantize("int8", calibration=calibration)
    assert _targets(quantized)[torch.mul] == len(hf.model.layers) + 1
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(operator.attrgetter(norm)(quantized.graph), operator.attrgetter(norm)(linear.graph))
    with torch.no_grad():
        assert torch.equal(linear(ids).logits, want)
    for bad in (torch.rand(2, 8), torch.ones(2, 8, dtype=torch.bool), torch.ones(8, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"calibration must be token ids \[blocks, tokens\]"):
            linear.quantize("int8", calibration=bad)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_folded_smoothing_computes_what_the_multiplied_input_does(family, monkeypatch):
    """Folding 1/s into a norm's weight, a LayerNorm's weight and bias or up_proj's rows changes where rounding
    happens, nothing more: the same outputs as multiplying every input, to 8-bit rounding at a few boundaries.
    The norms get random weights and biases first (a tiny model's are 1 and 0, which would hide a missing fold)."""
    from lincompile.backends import eager_quantize

    hf = tiny_model(family)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for module in hf.modules():
            if "Norm" in type(module).__name__:
                for name, value in (("weight", 1.0), ("bias", 0.0)):
                    tensor = getattr(module, name, None)
                    if isinstance(tensor, torch.Tensor):
                        tensor.copy_(value + 0.5 * torch.randn(tensor.shape, generator=gen))
    linear = perturb_new_parameters(lincompile.optimize(hf, "augmented"))
    gen = torch.Generator().manual_seed(7)
    calibration, ids = torch.randint(0, 128, (3, 24), generator=gen), torch.randint(0, 128, (2, 20), generator=gen)
    with torch.no_grad():
        folded = linear.quantize("int8", calibration=calibration)
        got = folded(ids).logits
        monkeypatch.setattr(eager_quantize, "_fold", lambda *args: None)
        multiplied = linear.quantize("int8", calibration=calibration)
        want = multiplied(ids).logits
    assert _targets(folded)[torch.mul] < _targets(multiplied)[torch.mul]
    assert float((got - want).norm() / want.norm()) < 1e-3  # (8-bit error: about 1e-2)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_calibrated_smoothing_keeps_transposed_and_chained_projections_right(family):
    """GPT-2's addmm (weights stored [in, out], smoothed along their rows) and OPT's stacked q/k/v: calibrated int8
    stays within 8-bit error of the float model."""
    linear = _linear(family)
    gen = torch.Generator().manual_seed(5)
    calibration, ids = torch.randint(0, 128, (3, 24), generator=gen), torch.randint(0, 128, (2, 20), generator=gen)
    with torch.no_grad():
        want = linear(ids).logits
        got = linear.quantize("int8", calibration=calibration)(ids).logits
    assert 0 < float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize("speedup,warned", [(0.05, True), (0.9, False), (2.5, False)])
def test_a_cpu_without_fast_int8_products_is_warned_about(speedup, warned, monkeypatch):
    """torch._int_mm has fast kernels only on some CPUs (AVX512 VNNI, AMX); on others (AVX2) it runs at a few
    hundredths of float32's speed: quantize says so instead of silently slowing the model down."""
    from lincompile.kernels.int8 import linear as int8

    threads = torch.get_num_threads()
    assert int8.int8_speedup.__wrapped__() > 0 and torch.get_num_threads() == threads  # timed on one, restored
    monkeypatch.setattr(int8, "int8_speedup", lambda: speedup)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _linear("llama").quantize("int8")
    slow = [w for w in seen if issubclass(w.category, LincompileWarning) and "torch._int_mm" in str(w.message)]
    assert len(slow) == warned
    if warned:
        assert "runs at 0.05x a float32 matmul's speed on this CPU" in str(slow[0].message)
