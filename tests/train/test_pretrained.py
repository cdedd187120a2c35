"""Shipped linearizations: `ship` a training checkpoint, `linearized` rebuilds the trained model from it."""
import json

import pytest
import torch

import lincompile
from lincompile.pretrained import RECIPE_FILE, TENSORS_FILE, linearized, ship
from lincompile.testing.tiny import perturb_new_parameters, tiny_model
from lincompile.train.lora import apply_lora


@pytest.fixture(scope="module")
def shipped(reference_run, worker, tmp_path_factory):
    result, _ = reference_run
    out = tmp_path_factory.mktemp("weights") / "tiny-augmented"
    assert ship(result.checkpoint, out, {"command": "tests"}) == out
    return out


def test_linearized_reproduces_the_trained_model_without_touching_the_original(reference_run, worker, shipped,
                                                                                one_thread):
    _, trained = reference_run
    config = worker.config()
    expected = lincompile.optimize(tiny_model("llama", seed=0), worker.METHOD)
    apply_lora(expected.graph, config.lora_targets, config.lora_rank, config.lora_alpha, config.seed)
    missing, unexpected = expected.graph.load_state_dict(trained, strict=False)  # the trained graph, unmerged
    assert not unexpected and not [n for n in missing if n not in dict(expected.graph.named_buffers())]
    original = tiny_model("llama", seed=0)
    before = {n: p.detach().clone() for n, p in original.named_parameters()}
    model = linearized(original, worker.METHOD, weights=shipped)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in original.named_parameters())
    recipe = json.loads((shipped / RECIPE_FILE).read_text())
    assert recipe["command"] == "tests" and recipe["lora"]["rank"] == config.lora_rank
    assert model.recipe == recipe and (shipped / TENSORS_FILE).is_file()


def test_linearized_errors_name_the_problem(shipped, tmp_path, one_thread):
    with pytest.raises(ValueError, match="holds a augmented linearization, not linear-elu"):
        linearized(tiny_model("llama", seed=0), "linear-elu", weights=shipped)
    with pytest.raises(FileNotFoundError, match="no trained linearization"):
        linearized(tiny_model("llama", seed=0), "augmented", weights=tmp_path)
    with pytest.raises(ValueError, match=r"trained with layers=None .* do not fit layers=\(0,\)"):
        linearized(tiny_model("llama", seed=0), "augmented", weights=shipped, layers=[0])


def test_linearized_honours_strict(shipped, monkeypatch, one_thread):
    seen = []
    real = lincompile.api.optimize
    monkeypatch.setattr(lincompile.api, "optimize", lambda *a, **k: seen.append(k["config"]) or real(*a, **k))
    linearized(tiny_model("llama", seed=0), "augmented", weights=shipped, strict=True)
    assert seen[0].strict


def test_global_cap_comes_from_the_recipe_or_the_argument(shipped, tmp_path, one_thread):
    """The recipe's "global_cap" reaches every site's spec and `global_cap=` overrides it (0: the paper's sum)."""
    capped = tmp_path / "capped"
    capped.mkdir()
    (capped / TENSORS_FILE).write_bytes((shipped / TENSORS_FILE).read_bytes())
    recipe = json.loads((shipped / RECIPE_FILE).read_text())
    (capped / RECIPE_FILE).write_text(json.dumps({**recipe, "global_cap": 64}))
    for weights, cap, expected in ((shipped, None, 0), (capped, None, 64), (capped, 0, 0), (shipped, 96, 96)):
        model = linearized(tiny_model("llama", seed=0), "augmented", weights=weights, global_cap=cap)
        assert {r.spec.global_cap for r in model.rewritten} == {expected}, (weights, cap)
    with pytest.raises(ValueError, match="global_cap=64 applies to global_branch='grouped' only"):
        linearized(tiny_model("llama", seed=0), "linear-elu", weights="none", global_cap=64)


def test_a_global_cap_changes_only_what_reads_more_than_it(tmp_path):
    """Cap 64 with groups of 64 tokens: outputs equal up to position 127 (the branch sums at most 64 tokens
    there), different from 128 on (it sums 128). A saved capped model loads with its cap, or with another one."""
    ids = torch.randint(3, 128, (1, 160), generator=torch.Generator().manual_seed(6))
    logits = []
    for cap in (0, 64):
        model = perturb_new_parameters(linearized(tiny_model("llama", seed=0), "augmented", "none", global_cap=cap))
        with torch.no_grad():
            logits.append(model(ids).logits[0])
    diff = (logits[0] - logits[1]).abs().amax(-1)
    assert diff[:128].max() == 0 and diff[128:].min() > 1e-4
    again = lincompile.load(model.save_pretrained(str(tmp_path / "capped")))
    assert again.config.spec.global_cap == 64
    uncapped = lincompile.load(tmp_path / "capped", global_cap=0)
    assert uncapped.config.spec.global_cap == 0
    with torch.no_grad():
        assert torch.equal(again(ids).logits[0], logits[1])
        assert torch.equal(uncapped(ids).logits[0], logits[0])


def test_weights_trained_on_another_model_are_named(shipped, reference_run, worker, one_thread, recwarn):
    """Tensors of the right shapes load into any model of the architecture: the recipe records which model they
    were trained on (its embeddings, in bfloat16: the same in any float dtype), and another one is warned about."""
    from lincompile.diagnostics import LincompileWarning

    embeddings = "model.embed_tokens.weight"
    full = {embeddings: torch.zeros(128, 64)}  # a --full run trains the embeddings the fingerprint hashes
    for weights in (shipped, reference_run[0].checkpoint):
        linearized(tiny_model("llama", seed=0).to(torch.bfloat16), worker.METHOD, weights=weights)
        real = lincompile.pretrained.trained_tensors
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lincompile.pretrained, "trained_tensors", lambda *args: ({**real(*args)[0], **full},
                                                                                  real(*args)[1]))
            assert torch.equal(linearized(tiny_model("llama", seed=0), worker.METHOD, weights=weights).graph
                               .get_parameter(embeddings), full[embeddings])
        assert not [w for w in recwarn if "another model" in str(w.message)]
        with pytest.warns(LincompileWarning, match="was trained on another model than this one"):
            linearized(tiny_model("llama", seed=1), worker.METHOD, weights=weights)
