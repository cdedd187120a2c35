"""`lincompile train` end to end on a tiny Llama with a character tokenizer: train, save, load back, resume."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import lincompile
from lincompile.assets import AssetError
from lincompile.cli.train_cmd import add_train_arguments, cmd_train
from lincompile.testing.tiny import char_tokenizer, tiny_model
from lincompile.train.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
"""


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return cmd_train(parser.parse_args(argv))


def test_train_command_saves_a_loadable_merged_model(tmp_path, capsys):
    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    original = tiny_model("llama", seed=0)
    original.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 6)
    argv = [str(model_dir), "--method", "augmented", "--data", str(corpus), "--out", str(out),
            "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2", "--block-size", "16",
            "--lr", "1e-2", "--warmup-steps", "0", "--eval-blocks", "2", "--checkpoint-every", "0",
            "--lora-rank", "4", "--lora-alpha", "8", "--no-progress", "--json"]
    assert _run(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["lora_merged"] == 8 and summary["ppl"] > 1

    checkpoint = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert checkpoint.step == 4 and checkpoint.train_config["lora_rank"] == 4
    loaded = lincompile.load(out / "final")
    weights = dict(loaded.graph.named_parameters())
    for name, tensor in checkpoint.tensors.items():
        if name.startswith("lincompile_params."):
            assert torch.equal(weights[name], tensor), name
    path = "model.layers.1.self_attn.v_proj"
    prefix = "lincompile_lora." + path.replace(".", "_")
    delta = 2.0 * checkpoint.tensors[prefix + ".B"] @ checkpoint.tensors[prefix + ".A"]
    assert delta.abs().max() > 0
    base = original.get_parameter(path + ".weight").detach()
    torch.testing.assert_close(weights[path + ".weight"], base + delta, atol=1e-6, rtol=0)
    history = json.loads((out / "history.json").read_text())
    assert [r["stage"] for r in history["history"]] == [1, 1, 2, 2]

    with pytest.raises(ValueError, match="already holds checkpoints"):
        _run(argv)
    assert _run(argv + ["--resume"]) == 0  # finished run: loads its last checkpoint and saves the same model
    again = dict(lincompile.load(out / "final").graph.named_parameters())
    assert all(torch.equal(again[n], weights[n]) for n in weights)


def _eval(argv: list[str], capsys) -> dict:
    from lincompile.cli.evaluate import add_eval_arguments, cmd_eval

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    assert cmd_eval(parser.parse_args(argv + ["--json", "--block-size", "16", "--max-blocks", "3"])) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_scores_shipped_weights_like_the_saved_model(tmp_path, capsys):
    """`lincompile eval MODEL --method M --weights DIR` (a shipped linearization) scores what the trained model
    saved by `train` scores; `--weights none` scores the untrained swap."""
    from lincompile.pretrained import ship

    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 6)
    assert _run([str(model_dir), "--method", "augmented", "--data", str(corpus), "--out", str(out),
                 "--stage1-steps", "2", "--stage2-steps", "3", "--batch-size", "2", "--block-size", "16",
                 "--lr", "1e-2", "--warmup-steps", "0", "--eval-blocks", "0", "--lora-rank", "4",
                 "--no-progress", "--json"]) == 0
    capsys.readouterr()
    shipped = ship(latest_checkpoint(out / "checkpoints"), tmp_path / "shipped", {"command": "test"})
    data = ["--data", str(corpus)]
    saved = _eval([str(out / "final")] + data, capsys)
    from_shipped = _eval([str(model_dir), "--method", "augmented", "--weights", str(shipped)] + data, capsys)
    untrained = _eval([str(model_dir), "--method", "augmented", "--weights", "none"] + data, capsys)
    checkpoint = _eval([str(model_dir), "--method", "augmented", "--weights",
                        str(latest_checkpoint(out / "checkpoints"))] + data, capsys)
    assert checkpoint["ppl"] == pytest.approx(from_shipped["ppl"], rel=1e-6)
    assert from_shipped["weights"] == str(shipped) and untrained["weights"] == "none"
    assert from_shipped["ppl"] == pytest.approx(saved["ppl"], rel=1e-4)
    assert from_shipped["ppl_original"] == pytest.approx(untrained["ppl_original"], rel=1e-6)
    # the saved model's LoRA is merged into its weights: its original is the model training started from
    assert saved["original"] == str(model_dir.resolve()) and saved["ppl_original"] == untrained["ppl_original"]
    quantized = _eval([str(out / "final"), "--quantize", "int8"] + data, capsys)
    assert quantized["quantize"] == "int8" and quantized["ppl_original"] == saved["ppl_original"]
    assert quantized["ppl"] == pytest.approx(saved["ppl"], rel=0.05) and quantized["ppl"] != saved["ppl"]
    assert abs(untrained["ppl"] - from_shipped["ppl"]) > 1e-3 * from_shipped["ppl"]
    assert from_shipped["ratio"] == pytest.approx(from_shipped["ppl"] / from_shipped["ppl_original"])
    # blocks of 16 tokens: a cap changes nothing here (test_pretrained.py checks what it changes)
    assert from_shipped["global_cap"] == 0
    capped = _eval([str(model_dir), "--method", "augmented", "--weights", str(shipped), "--global-cap", "64"] + data,
                   capsys)
    assert capped["global_cap"] == 64 and capped["ppl"] == from_shipped["ppl"]
    saved_capped = _eval([str(out / "final"), "--global-cap", "64"] + data, capsys)
    assert saved["global_cap"] == 0 and saved_capped["global_cap"] == 64 and saved_capped["ppl"] == saved["ppl"]


def test_train_init_continues_a_shipped_linearization(tmp_path):
    """`--init DIR` starts a new run (here: a cosine schedule) where the shipped run ended: its first held-out
    score is the one that run ended with; a different LoRA layout is refused by name."""
    from lincompile.pretrained import ship

    model_dir, first, second = tmp_path / "tiny", tmp_path / "first", tmp_path / "second"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 6)
    common = [str(model_dir), "--method", "augmented", "--data", str(corpus), "--batch-size", "2",
              "--block-size", "16", "--warmup-steps", "0", "--eval-blocks", "2", "--lora-rank", "4", "--no-progress"]
    assert _run(common + ["--out", str(first), "--stage1-steps", "2", "--stage2-steps", "3", "--lr", "1e-2"]) == 0
    shipped = ship(latest_checkpoint(first / "checkpoints"), tmp_path / "shipped", {"command": "test"})
    assert _run(common + ["--out", str(second), "--init", str(shipped), "--stage1-steps", "0", "--stage2-steps",
                          "2", "--lr", "1e-2", "--lr-schedule", "cosine"]) == 0
    ended = json.loads((first / "history.json").read_text())["evals"][-1]
    continued = json.loads((second / "history.json").read_text())
    assert continued["init"] == str(shipped) and continued["train_config"]["lr_schedule"] == "cosine"
    assert continued["evals"][0]["step"] == 0 and ended["step"] == 5
    assert continued["evals"][0]["ppl"] == pytest.approx(ended["ppl"], rel=1e-6)
    assert [r["lr"] for r in continued["history"]] == [1e-2, 5e-3]
    with pytest.raises(ValueError, match="holds LoRA adapters .* same --lora-rank"):
        _run(common[:-3] + ["--lora-rank", "2", "--out", str(tmp_path / "third"), "--init", str(shipped),
                            "--no-progress"])
    for steps, refusal in ((["0", "0"], "this run trains 0 steps. Use --init's tensors as they are with --weights"),
                           (["2", "0"], r"LoRA adapters \(lincompile_lora.*which stage 2 adds.*--stage2-steps 0")):
        with pytest.raises(ValueError, match=refusal):
            _run(common + ["--out", str(tmp_path / "fourth"), "--init", str(shipped), "--stage1-steps", steps[0],
                           "--stage2-steps", steps[1]])
        assert not (tmp_path / "fourth" / "final").exists()


def test_train_with_a_global_cap_reads_it_from_the_start_and_keeps_it(tmp_path, capsys):
    """`--global-cap N` trains with the cap; without it, a run from `--init` takes the cap its tensors are read
    with (the recipe's "global_cap", or the cap they were trained with), and its first held-out score is what
    those tensors score with that cap. Blocks of 192 tokens with groups of 64: the cap changes positions 128 on."""
    from safetensors.torch import load_file, save_file

    from lincompile.pretrained import RECIPE_FILE, TENSORS_FILE, linearized, ship

    model_dir = tmp_path / "tiny"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    common = [str(model_dir), "--method", "augmented", "--data", str(corpus), "--batch-size", "2",
              "--block-size", "192", "--warmup-steps", "0", "--eval-blocks", "2", "--lora-rank", "4", "--lr", "1e-2",
              "--no-progress", "--json"]

    def run(name: str, *extra: str) -> tuple[dict, dict]:
        assert _run(common + ["--out", str(tmp_path / name), *extra]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return summary, json.loads((tmp_path / name / "history.json").read_text())

    summary, _ = run("first", "--stage1-steps", "2", "--stage2-steps", "3")
    assert summary["global_cap"] == 0
    shipped = ship(latest_checkpoint(tmp_path / "first" / "checkpoints"), tmp_path / "shipped", {"command": "t"})
    capped = tmp_path / "capped"  # tensors read with a cap (as the shipped SmolLM2 ones are); alpha 1, so it counts
    capped.mkdir()
    tensors = load_file(shipped / TENSORS_FILE)
    save_file({n: torch.ones_like(t) if n.endswith(".alpha") else t for n, t in tensors.items()},
              capped / TENSORS_FILE)
    recipe = json.loads((shipped / RECIPE_FILE).read_text())
    (capped / RECIPE_FILE).write_text(json.dumps({**recipe, "global_cap": 64}))

    after = ["--stage1-steps", "0", "--stage2-steps", "1"]
    summary, uncapped = run("uncapped", "--init", str(capped), "--global-cap", "0", *after)
    assert summary["global_cap"] == 0
    summary, with_cap = run("with-cap", "--init", str(capped), *after)
    assert summary["global_cap"] == 64
    scores = [(r["evals"][0]["ppl"], r["history"][0]["loss"]) for r in (uncapped, with_cap)]
    assert all(abs(a - b) > 1e-3 * abs(a) for a, b in zip(*scores)), scores  # the cap is read from the start
    start = linearized(tiny_model("llama", seed=0), "augmented", weights=capped)
    assert {r.spec.global_cap for r in start.rewritten} == {64}

    checkpoint = latest_checkpoint(tmp_path / "with-cap" / "checkpoints")
    assert lincompile.load(tmp_path / "with-cap" / "final").config.spec.global_cap == 64
    model = linearized(tiny_model("llama", seed=0), "augmented", weights=checkpoint)
    assert {r.spec.global_cap for r in model.rewritten} == {64}
    summary, again = run("again", "--init", str(checkpoint), *after)  # trained with the cap: continues with it
    assert summary["global_cap"] == 64
    assert again["evals"][0]["ppl"] == pytest.approx(with_cap["evals"][-1]["ppl"], rel=1e-6)
    summary, explicit = run("explicit", "--global-cap", "32", *after)
    assert summary["global_cap"] == 32

    layered = tmp_path / "layered"  # tensors of another layout than this run's
    layered.mkdir()
    (layered / TENSORS_FILE).write_bytes((shipped / TENSORS_FILE).read_bytes())
    (layered / RECIPE_FILE).write_text(json.dumps({**recipe, "linearize": {**recipe["linearize"], "layers": [0]}}))
    with pytest.raises(ValueError, match=r"was linearized with .*'layers': \[0\].* this run with .*'layers': None"):
        run("from-layered", "--init", str(layered), *after)
    with pytest.raises(ValueError, match="global_cap=64 applies to global_branch='grouped' only"):
        _run(common[:2] + ["linear-elu"] + common[3:] + ["--out", str(tmp_path / "elu"), "--global-cap", "64"])
    assert not (tmp_path / "elu").exists()


def test_eval_reads_a_saved_model_whose_embeddings_are_tied(tmp_path, capsys):
    """SmolLM2 ties its input and output embeddings: the saved graph holds that tensor under one name."""
    import transformers

    from lincompile.testing.tiny import make_config

    config = make_config("llama")
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 6)
    saved = lincompile.optimize(model, "linear-elu").save_pretrained(str(tmp_path / "saved"), char_tokenizer())
    tied = _eval([saved, "--data", str(corpus)], capsys)
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    softmax = lincompile.optimize(model, "softmax").save_pretrained(str(tmp_path / "softmax"), char_tokenizer())
    plain = _eval([str(model_dir), "--method", "linear-elu", "--weights", "none", "--data", str(corpus),
                   "--softmax-finetuned", softmax], capsys)  # a softmax `train` run's final/ is a saved model
    assert tied["ppl_original"] == pytest.approx(plain["ppl_original"], rel=1e-6)
    assert tied["ppl"] == pytest.approx(plain["ppl"], rel=1e-6)
    assert plain["ppl_softmax_finetuned"] == pytest.approx(plain["ppl_original"], rel=1e-5)


def test_train_refuses_an_out_it_could_damage_before_any_work(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("lincompile.cli.train_cmd.load_model", never)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "history.json").write_text("my notes")
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (tmp_path / "run" / "checkpoints").mkdir()
    (final / "notes.txt").write_text("mine too")
    for out, match in ((afile, "is a file or a non-empty directory"), (mine, "did not write"),
                       (tmp_path / "run", "holds no lincompile.json")):
        with pytest.raises(FileExistsError, match=match):
            _run(["tiny", "--method", "augmented", "--out", str(out)])
    assert afile.read_text() == "mine" and (mine / "history.json").read_text() == "my notes"
    assert (final / "notes.txt").read_text() == "mine too"


def test_eval_refuses_options_that_would_be_ignored(tmp_path):
    from lincompile.cli.evaluate import add_eval_arguments, cmd_eval

    saved = lincompile.optimize(tiny_model("llama"), "local").save_pretrained(str(tmp_path / "saved"))
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    for argv, match in (([saved, "--method", "augmented"], "drop --method augmented"),
                        ([saved, "--weights", "none"], "its own trained tensors: drop --weights"),
                        (["smollm2-135m", "--weights", "none"], "--method, which was not given"),
                        (["smollm2-135m", "--global-cap", "512"], "--method, which was not given"),
                        ([saved, "--global-cap", "64"], "global_cap=64 applies to global_branch='grouped' only"),
                        (["smollm2-135m", "--quantize", "int8"], "applies to the linearized model: add --method"),
                        (["smollm2-135m", "--softmax-finetuned", str(tmp_path / "nope")], "is not a directory")):
        with pytest.raises(ValueError, match=match):
            cmd_eval(parser.parse_args(argv))
    with pytest.raises(RuntimeError, match="has no config.json"):  # before any scoring, and before loading SmolLM2
        cmd_eval(parser.parse_args(["smollm2-135m", "--softmax-finetuned", str(tmp_path)]))


def test_training_errors_say_what_to_do(tmp_path, monkeypatch):
    from lincompile.train.data import heldout_blocks
    from lincompile.train.trainer import Distributed

    with pytest.raises(ValueError, match="use cpu or cuda"):
        Distributed.from_env("gpu")
    with monkeypatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match=r"'cuda:1': under torchrun each process uses cuda:LOCAL_RANK"):
            Distributed.from_env("cuda:1")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            Distributed.from_env("cuda")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    with pytest.raises(ValueError, match=r"held-out split .*more text, or no held-out evaluation \(--eval-blocks 0\)"):
        heldout_blocks(char_tokenizer(), 256, data=str(corpus), skip="--eval-blocks 0")
    with pytest.raises(ValueError, match="held-out split .*use a smaller block size or more text$"):
        heldout_blocks(char_tokenizer(), 256, data=str(corpus))
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    corpus.write_text(TEXT * 6)
    with pytest.raises(ValueError, match="--stage1-steps 0"):
        _run([str(model_dir), "--method", "linear-elu", "--data", str(corpus), "--out", str(tmp_path / "a"),
              "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "2", "--block-size", "16",
              "--eval-blocks", "0", "--no-progress"])
    with pytest.raises(ValueError, match="no projection matches LoRA target"):
        _run([str(model_dir), "--method", "augmented", "--data", str(corpus), "--out", str(tmp_path / "b"),
              "--lora-targets", "nothing", "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "2",
              "--block-size", "16", "--eval-blocks", "0", "--no-progress"])
    assert not (tmp_path / "b").exists()  # refused before stage 1 ran, and the empty --out it made is gone
    with pytest.raises(ValueError, match=r"no projection matches LoRA target \['o_projj'\]; .*'o_proj'"):
        _run([str(model_dir), "--method", "augmented", "--data", str(corpus), "--out", str(tmp_path / "b"),
              "--lora-targets", "q_proj,o_projj", "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "2",
              "--block-size", "16", "--eval-blocks", "0", "--no-progress"])  # a misspelt one adapted nothing
    with pytest.raises(AssetError, match="not an existing directory"):
        _run([str(tmp_path / "nothing-here"), "--method", "augmented", "--out", str(tmp_path / "c" / "run")])
    assert not (tmp_path / "c" / "run").exists()
    with pytest.raises(ValueError, match="--full trains every weight, so --lora-rank, --train-norms would have no"):
        _run([str(model_dir), "--method", "augmented", "--out", str(tmp_path / "d"), "--full", "--lora-rank", "4",
              "--train-norms"])
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="--lora-rank 0 trains no adapters, so --lora-targets would have no effect"):
        _run([str(model_dir), "--method", "augmented", "--out", str(tmp_path / "d"), "--lora-rank", "0",
              "--lora-targets", "q_proj"])
    # a zero-step run used to write an --out that no later run could reuse
    with pytest.raises(ValueError, match="this run trains 0 steps. An untrained linearization.*--weights none"):
        _run([str(model_dir), "--method", "augmented", "--out", str(tmp_path / "e"), "--stage1-steps", "0",
              "--stage2-steps", "0"])
    with pytest.raises(ValueError, match="batch_size 8 is more than the 1 training blocks"):  # 8 copies of 1 block
        _run([str(model_dir), "--method", "linear-elu", "--data", str(corpus), "--out", str(tmp_path / "f"),
              "--stage1-steps", "1", "--stage2-steps", "0", "--batch-size", "8", "--block-size", "16",
              "--max-train-blocks", "1", "--eval-blocks", "0", "--no-progress"])
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_an_interrupted_run_names_the_checkpoint_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C during training: exit code 130 and the newest checkpoint named with --resume (it was written
    before the interrupt)."""
    import lincompile.cli.train_cmd as train_cmd

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 6)
    argv = [str(model_dir), "--method", "augmented", "--data", str(corpus), "--out", str(tmp_path / "run"),
            "--stage1-steps", "0", "--stage2-steps", "4", "--batch-size", "2", "--block-size", "16",
            "--eval-blocks", "0", "--checkpoint-every", "1", "--no-progress"]
    real = train_cmd.train

    def interrupted(*args, **kwargs):
        config = args[2]
        real(*args[:2], config.__class__(**{**config.__dict__, "stage2_steps": 2}), *args[3:], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "train", interrupted)
    assert _run(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; the newest checkpoint is" in err and "step-00000002" in err and "--resume" in err
    monkeypatch.setattr(train_cmd, "train", real)
    assert _run(argv + ["--resume"]) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints")).step == 4


def test_an_evaluation_interval_without_held_out_data_is_refused(capsys, tmp_path):
    from lincompile.cli.main import main

    for argv, said in ((["train", "smollm2-135m", "--method", "augmented", "--eval-blocks", "0", "--eval-every", "5"],
                        "--eval-blocks 0 evaluates nothing, so --eval-every 5 would have no effect"),
                       (["train-medusa", "smollm2-135m", "--heldout-tokens", "0", "--eval-every", "5"],
                        "--heldout-tokens 0 holds nothing out, so --eval-every 5 would have no effect")):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 1
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
