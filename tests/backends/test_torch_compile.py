"""`torch.compile(model, backend="lincompile")`: the lincompile passes inside a dynamo/Inductor compile.

Inductor compiles C++ on the CPU, so each test that uses it takes from a few seconds (warm cache) to
about a minute (cold); the fast tests use `compiler="eager"` (the rewritten ATen graph, unfused).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lincompile
from lincompile.backends import torch_compile as tcb
from lincompile.testing.tiny import example_inputs, expected_sites, tiny_model

OP_CALL = "torch.ops.lincompile.attention.default("


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    tcb.clear_reports()
    yield
    torch._dynamo.reset()


def _compile(model: torch.nn.Module, **options: object) -> torch.nn.Module:
    return torch.compile(model, backend="lincompile", options=options)


def _linear_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], method: str,
                   layers: list[int] | None = None) -> torch.Tensor:
    linear = lincompile.optimize(model, method, layers=layers)
    return linear(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def test_backend_is_registered():
    assert "lincompile" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("lincompile") is tcb.lincompile_backend


def test_options_are_validated():
    config, compiler = tcb.parse_options({"method": "softmax", "layers": [1]})
    assert (config.spec.name, config.layers, compiler) == ("softmax", (1,), "inductor")
    assert tcb.parse_options(None)[0] == lincompile.LinearizeConfig()  # optimize's default method (it was linear-elu)
    with pytest.raises(ValueError, match="unknown lincompile backend options"):
        tcb.parse_options({"methd": "softmax"})
    with pytest.raises(ValueError, match="compiler"):
        tcb.parse_options({"compiler": "tvm"})
    with pytest.raises(ValueError):
        tcb.parse_options({"method": "no-such-method"})


_ENTRY_POINT_SCRIPTS = {
    # dynamo finds the entry point and imports the module itself
    "entry point only": "",
    # dynamo has already discovered the entry point when the module is imported by hand
    "imported after discovery": "torch._dynamo.list_backends(); import lincompile.backends.torch_compile",
}


@pytest.mark.parametrize("prelude", list(_ENTRY_POINT_SCRIPTS.values()), ids=list(_ENTRY_POINT_SCRIPTS))
def test_entry_point_backend(tmp_path: Path, prelude: str):
    """With the pyproject entry point installed, backend="lincompile" works without importing lincompile."""
    dist = tmp_path / "lincompile_ep-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lincompile-ep\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[torch_dynamo_backends]\nlincompile = lincompile.backends.torch_compile:lincompile_backend\n")
    script = textwrap.dedent("""
        import sys, torch
        assert not any(m.startswith("lincompile") for m in sys.modules)
        PRELUDE
        fn = torch.compile(lambda x: torch.softmax(x @ x.T, -1) * 2, backend="lincompile",
                           options={"compiler": "eager"})
        x = torch.randn(4, 3)
        torch.testing.assert_close(fn(x), torch.softmax(x @ x.T, -1) * 2)
        from lincompile.backends import torch_compile as tcb
        assert torch._dynamo.lookup_backend("lincompile") is tcb.lincompile_backend
        assert [r.attention_ops for r in tcb.reports()] == [0]
        print("ok")
    """).replace("PRELUDE", prelude)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_single_graph_for_dynamo(family: str):
    model, inputs = tiny_model(family), example_inputs(family)
    explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["softmax", "linear-elu"])
def test_inductor_matches(family: str, method: str):
    from torch._inductor.utils import run_and_get_code

    model, inputs = tiny_model(family), example_inputs(family)
    compiled = _compile(model, method=method)
    with torch.no_grad():
        logits, code = run_and_get_code(lambda: compiled(**inputs).logits)
        expected = model(**inputs).logits if method == "softmax" else _linear_logits(model, inputs, method)
    real = inputs["attention_mask"].bool()  # fully padded query rows are meaningless in the original
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-5)
    if method != "softmax":
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    sites = expected_sites(family)
    [report] = tcb.reports()  # one graph, one backend call
    assert (report.method, report.compiler, report.attention_ops, len(report.sites)) == (method, "inductor", sites,
                                                                                        sites)
    assert all(s.mask_kind == "causal+padding" for s in report.sites)
    assert sum(c.count(OP_CALL) for c in code) == sites  # the ops sit in the Inductor-generated module
    assert any("cpp_fused" in c for c in code)  # ... with the surrounding code fused


def test_layers_keep_the_other_sites_exact():
    model, inputs = tiny_model("llama"), example_inputs("llama")
    compiled = _compile(model, method="linear-elu", layers=[0], compiler="eager")
    with torch.no_grad():
        logits = compiled(**inputs).logits
        expected = _linear_logits(model, inputs, "linear-elu", layers=[0])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    [report] = tcb.reports()
    assert report.attention_ops == 2
    calls = [line for line in report.code.splitlines() if OP_CALL in line]
    assert ['"name":"linear-elu"' in calls[0], '"name":"softmax"' in calls[1]] == [True, True]


@pytest.mark.parametrize("method", ["performer", "hedgehog"])
def test_methods_with_parameters(method: str):
    """Fixed (random features) and trainable per-site parameters live in the rewritten graph."""
    model, inputs = tiny_model("llama"), example_inputs("llama")
    with torch.no_grad():
        logits = _compile(model, method=method, compiler="eager")(**inputs).logits
        expected = _linear_logits(model, inputs, method)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_dynamic_shapes_recompile_once_without_specialising():
    model = tiny_model("llama")
    compiled = _compile(model, method="linear-elu", compiler="eager")
    for seq in (8, 12, 20, 31):
        inputs = example_inputs("llama", seq=seq, seed=seq)
        with torch.no_grad():
            logits = compiled(**inputs).logits
            expected = _linear_logits(model, inputs, "linear-elu")
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert len(tcb.reports()) == 2  # static first graph, then one dynamic graph for every later length


def test_strict_passes_when_every_site_is_recognized():
    model, inputs = tiny_model("llama"), example_inputs("llama")
    compiled = _compile(model, method="linear-elu", compiler="eager", strict=True)
    with torch.no_grad():
        compiled(**inputs)  # every site recognized: strict passes
    assert tcb.reports()[-1].attention_ops == expected_sites("llama")


def test_attention_dropout_in_training_is_dropped_aloud():
    """The op has no dropout: a model trained through the backend with attention dropout loses it, with a warning
    (even under exact softmax)."""
    model = tiny_model("llama").train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    compiled = _compile(model, method="softmax", compiler="eager")
    with pytest.warns(UserWarning, match=r"sites lose their attention dropout.*\n"
                                         r".*its attention dropout \(p=0.5\) is not applied by softmax"):
        compiled(**example_inputs("llama"))
    assert [s.dropout_p for s in tcb.reports()[-1].sites] == [0.5] * expected_sites("llama")


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_gradients_match_optimize(compiler):
    model, inputs = tiny_model("llama"), example_inputs("llama")
    compiled = _compile(model, method="linear-elu", compiler=compiler)
    compiled(**inputs).logits.square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _linear_logits(model, inputs, "linear-elu").square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def _smollm2_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.slow
def test_smollm2_rewrite_matches_optimize(smollm2):
    """The graph the backend builds computes what `optimize` builds (before Inductor: no fusion)."""
    model, _ = smollm2
    inputs = _smollm2_inputs(model)
    explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    with torch.no_grad():
        logits = _compile(model, method="linear-elu", compiler="eager")(**inputs).logits
        expected = _linear_logits(model, inputs, "linear-elu")
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    [report] = tcb.reports()
    assert report.attention_ops == len(report.sites) == model.config.num_hidden_layers


@pytest.mark.slow
def test_smollm2_inductor_within_fp32_noise(smollm2):
    """Inductor reorders fp32 sums (norms, matmuls, sin/cos), and the untrained linear-elu SmolLM2 amplifies
    that to 2e-3 to 3e-3 in the logits (2.9e-3 with transformers 5.25; eager fp32 itself is 1.4e-3 from fp64;
    `torch.compile` of the `optimize` graph with plain Inductor gives the same logits as this backend). So the
    compiled logits are held to the fp64 reference no looser than a few times eager fp32's error (x3), plus
    the 1e-4 bound on the rewrite above; a wrong rewrite or a dropped op is off by far more."""
    import copy

    model, _ = smollm2
    inputs = _smollm2_inputs(model)
    with torch.no_grad():
        logits = _compile(model, method="linear-elu")(**inputs).logits
        eager = _linear_logits(model, inputs, "linear-elu")
        exact = _linear_logits(copy.deepcopy(model).double(), inputs, "linear-elu")
    [report] = tcb.reports()  # a single graph
    assert report.attention_ops == model.config.num_hidden_layers
    eager_error = (eager.double() - exact).abs().max().item()
    assert (logits.double() - exact).abs().max().item() <= 3 * eager_error + 1e-4
    torch.testing.assert_close(logits, eager, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_smollm2_softmax_through_inductor_matches_optimize(smollm2):
    """With the original softmax attention (every site through `lincompile.attention`), the backend under
    Inductor gives `optimize`'s logits within 1e-4, in a single graph: the backend adds no error of its own."""
    model, _ = smollm2
    inputs = _smollm2_inputs(model)
    with torch.no_grad():
        logits = _compile(model, method="softmax")(**inputs).logits
        expected = _linear_logits(model, inputs, "softmax")
    [report] = tcb.reports()
    assert report.attention_ops == model.config.num_hidden_layers
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_linearized_smollm2_amplifies_rounding_beyond_1e4(smollm2):
    """Why Inductor's linearized logits are not within 1e-4 of eager: a one-ulp relative perturbation of
    every weight moves the shipped augmented SmolLM2's logits by more than 1e-4 (measured ~1.6e-3), the
    original's by less (~5e-5). Any fp32 compiler that reorders sums perturbs the model at least that much."""
    import copy

    from lincompile import pretrained

    model, _ = smollm2
    ids = _smollm2_inputs(model)["input_ids"]
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in noisy.parameters():
            param.mul_(1 + torch.finfo(torch.float32).eps * torch.randn(param.shape, generator=generator))
        change = {}
        for name, run in (("original", lambda m: m(ids).logits),
                          ("augmented", lambda m: pretrained.linearized(m, "augmented")(ids).logits)):
            change[name] = (run(model) - run(noisy)).abs().max().item()
    assert change["original"] < 1e-4 < change["augmented"], change
