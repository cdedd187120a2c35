"""`lincompile demo` runs end to end on the real model and reports measured numbers (slow); its options
round-trip through the printed reproduce command (fast)."""
import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from lincompile.cli.demo import DemoOptions, options_from_args, run_demo
from lincompile.cli.main import build_parser, main
from lincompile.pretrained import available

KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M: keys and values, 30 layers, 3 kv heads of 64, fp32
ENGINES = ("hf", "eager", "compile", "ort")


def test_the_reproduce_command_parses_back_to_the_same_options():
    for opts in (DemoOptions(Path("x/y"), "augmented", "none", 32, 128, 3, 2, "prompt-lookup", 2, 5),
                 DemoOptions(Path("my out"), weights="my runs/ck pt", draft="ngram:my ngram")):  # spaces quoted
        args = build_parser().parse_args(shlex.split(opts.command())[1:])
        assert options_from_args(args) == opts
    assert options_from_args(build_parser().parse_args(["demo"])) == DemoOptions()


def test_the_long_context_must_exceed_the_context(tmp_path):
    with pytest.raises(ValueError, match="--context < --long-context"):
        run_demo(DemoOptions(tmp_path, context=512, long_context=512))


@pytest.mark.parametrize("draft,match", [("none", "use prompt-lookup, ngram:DIR or model:DIR"),
                                         ("bogus", "is not a draft"), ("ngram:/nonexistent", "build-ngram"),
                                         ("model:/nonexistent", "not a saved linearized model")])
def test_a_bad_draft_fails_before_any_work(tmp_path, draft, match):
    out = tmp_path / "demo"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_demo(DemoOptions(out, draft=draft))
    assert not out.exists()


def test_a_directory_of_the_users_own_files_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "decode.png").write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory of this kind"):
        run_demo(DemoOptions(mine))
    assert [p.name for p in mine.iterdir()] == ["decode.png"]


@pytest.mark.slow
def test_checks_after_the_model_loads_come_before_the_long_work_and_a_failed_run_blocks_no_other(tmp_path):
    """A draft of another vocabulary and a --long-context longer than the held-out text fail right after the
    model loads (not after the export); the directory a failed run leaves is the demo's, so the next run takes it."""
    from lincompile.runtime.ngram import build_ngram_table
    from lincompile.train.data import ShortCorpusError

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    build_ngram_table(ids, ids, 128).save(tmp_path / "ngram")
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match="the draft's vocabulary has 128 tokens, the target's 49152"):
        run_demo(DemoOptions(out, draft=f"ngram:{tmp_path / 'ngram'}"))
    assert json.loads((out / "demo.json").read_text())["complete"] is False and not (out / "onnx").exists()
    with pytest.raises(ShortCorpusError, match=r"fewer than one block of 2000000.*--long-context 2000000 tokens"):
        run_demo(DemoOptions(out, long_context=2_000_000))
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]


def test_numeric_options_are_checked_when_parsed(capsys):
    for option in ("--steps", "--num-draft-tokens", "--new-tokens", "--eval-blocks"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", option, "0"])
        assert f"argument {option}: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_its_outputs(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--context", "64", "--long-context", "256", "--steps", "2", "--eval-blocks", "1",
            "--new-tokens", "12"]
    trained = "smollm2-135m-augmented" in available()  # before the run: weights may be shipped while it runs
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["complete"] and result["trained"] is trained
    assert result["weights_label"] == ("trained: shipped weights" if trained else "untrained")
    header = next(line for line in out.splitlines() if "original (HF + KV cache)" in line)
    assert f"lincompile augmented ({result['weights_label']})" in header
    for row in ("held-out perplexity (255 tokens)", "decode tok/s @ 64: onnxruntime",
                "decode tok/s @ 256: torch.compile", "decode memory per sequence @ 256",
                "speculative (prompt-lookup, k=8): tokens per call"):  # prompt lookup's own default k
        assert row in out, row
    assert out.rstrip().splitlines()[-1] == f"reproduce: lincompile demo {shlex.join(args[:2])} --method augmented " \
        "--weights auto --context 64 --long-context 256 --steps 2 --eval-blocks 1 --draft prompt-lookup " \
        "--new-tokens 12"
    assert result["num_draft_tokens"] == 8
    assert f"held-out prompt:\n{result['prompt']}" in out and result["prompt"].startswith("HAMLET")
    assert result["continuation"].strip() and result["continuation"] in out

    assert result["inspect"]["sites"] == result["linearized_sites"] == 30 and result["inspect"]["unmatched"] == 0
    assert 1 < result["ppl_original"] < 40 and math.isfinite(result["ppl_linearized"])
    if trained:  # on this block: original 15.6, shipped trained 65.5, untrained (alpha = 0, conv taps = 0) 53785
        assert result["ppl_linearized"] < 10 * result["ppl_original"]
    engines = set(ENGINES) - ({"compile"} if result["compile_error"] else set())  # Inductor needs a C++ compiler
    for context in ("64", "256"):
        assert set(result["tokens_per_s"][context]) == engines
        assert all(rate > 0 for rate in result["tokens_per_s"][context].values())
        assert result["lincompile_engines_agree"][context]
        assert result["kv_cache_bytes"][context] == KV_BYTES_PER_TOKEN * int(context)
    assert 0 < result["state_bytes"] < result["kv_cache_bytes"]["256"]
    assert result["speculative_identical_to_greedy"] and result["tokens_per_call"] >= 1
    assert result["seconds"]["compile"] > 0 and result["seconds"]["onnx_export"] > 0
    assert (tmp_path / "decode.png").stat().st_size > 0 and (tmp_path / "onnx" / "model.onnx").is_file()
