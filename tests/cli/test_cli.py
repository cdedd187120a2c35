"""Tests for the `lincompile` command line (in-process through `main(argv)`)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from xml.dom import minidom

import pytest

from lincompile.cli.main import _site_row, build_parser, main, verify_sample
from lincompile.diagnostics import LincompileWarning
from lincompile.passes.base import DUMP_FILE
from lincompile.passes.detect_attention import AttentionSite
from lincompile.passes.pipeline import DEFAULT_PIPELINE
from lincompile.testing.tiny import expected_sites, tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama (2 layers, GQA, no tokenizer) saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lincompile: error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0]


class CharTokenizer:
    """Stand-in tokenizer: one token per character."""

    eos_token_id = pad_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) % 100 + 1 for c in t] for t in texts]}


@pytest.mark.parametrize("tokenizer", [None, CharTokenizer()])
def test_verify_sample_is_fixed_and_left_padded(tokenizer):
    model = tiny_model("llama")
    sample = verify_sample(model, tokenizer)
    ids, mask = sample["input_ids"], sample["attention_mask"]
    assert ids.shape == mask.shape == sample["position_ids"].shape == (2, 64)
    assert mask[0].all() and not mask[1, :8].any() and mask[1, 8:].all()
    assert (sample["position_ids"] == sample["position_ids"].new_tensor(range(64))).all()
    assert (ids[1, :8] == 0).all() and int(ids.max()) < model.config.vocab_size
    assert (verify_sample(model, tokenizer)["input_ids"] == ids).all()
    if tokenizer is not None:  # real held-out text, not the random fallback
        assert ids[0, :5].tolist() == [ord(c) % 100 + 1 for c in "HAMLE"]


def test_methods_lists_builtin_methods(capsys):
    code, out, _ = run(capsys, "methods")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0 and {"softmax", "linear-elu"} <= set(lines)
    assert "Katharopoulos" in lines["linear-elu"]


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`lincompile methods | head -1`: the closed pipe is no error message (exit 141, as a shell's SIGPIPE)."""
    child = subprocess.Popen([sys.executable, "-m", "lincompile", "methods"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # before the child writes: it is still importing torch
    assert child.wait(timeout=120) == 141
    assert child.stderr.read() == b""


def test_another_broken_pipe_is_an_error(capsys, monkeypatch):
    def methods(args):
        raise BrokenPipeError(32, "Broken pipe")  # a subprocess's or a socket's, not stdout's

    monkeypatch.setattr("lincompile.cli.main.cmd_methods", methods)
    code, _, err = run(capsys, "methods")
    assert code == 1 and "Broken pipe" in err


def test_methods_lists_every_registered_method_once(capsys):
    import lincompile

    _, out, _ = run(capsys, "methods")
    assert sorted(line.split()[0] for line in out.splitlines()) == lincompile.methods()


def test_leakage_flags_centered_conv_only(capsys):
    results = {r["method"]: r["leaks"] for r in json.loads(run(capsys, "leakage", "augmented",
                                                                "augmented-centered", "--json")[1])}
    assert results == {"augmented": False, "augmented-centered": True}
    code, out, _ = run(capsys, "leakage", "augmented-centered")
    assert code == 0 and "LEAKS" in out


def test_passes_lists_the_pipeline(capsys):
    code, out, _ = run(capsys, "passes")
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("* ")]
    assert code == 0 and listed == list(DEFAULT_PIPELINE)


def _subcommands() -> list[str]:
    import argparse

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def test_the_cli_has_every_command():
    assert {"methods", "optimize", "train", "demo", "export", "generate", "build-ngram"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help_with_example(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and ("example:" in out or "examples:" in out) and f"lincompile {command}" in out


def test_inspect_json_and_table(capsys, tiny_dir):
    data = run_json(capsys, "inspect", tiny_dir)
    assert data["model"] == tiny_dir and data["unmatched"] == []
    assert len(data["sites"]) == expected_sites("llama")
    assert {s["mask_kind"] for s in data["sites"]} == {"causal+padding"}
    assert [s["kv_heads"] for s in data["sites"]] == [2, 2]
    code, out, err = run(capsys, "inspect", tiny_dir, "--attn-impl", "eager")
    assert code == 0 and "model.layers.1.self_attn" in out
    assert f"{expected_sites('llama')} attention sites" in out and "capturing" in err


def test_optimize_softmax_verify_is_exact_after_every_pass(capsys, tiny_dir):
    data = run_json(capsys, "optimize", tiny_dir, "--method", "softmax", "--verify")
    assert [p["name"] for p in data["passes"]] == list(DEFAULT_PIPELINE)
    assert all(p["max_abs_diff"] is not None and p["max_abs_diff"] <= 1e-5 for p in data["passes"])
    assert data["sites_found"] == data["sites_rewritten"] == 2 and data["max_abs_diff"] <= 1e-5
    assert data["model"] == tiny_dir and data["method"] == "softmax" and data["unmatched"] == []


def test_verify_detects_a_linear_method(capsys, tiny_dir):
    """The verifier must be able to fail: linear attention is not softmax, and --layers picks sites."""
    data = run_json(capsys, "optimize", tiny_dir, "--method", "linear-elu", "--layers", "1", "--verify")
    diffs = {p["name"]: p["max_abs_diff"] for p in data["passes"]}
    assert diffs["detect_attention"] <= 1e-5 and diffs["linearize"] > 1e-3
    assert data["sites_rewritten"] == 2  # site 1 linear-elu, site 0 exact softmax


def test_fuel_rewrites_one_site_and_verify_handles_a_partial_rewrite(capsys, tiny_dir):
    data = run_json(capsys, "optimize", tiny_dir, "--method", "softmax", "--fuel", "1", "--verify")
    assert data["sites_rewritten"] == 1 and data["max_abs_diff"] <= 1e-5
    linearize = next(p for p in data["passes"] if p["name"] == "linearize")
    assert any("fuel exhausted" in note for note in linearize["notes"])


def test_stop_after_runs_two_passes(capsys, tiny_dir):
    data = run_json(capsys, "optimize", tiny_dir, "--method", "softmax", "--stop-after", "detect_attention")
    assert [p["name"] for p in data["passes"]] == ["normalize", "detect_attention"]
    assert data["sites_rewritten"] == 0 and data["max_abs_diff"] is None


def test_pipeline_subsets_verify(capsys, tiny_dir):
    data = run_json(capsys, "optimize", tiny_dir, "--method", "softmax", "--verify",
                    "--passes", "detect_attention,linearize,cleanup", "--disable", "cleanup")
    assert [p["name"] for p in data["passes"]] == ["detect_attention", "linearize"]
    assert data["sites_rewritten"] == 2 and data["max_abs_diff"] <= 1e-5


def test_text_output_print_between_and_dump_dir(capsys, tiny_dir, tmp_path: Path):
    code, out, _ = run(capsys, "optimize", tiny_dir, "--method", "softmax", "--verify", "--print-between",
                       "--dump-dir", str(tmp_path))  # also draws each site
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines if line.split()[0] in DEFAULT_PIPELINE] == list(DEFAULT_PIPELINE)
    assert any(line.split()[:2] == ["+2", "lincompile.attention.default"] for line in lines)
    assert "sites_found=2 sites_rewritten=2 unmatched=0" in out and "final max_abs_diff=" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_captured.py", "01_normalize.py", "02_detect_attention.py", "03_linearize.py", "04_cleanup.py",
        DUMP_FILE, "sites"]
    assert json.loads((tmp_path / DUMP_FILE).read_text())["passes"] == list(DEFAULT_PIPELINE)
    pictures = sorted(p.name for p in (tmp_path / "sites").iterdir())
    assert pictures == [f"site_{i}_{when}.{ext}" for i in (0, 1) for when in ("after", "before")
                        for ext in ("dot", "svg")]
    before = (tmp_path / "sites" / "site_0_before.dot").read_text()
    assert "scaled_dot_product_attention" in before and "->" in before
    assert "lincompile.attention" in (tmp_path / "sites" / "site_0_after.dot").read_text()
    svg = minidom.parse(str(tmp_path / "sites" / "site_0_after.svg"))  # well-formed XML
    boxes = svg.getElementsByTagName("rect")
    arrows = svg.getElementsByTagName("line")
    after = (tmp_path / "sites" / "site_0_after.dot").read_text()
    assert len(boxes) == after.count("[label=") and len(arrows) == after.count('" -> "') > 0
    texts = "".join(t.firstChild.data for t in svg.getElementsByTagName("tspan") if t.firstChild)
    assert "lincompile.attention" in texts


def test_a_second_dump_replaces_the_first_and_a_users_directory_is_refused(capsys, tiny_dir, tmp_path: Path):
    dump = tmp_path / "dump"
    assert run(capsys, "optimize", tiny_dir, "--method", "local", "--dump-dir", str(dump))[0] == 0
    assert (dump / "sites" / "site_1_after.dot").is_file()
    code, _, _ = run(capsys, "optimize", tiny_dir, "--method", "local", "--fuel", "1", "--stop-after",
                     "linearize", "--dump-dir", str(dump))
    assert code == 0 and not (dump / "04_cleanup.py").exists()
    assert sorted(p.name for p in (dump / "sites").iterdir() if "after" in p.name) == [
        "site_0_after.dot", "site_0_after.svg"]
    (dump / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "optimize", tiny_dir, "--method", "local", "--dump-dir", str(dump))
    assert code == 1 and (dump / "notes.txt").read_text() == "mine" and "loading" not in err
    assert_one_line_error(err, "which a dump does not write")
    users = tmp_path / "users"
    (users / "sites" / "mine").mkdir(parents=True)
    (users / "sites" / "mine" / "notes.txt").write_text("mine")
    (users / "01_setup.py").write_text("print(1)")  # names a dump writes, in a directory no dump made
    code, _, err = run(capsys, "optimize", tiny_dir, "--method", "local", "--dump-dir", str(users))
    assert code == 1 and "loading" not in err
    assert_one_line_error(err, f"is not empty and holds no {DUMP_FILE}")
    assert (users / "sites" / "mine" / "notes.txt").read_text() == "mine" and (users / "01_setup.py").is_file()


def test_a_disabled_stop_after_pass_ends_the_pipeline(capsys, tiny_dir):
    result = run_json(capsys, "optimize", tiny_dir, "--method", "local", "--disable", "linearize",
                      "--stop-after", "linearize")
    assert [p["name"] for p in result["passes"]] == ["normalize", "detect_attention"]


def test_site_options_are_refused_where_linearize_does_not_run(capsys, tiny_dir):
    for extra in (["--stop-after", "detect_attention"], ["--disable", "linearize"]):
        code, _, err = run(capsys, "optimize", tiny_dir, "--method", "local", "--layers", "0", "--fuel", "1", *extra)
        assert code == 1 and "loading" not in err
        assert_one_line_error(err, "--layers, --fuel choose what the linearize pass rewrites")
    for extra in (["--stop-after", "normalize"], ["--disable", "detect_attention,linearize"]):
        code, _, err = run(capsys, "optimize", tiny_dir, "--method", "local", "--strict", *extra)
        assert code == 1 and "loading" not in err
        assert_one_line_error(err, "--strict fails on attention the detect_attention pass does not recognize")


def test_unknown_method_fails_fast_with_one_line(capsys, tiny_dir):
    code, out, err = run(capsys, "optimize", tiny_dir, "--method", "nope")
    assert code == 1 and out == "" and "loading" not in err
    assert_one_line_error(err, "unknown method 'nope'", "softmax")


def test_unknown_pass_fails_fast(capsys, tiny_dir):
    code, _, err = run(capsys, "optimize", tiny_dir, "--method", "softmax", "--stop-after", "linearise")
    assert code == 1 and "loading" not in err
    assert_one_line_error(err, "no pass 'linearise' in this pipeline")


def test_missing_model_path(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 1 and out == ""
    assert_one_line_error(err, "missing")


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--debug", "inspect", str(tmp_path / "missing"))
    assert code == 1 and "Traceback" in err and "AssetError" in err
    code, _, err = run(capsys, "optimize", str(tmp_path), "--method", "nope", "--debug")
    assert code == 1 and "Traceback" in err


def test_usage_errors_exit_2(capsys, tiny_dir):
    for argv in (["optimize", tiny_dir], ["optimize", tiny_dir, "--method", "softmax", "--layers", "a,b"],
                 ["inspect", tiny_dir, "--attn-impl", "flash"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


@pytest.mark.slow
def test_smollm2_inspect_and_verify(capsys):
    data = run_json(capsys, "inspect", "smollm2-135m")
    assert len(data["sites"]) == 30 and data["unmatched"] == []
    data = run_json(capsys, "optimize", "smollm2-135m", "--method", "softmax", "--verify")
    assert data["sites_found"] == data["sites_rewritten"] == 30
    assert data["max_abs_diff"] is not None and data["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_smollm2_fuel_rewrites_exactly_that_many_sites_and_draws_them(capsys, tmp_path: Path):
    data = run_json(capsys, "optimize", "smollm2-135m", "--method", "augmented", "--fuel", "3",
                    "--dump-dir", str(tmp_path))
    assert data["sites_found"] == 30 and data["sites_rewritten"] == 3
    drawn = sorted(p.name for p in (tmp_path / "sites").glob("site_*_after.svg"))
    assert drawn == [f"site_{i}_after.svg" for i in range(3)]
    assert "lincompile.attention" in (tmp_path / "04_cleanup.py").read_text()


@pytest.mark.parametrize("command", ["train-medusa", "make-draft", "build-ngram"])
def test_draft_commands_refuse_a_users_directory_before_loading(capsys, tmp_path: Path, monkeypatch, command):
    def never(*args, **kwargs):
        raise AssertionError("the target was loaded before --out was checked")

    monkeypatch.setattr("lincompile.cli.draft_cmd.load_target", never)
    monkeypatch.setattr("lincompile.train.draft_model.load_model", never, raising=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    extra = ["--layers", "1"] if command == "make-draft" else []
    code, _, err = run(capsys, command, "smollm2-135m", "--method", "augmented", "--out", str(mine), *extra)
    assert code == 1
    assert_one_line_error(err, "not a directory of this kind that lincompile wrote")
    assert (mine / "notes.txt").read_text() == "mine"


def test_export_checks_its_options_and_out_before_loading(capsys, tmp_path: Path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the export's options were checked")

    monkeypatch.setattr("lincompile.cli.serve_cmd.load_target", never)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "export", "smollm2-135m", "--method", "augmented", "--out", str(mine))
    assert code == 1
    assert_one_line_error(err, "not a directory of this kind that lincompile wrote")
    assert (mine / "notes.txt").read_text() == "mine"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run(capsys, "export", "smollm2-135m", "--method", "augmented", "--out", ".")
    assert code == 1
    assert_one_line_error(err, "is the current directory or holds it")
    for option, value in (("--opset", "10"), ("--chunk-size", "0"), ("--quantize", "int4")):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "smollm2-135m", "--method", "augmented", "--out", str(tmp_path / "new"), option, value])
        assert exit_info.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "lincompile", "methods"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "augmented" in result.stdout


def test_commands_never_write_over_the_model_they_read(capsys, tmp_path: Path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded before the output was checked")

    monkeypatch.setattr("lincompile.cli.draft_cmd.load_target", never)
    monkeypatch.setattr("lincompile.cli.train_cmd.load_model", never)
    saved = tmp_path / "run" / "final"
    saved.mkdir(parents=True)
    (saved / "lincompile.json").write_text("{}")  # a saved linearized model: its kind's marker
    (tmp_path / "run" / "checkpoints").mkdir()
    for argv in (["make-draft", str(saved), "--layers", "1", "--out", str(saved)],
                 ["train", str(saved), "--method", "augmented", "--out", str(tmp_path / "run")]):
        code, _, err = run(capsys, *argv)
        assert code == 1
        assert_one_line_error(err, "which this command reads")
    assert (saved / "lincompile.json").read_text() == "{}"


def test_inspect_table_flags_windows_softcaps_and_sinks():
    site = AttentionSite(index=0, path="model.layers.0.self_attn", form="eager_matmul_softmax", heads=8, kv_heads=2,
                         head_dim=64, v_head_dim=64, scale=0.125, mask_kind="causal+padding", causal=True,
                         cross=False, dtype="float32", dropout_p=0.0, window=128, softcap=50.0,
                         sinks="model.layers.0.self_attn.sinks")
    assert _site_row(site)[-1] == "causal,window=128,softcap=50,sinks"


def test_a_pipeline_without_detection_cannot_linearize(capsys):
    """linearize rewrites what detect_attention finds: without it, it would rewrite nothing and say it did."""
    for extra in (["--passes", "linearize"], ["--disable", "detect_attention"]):
        assert main(["optimize", "smollm2-135m", "--method", "augmented", *extra]) == 1
        assert "pass linearize needs detect_attention" in capsys.readouterr().err


@pytest.mark.parametrize("passes,late", [("normalize,detect_attention,linearize,cleanup,detect_attention",
                                          "pass detect_attention cannot run after linearize"),
                                         ("normalize,detect_attention,linearize,linearize,cleanup",
                                          "pass linearize cannot run after linearize")])
def test_detection_or_rewriting_after_rewriting_is_refused_before_loading(capsys, passes, late):
    """They read softmax attention, which linearize has replaced (they failed with a KeyError, or a duplicate
    argument in generated code)."""
    assert main(["optimize", "smollm2-135m", "--method", "augmented", "--passes", passes]) == 1
    err = capsys.readouterr().err
    assert late in err and "loading" not in err


@pytest.mark.parametrize("option,refusal", [("--passes", "names no pass"), ("--layers", "names no site")])
def test_an_empty_pass_or_site_list_is_refused_when_parsed(capsys, option, refusal):
    """`--passes ,` is not "the default pipeline", and `--layers ""` (an unset shell variable) not "no site"."""
    for empty in (" , ", ""):
        with pytest.raises(SystemExit) as exit_info:
            main(["optimize", "smollm2-135m", "--method", "augmented", option, empty])
        assert exit_info.value.code == 2 and f"argument {option}: {refusal}" in capsys.readouterr().err


def test_lincompiles_warnings_print_as_one_line_and_other_libraries_keep_theirs(capsys, monkeypatch, tmp_path):
    """A `LincompileWarning` prints as `lincompile: warning: ...`, as errors do; any other category is left to
    Python's form, wherever it was raised; --debug leaves both to it."""
    import lincompile.cli.main as cli

    def command(args):
        warnings.warn_explicit("ours", LincompileWarning, str(tmp_path / "script.py"), 1)
        warnings.warn_explicit("theirs", UserWarning, cli.__file__, 7)
        return 0

    monkeypatch.setattr(cli, "cmd_inspect", command)
    with pytest.warns(UserWarning) as passed_on:
        code, out, err = run(capsys, "inspect", str(tmp_path))
    assert code == 0 and out == "" and "lincompile: warning: ours\n" in err and "warning: theirs" not in err
    assert [str(w.message) for w in passed_on] == ["theirs"]
    with pytest.warns(UserWarning) as passed_on:
        code, _, err = run(capsys, "--debug", "inspect", str(tmp_path))
    assert code == 0 and "lincompile: warning" not in err
    assert [str(w.message) for w in passed_on] == ["ours", "theirs"]


def test_commands_fit_a_model_with_few_positions(capsys, tmp_path: Path):
    """A GPT-2 of 64 positions: --verify samples fewer tokens, --quantize calibrates on blocks that fit, a draft
    command's --block-size is named, and an export without a state says generate cannot use it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lincompile.testing.families import family_model
    from lincompile.testing.tiny import char_tokenizer

    short = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    GPT2LMHeadModel(config).eval().save_pretrained(short)
    char_tokenizer().save_pretrained(short)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    code, _, err = run(capsys, "optimize", str(short), "--method", "softmax", "--verify")
    assert code == 0, err  # 64 sampled tokens: "index out of range"
    code, _, err = run(capsys, "eval", str(short), "--method", "linear-elu", "--weights", "none", "--data",
                       str(corpus), "--block-size", "16", "--max-blocks", "2", "--quantize", "int8",
                       "--calibration-blocks", "2")
    assert code == 0, err  # calibration read 256-token blocks: "reaches token 256"
    code, _, err = run(capsys, "build-ngram", str(short), "--method", "linear-elu", "--weights", "none", "--data",
                       str(corpus), "--out", str(tmp_path / "ngram"), "--tokens", "512", "--block-size", "64")
    assert code == 1 and "a block of 64 tokens (--block-size) reaches token 64, past the model's 32" in err
    bloom = tmp_path / "bloom"
    family_model("bloom", "eager").save_pretrained(bloom)
    char_tokenizer().save_pretrained(bloom)
    code, out, err = run(capsys, "export", str(bloom), "--method", "softmax", "--out", str(tmp_path / "onnx"))
    assert code == 0, err
    assert "keeps no recurrent state" in out and "run it:" not in out  # ALiBi kept as a bias: whole sequences
