"""Shallow linearized drafts: the first N layers exactly, distillation toward the target, save/load; the CLI."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import lincompile
from lincompile.cli.draft_cmd import add_parsers
from lincompile.runtime.medusa import MedusaHeads, read_metadata
from lincompile.testing.tiny import char_tokenizer, tiny_model
from lincompile.train.draft_model import DistillConfig, agreement, make_draft, shallow_hf

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 40


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 3-layer tiny Llama with a sharp lm_head (peaked logits) and a character tokenizer, plus a corpus file."""
    root = tmp_path_factory.mktemp("draft")
    model = tiny_model("llama", seed=2, num_layers=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    (root / "corpus.txt").write_text(TEXT)
    return root


def _blocks(n: int, t: int, seed: int) -> torch.Tensor:
    """Learnable text: each row steps through the vocabulary by 7 from a random start (ids 3..127)."""
    starts = torch.randint(0, 125, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + 7 * torch.arange(t)) % 125 + 3


def test_shallow_copy_is_the_first_layers(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "tiny").eval()
    draft = shallow_hf(model, 2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir / "tiny", num_hidden_layers=2).eval()
    ids = _blocks(2, 10, 0)
    assert len(draft.model.layers) == 2 and model.config.num_hidden_layers == 3
    torch.testing.assert_close(draft(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
    assert draft.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    for bad in (0, 3):
        with pytest.raises(ValueError, match="1 <= layers < 3"):
            shallow_hf(model, bad)


def test_distilled_draft_agrees_more_and_loads_back(tiny_dir):
    from transformers import AutoModelForCausalLM

    config = DistillConfig(steps=25, lr=3e-3, batch_size=4, block_size=32, warmup_steps=0)
    result = make_draft(str(tiny_dir / "tiny"), 1, "augmented", tiny_dir / "draft1", config=config,
                        blocks=_blocks(16, 32, 1), heldout=_blocks(4, 32, 2), progress=False)
    before, after = result.evals
    assert after["kl"] < 0.7 * before["kl"] and after["top1"] > before["top1"], (before, after)
    kls = [r["kl"] for r in result.history]
    assert len(kls) == 25 and sum(kls[-5:]) < sum(kls[:5])
    assert all(p.requires_grad for p in result.teacher.parameters())  # flags restored
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir / "tiny").eval()
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), result.teacher.parameters()))  # target untouched
    back = lincompile.load(result.saved)
    assert back.hf_config.num_hidden_layers == 1 and len(back.sites) == 1
    assert back.config.spec.name == "augmented"
    ids = _blocks(2, 12, 3)
    torch.testing.assert_close(back(ids).logits, result.draft(ids).logits)
    assert (result.saved / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def lin_dir(tiny_dir):
    """(a saved 3-layer augmented model with "trained" method parameters and a tokenizer, that model)."""
    target = lincompile.optimize(tiny_model("llama", seed=2, num_layers=3), "augmented")
    with torch.no_grad():
        for name, p in target.graph.named_parameters():
            if name.startswith("lincompile_params"):
                p.add_(0.1)
    target.save_pretrained(str(tiny_dir / "lin"), char_tokenizer())
    return tiny_dir / "lin", target


def test_draft_of_a_linearized_directory_inherits_its_layers(tiny_dir, lin_dir):
    _, target = lin_dir
    result = make_draft(str(tiny_dir / "lin"), 2, config=DistillConfig(steps=0, block_size=16),
                        heldout=_blocks(2, 16, 4), progress=False)
    draft = result.draft
    saved = dict(target.graph.named_parameters())
    for name, p in draft.graph.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert {n for n in saved if ".site_" in n} - {n for n, _ in draft.graph.named_parameters()} == {
        n for n in saved if ".site_2." in n}
    assert [e["step"] for e in result.evals] == [0] and result.saved is None
    assert result.evals[0]["top1"] == agreement(draft, target, _blocks(2, 16, 4))["top1"]
    torch.testing.assert_close(result.teacher(_blocks(1, 8, 5)).logits, target(_blocks(1, 8, 5)).logits)
    with pytest.raises(ValueError, match="linearized with augmented"):
        make_draft(str(tiny_dir / "lin"), 2, "linear-elu", config=DistillConfig(steps=0), eval_blocks=0)


def _run(*argv: str) -> dict:
    parser = argparse.ArgumentParser(prog="lincompile")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv) + ["--no-progress", "--json"])
    assert args.func(args) == 0
    return args


def test_make_draft_command(tiny_dir, capsys):
    out = tiny_dir / "cli-draft"
    _run("make-draft", str(tiny_dir / "tiny"), "--layers", "2", "--out", str(out), "--steps", "3",
         "--block-size", "32", "--batch-size", "2", "--data", str(tiny_dir / "corpus.txt"), "--eval-blocks", "1")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["layers"] == 2 and summary["method"] == "augmented"
    assert lincompile.load(out).hf_config.num_hidden_layers == 2


def test_train_medusa_command(tiny_dir, capsys):
    out = tiny_dir / "cli-medusa"
    _run("train-medusa", str(tiny_dir / "tiny"), "--out", str(out), "--heads", "2", "--steps", "3",
         "--tokens", "512", "--heldout-tokens", "64", "--block-size", "32", "--batch-size", "64",
         "--data", str(tiny_dir / "corpus.txt"))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["heads"] == 2 and summary["train_tokens"] == 512 and len(summary["accuracy"]) == 2
    assert read_metadata(out)["config"]["num_heads"] == 2
    weight = torch.zeros(128, 64)
    assert MedusaHeads.load(out, weight).config.hidden_size == 64


def test_train_medusa_command_on_a_linearized_directory(tiny_dir, lin_dir, capsys):
    _run("train-medusa", str(lin_dir[0]), "--out", str(tiny_dir / "lin-medusa"), "--heads", "2", "--steps", "2",
         "--tokens", "256", "--heldout-tokens", "0", "--block-size", "32", "--data", str(tiny_dir / "corpus.txt"))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["accuracy"] is None
    with pytest.raises(ValueError, match="already linearized with augmented"):
        _run("train-medusa", str(lin_dir[0]), "--out", str(tiny_dir / "x"), "--method", "linear-elu")
    with pytest.raises(ValueError, match="its own trained tensors; drop --weights"):  # not silently ignored
        _run("train-medusa", str(lin_dir[0]), "--out", str(tiny_dir / "x"), "--method", "augmented", "--weights",
             "none")
    with pytest.raises(ValueError, match="its own trained tensors; drop --weights"):  # not "add --method"
        _run("train-medusa", str(lin_dir[0]), "--out", str(tiny_dir / "x"), "--weights", "none")


def test_target_weights_reach_the_linearization(tiny_dir, tmp_path):
    """--weights picks the trained tensors of a --method linearization: none is untrained, a missing directory
    is refused by name."""
    from lincompile.cli.draft_cmd import load_target

    model, _ = load_target(str(tiny_dir / "tiny"), "augmented", "none")
    assert model.recipe is None and model.config.spec.name == "augmented"
    with pytest.raises(FileNotFoundError, match="no trained linearization at .*missing"):
        load_target(str(tiny_dir / "tiny"), "augmented", str(tmp_path / "missing"))


@pytest.mark.parametrize("argv, message", [
    (["train-medusa", "M", "--out", "o", "--tokens", "8"], "at least one block"),
    (["train-medusa", "M", "--out", "o", "--heldout-tokens", "8"], r"--heldout-tokens \(8\) must be at least one"),
    (["train-medusa", "M", "--out", "o", "--weights", "none"], "add --method"),
    (["train-medusa", "M", "--out", "o", "--heads", "40", "--block-size", "32"], "heads with no token to predict"),
])
def test_bad_arguments_are_refused_before_loading(argv, message):
    parser = argparse.ArgumentParser(prog="lincompile")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    with pytest.raises(ValueError, match=message):
        args.func(args)


@pytest.mark.parametrize("argv", [["train-medusa", "M", "--out", "o", "--heads", "0"],
                                  ["make-draft", "M", "--out", "o", "--layers", "0"],
                                  ["build-ngram", "M", "--out", "o", "--batch-size", "0"]])
def test_counts_are_checked_when_parsed(argv, capsys):
    parser = argparse.ArgumentParser(prog="lincompile")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert f"argument {argv[-2]}: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_two_layer_draft_of_real_smollm2(tmp_path):
    config = DistillConfig(steps=2, batch_size=1, block_size=64, warmup_steps=0)
    result = make_draft("smollm2-135m", 2, "augmented", tmp_path / "draft", config=config, eval_blocks=1,
                        progress=False)
    assert len(result.evals) == 2 and result.history[-1]["kl"] > 0
    back = lincompile.load(result.saved)
    assert back.hf_config.num_hidden_layers == 2 and len(back.sites) == 2


def test_build_ngram_command(tiny_dir, capsys):
    from lincompile.runtime.ngram import NgramTable

    out = tiny_dir / "cli-ngram"
    _run("build-ngram", str(tiny_dir / "tiny"), "--out", str(out), "--tokens", "256", "--block-size", "32",
         "--data", str(tiny_dir / "corpus.txt"))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_order = {int(n): count for n, count in summary["contexts_by_order"].items()}
    assert summary["tokens"] == 256 and summary["order"] == 3 and by_order[2] >= by_order[1] > 0
    table = NgramTable.load(out)
    assert table.vocab_size == 128 and table.counts_by_order() == by_order and table.order == 3
    assert sum(seen for c, (_, _, seen) in table.contexts.items() if len(c) == 1) == 256  # every position counted once
    assert table.metadata["tokens"] == 256


def test_a_teacher_of_another_vocabulary_is_refused(tiny_dir):
    from transformers import LlamaForCausalLM

    from lincompile.testing.tiny import make_config

    config = make_config("llama")
    config.vocab_size = 200
    with pytest.raises(ValueError, match="the teacher scores 200 tokens, the draft 128"):
        make_draft(str(tiny_dir / "tiny"), 1, config=DistillConfig(steps=1, block_size=16),
                   blocks=_blocks(4, 16, 0), eval_blocks=0, teacher=LlamaForCausalLM(config).eval(), progress=False)


def test_blocks_past_learned_positions_are_refused(tmp_path):
    tiny_model("gpt2", num_layers=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"a block of 200 tokens \(--block-size\) reaches token 200, past the model's "
                                         "128 learned positions"):
        make_draft(str(tmp_path / "gpt2"), 1, config=DistillConfig(steps=1, block_size=200),
                   blocks=_blocks(4, 200, 0), eval_blocks=0, progress=False)
