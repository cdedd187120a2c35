"""`lincompile export` and `lincompile generate` on a tiny Llama with a character tokenizer: greedy text is the
same with every draft and in onnxruntime, and bad input is one clear error line."""
from __future__ import annotations

import io
import itertools
import json

import pytest
import torch

import lincompile
from lincompile.cli.main import main
from lincompile.runtime.generate import generate
from lincompile.runtime.medusa import MedusaConfig, MedusaHeads, lm_head_weight
from lincompile.runtime.ngram import build_ngram_table
from lincompile.testing.tiny import char_tokenizer, perturb_new_parameters, tiny_model

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny HF Llama with a peaked lm_head, the same linearized (augmented, perturbed parameters) and saved,
    an n-gram table of the linearized model's own greedy predictions, and Medusa heads on its lm_head."""
    root = tmp_path_factory.mktemp("serve")
    hf = tiny_model("llama", seed=3)
    with torch.no_grad():
        hf.lm_head.weight.mul_(30)
    tokenizer = char_tokenizer()
    hf.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    linear = perturb_new_parameters(lincompile.optimize(hf, "augmented"))
    linear.save_pretrained(str(root / "lin"), tokenizer)
    corpus = torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    build_ngram_table(corpus, linear(corpus).logits.argmax(-1), 128).save(root / "ngram")
    weight = lm_head_weight(linear)
    MedusaHeads(MedusaConfig(num_heads=2, hidden_size=weight.shape[1], vocab_size=weight.shape[0]), weight).save(
        root / "medusa")  # untrained (zero) heads: their drafts are still verified like any others
    return root


def _generate(capsys, *argv: str) -> dict:
    code = main(["generate", *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_generate_is_plain_greedy_with_every_draft(dirs, capsys):
    linear = lincompile.load(dirs / "lin")
    tokenizer = char_tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = tokenizer.decode(generate(linear, ids, 24)[0, ids.shape[1]:], skip_special_tokens=True)
    plain = _generate(capsys, str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos")
    assert plain["text"] == expected and plain["new_tokens"] == 24 and plain["runtime"] == "torch"
    assert "tokens_per_call" not in plain  # only speculative decoding reports it
    drafts = {"prompt-lookup": 8, f"ngram:{dirs / 'ngram'}": 8, f"medusa:{dirs / 'medusa'}": 4,
              f"model:{dirs / 'lin'}": 4}  # each kind's k when -k is not given
    for (draft, default_k), k in itertools.product(drafts.items(), (["-k", "3"], [])):
        out = _generate(capsys, str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos",
                        "--draft", draft, *k)
        assert out["text"] == expected and out["num_draft_tokens"] == (3 if k else default_k), (draft, k)
    same_model = _generate(capsys, str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos",
                           "--draft", f"model:{dirs / 'lin'}", "-k", "3")
    assert same_model["tokens_per_call"] > 3.5  # the target drafting for itself: (nearly) every draft is accepted


def test_generate_quantized_is_the_quantized_models_greedy_text(dirs, capsys):
    """--quantize int8 decodes with `LinearizedModel.quantize("int8")` calibrated on 8 blocks of the corpus's
    training split (`--calibration-blocks`; 0: none), with or without a draft."""
    from lincompile.train.data import calibration_blocks

    tokenizer = char_tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def text(**options) -> str:
        quantized = lincompile.load(dirs / "lin").quantize("int8", **options)
        return tokenizer.decode(generate(quantized, ids, 24)[0, ids.shape[1]:], skip_special_tokens=True)

    expected, plain = text(calibration=calibration_blocks(tokenizer, 8)), text()
    assert expected != plain  # so the checks below tell a calibrated model from a plain one
    args = [str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos", "--quantize", "int8"]
    assert _generate(capsys, *args)["text"] == expected
    assert _generate(capsys, *args, "--draft", "prompt-lookup")["text"] == expected
    assert _generate(capsys, *args, "--calibration-blocks", "0")["text"] == plain
    assert main(["generate", *args[:-2], "--calibration-blocks", "4"]) == 1
    assert "--calibration-blocks 4 calibrates --quantize, which was not given" in capsys.readouterr().err
    assert main(["generate", *args, "--draft", f"medusa:{dirs / 'medusa'}"]) == 1
    assert "--draft medusa reads the target's float LM head" in capsys.readouterr().err


def test_generate_takes_a_repetition_penalty(dirs, capsys):
    """`--repetition-penalty` is `generate`'s, with or without a draft; a penalty that is not > 0 is refused when
    parsed."""
    linear = lincompile.load(dirs / "lin")
    tokenizer = char_tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = tokenizer.decode(generate(linear, ids, 24, repetition_penalty=1.5)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    assert expected != tokenizer.decode(generate(linear, ids, 24)[0, ids.shape[1]:], skip_special_tokens=True)
    args = ["--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos", "--repetition-penalty", "1.5"]
    assert _generate(capsys, str(dirs / "lin"), *args)["text"] == expected
    assert _generate(capsys, str(dirs / "lin"), *args, "--draft", "prompt-lookup")["text"] == expected
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(dirs / "lin"), "--prompt", PROMPT, "--repetition-penalty", "0"])
    assert exit_info.value.code == 2 and "argument --repetition-penalty: must be > 0" in capsys.readouterr().err


def test_generate_streams_text_and_reads_stdin(dirs, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))  # as `echo` sends it: the newline is dropped
    from_stdin = _generate(capsys, str(dirs / "lin"), "--prompt", "-", "--max-new-tokens", "12", "--ignore-eos")
    json_text = _generate(capsys, str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "12",
                          "--ignore-eos")["text"]
    assert from_stdin["text"] == json_text and from_stdin["prompt_tokens"] == len(PROMPT)
    code = main(["generate", str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() == json_text.strip()
    assert "tokens/s after it" in err and "new tokens 12" in err and "first token after " in err


def test_generate_times_the_prefill_apart_from_the_decode(dirs, capsys):
    """`first_token_s` covers the prompt's prefill; `tokens_per_s` the tokens after the first, over the time after
    it, so the two add up to `seconds`."""
    for draft in ("none", "prompt-lookup"):
        out = _generate(capsys, str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "9", "--ignore-eos",
                        "--draft", draft)
        decode = out["seconds"] - out["first_token_s"]
        assert 0 < out["first_token_s"] < out["seconds"], draft
        slack = 0.0011  # both times are rounded to milliseconds
        assert 8 / (decode + slack) <= out["tokens_per_s"] <= 8 / max(decode - slack, 1e-6), draft
    one = _generate(capsys, str(dirs / "lin"), "--prompt", PROMPT, "--max-new-tokens", "1", "--ignore-eos")
    assert one["new_tokens"] == 1 and one["tokens_per_s"] is None  # no decode step was taken


def test_export_then_generate_in_onnxruntime(dirs, capsys):
    code = main(["export", str(dirs / "lin"), "--out", str(dirs / "onnx"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "augmented" and summary["tokenizer"] and summary["megabytes"] > 0
    assert summary["decode_step"] and summary["weights"] == "saved model"
    assert (dirs / "onnx" / "model.onnx").is_file() and not list(dirs.glob("*.tmp*"))
    args = ["--prompt", PROMPT, "--max-new-tokens", "16", "--ignore-eos"]
    torch_text = _generate(capsys, str(dirs / "lin"), *args)["text"]
    code = main(["generate", str(dirs / "onnx"), *args, "--draft", "prompt-lookup", "--json"])
    out, err = capsys.readouterr()
    ort = json.loads(out)
    assert code == 0 and ort["runtime"] == "onnxruntime" and ort["text"] == torch_text
    assert "untrained" not in err  # trained or not is unknown for a saved model: no warning
    assert main(["generate", str(dirs / "onnx"), "--method", "augmented", *args]) == 1
    assert "is an ONNX export" in capsys.readouterr().err
    assert main(["generate", str(dirs / "onnx"), "--quantize", "int8", *args]) == 1
    assert "drop --quantize (`lincompile export --quantize int8`" in capsys.readouterr().err
    assert main(["generate", str(dirs / "onnx"), *args, "--draft", f"medusa:{dirs / 'medusa'}"]) == 1
    assert "needs the PyTorch target" in capsys.readouterr().err
    (dirs / "notes").mkdir()
    (dirs / "notes" / "todo.txt").write_text("mine")
    assert main(["export", str(dirs / "lin"), "--out", str(dirs / "notes")]) == 1  # not an export: left alone
    assert "holds no lincompile_onnx.json" in capsys.readouterr().err
    assert [p.name for p in (dirs / "notes").iterdir()] == ["todo.txt"]


def test_export_with_chunks_in_the_graph_generates_the_same_text(dirs, capsys):
    assert main(["export", str(dirs / "lin"), "--out", str(dirs / "chunked"), "--chunk-size", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunk_size"] == 4
    args = ["--prompt", PROMPT, "--max-new-tokens", "8", "--ignore-eos"]
    assert len(PROMPT) > 4  # a character tokenizer: the prompt takes the chunked branch
    chunked = _generate(capsys, str(dirs / "chunked"), *args)["text"]
    assert chunked == _generate(capsys, str(dirs / "lin"), *args)["text"]
    assert main(["export", str(dirs / "lin"), "--out", str(dirs / "plain"), "--no-decode-step", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["decode_step"]
    assert _generate(capsys, str(dirs / "plain"), *args)["text"] == chunked
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(dirs / "lin"), "--out", str(dirs / "chunked"), "--chunk-size", "0"])
    assert exit_info.value.code == 2 and "--chunk-size" in capsys.readouterr().err


def test_export_with_8_bit_weights_generates(dirs, capsys):
    assert main(["export", str(dirs / "lin"), "--out", str(dirs / "int8"), "--quantize", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantize"] == "int8"
    result = _generate(capsys, str(dirs / "int8"), "--prompt", PROMPT, "--max-new-tokens", "6", "--ignore-eos")
    assert result["runtime"] == "onnxruntime" and result["new_tokens"] == 6


def test_exact_softmax_is_not_called_untrained(dirs, capsys):
    code = main(["generate", str(dirs / "hf"), "--method", "softmax", "--prompt", PROMPT, "--max-new-tokens", "2",
                 "--ignore-eos", "--json"])
    assert code == 0 and "untrained" not in capsys.readouterr().err


def test_generate_linearizes_a_hugging_face_model(dirs, capsys):
    code = main(["generate", str(dirs / "hf"), "--method", "linear-elu", "--prompt", PROMPT, "--max-new-tokens", "5",
                 "--ignore-eos", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["new_tokens"] == 5
    assert "linear-elu is untrained here" in err


def test_an_untrained_export_says_so_when_it_generates(dirs, capsys):
    """The export records whether trained tensors were loaded; generating from an untrained one warns, as the
    torch path does (exact softmax excepted)."""
    for method in ("linear-elu", "softmax"):
        out = dirs / f"untrained-{method}"
        assert main(["export", str(dirs / "hf"), "--method", method, "--out", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["weights"] == "none"
        assert json.loads((out / "lincompile_onnx.json").read_text())["trained"] is False
        code = main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "2", "--ignore-eos", "--json"])
        err = capsys.readouterr().err
        assert code == 0 and ("was exported untrained" in err) == (method != "softmax"), (method, err)


@pytest.mark.parametrize("argv, fragments", [
    (["{hf}", "--prompt", "x"], ["softmax model", "--method"]),
    (["{lin}", "--prompt", "x", "--draft", "bogus"], ["--draft 'bogus'", "ngram:DIR"]),
    (["{lin}", "--prompt", "x", "--draft", "ngram:{hf}"], ["ngram.json", "build-ngram"]),
    (["{lin}", "--prompt", "x", "--draft", "model:{hf}"], ["not a saved linearized model", "make-draft"]),
    (["{lin}", "--prompt", "x", "--weights", "default"], ["saved linearized model", "drop --method and --weights"]),
    (["{lin}", "--prompt", "x", "--method", "augmented"], ["saved linearized model"]),
    (["{hf}", "--prompt", "x", "--weights", "default"], ["--weights picks", "add --method"]),
    (["{lin}", "--prompt", "x", "--chat"], ["no chat template"]),
])
def test_generate_errors_are_one_line(dirs, capsys, argv, fragments):
    argv = [a.format(hf=dirs / "hf", lin=dirs / "lin") for a in argv]
    assert main(["generate", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1].startswith("lincompile: error:")
    for fragment in fragments:
        assert fragment in err.rstrip().splitlines()[-1], err


@pytest.mark.parametrize("option", ["--max-new-tokens", "--num-draft-tokens", "--threads"])
def test_generate_numbers_are_checked_when_parsed(dirs, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(dirs / "lin"), "--prompt", "x", option, "0"])
    assert exit_info.value.code == 2
    assert f"argument {option}" in (err := capsys.readouterr().err) and "must be >= 1, got 0" in err


def test_a_draft_longer_than_a_verify_call_scores_is_refused_when_parsed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "/no/such/model", "--prompt", "x", "--draft", "prompt-lookup", "-k", "64"])
    assert exit_info.value.code == 2
    assert "argument --num-draft-tokens/-k: must be < 64 (one verify call scores at most 64 tokens)" in (
        capsys.readouterr().err)


def test_draft_options_without_a_draft_are_refused_before_loading(capsys):
    for option in (["-k", "8"], ["--adaptive"]):
        assert main(["generate", "/no/such/model", "--prompt", "x", *option]) == 1
        assert "which --draft turns on: add --draft" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragments", [
    (["--temperature", "0.7"], ["--temperature only applies when sampling", "add --sample", "ignore it)"]),
    (["--top-k", "5", "--top-p", "0.9"], ["--top-k, --top-p only apply when", "add --sample", "ignore them)"]),
    (["--temperature", "1.0", "--seed", "5"], ["--temperature, --seed only apply when", "ignore them)"]),
])
def test_sampling_options_without_sample_are_refused_before_loading(capsys, argv, fragments):
    assert main(["generate", "/no/such/model", "--prompt", "x", *argv]) == 1
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err


def test_a_softmax_model_without_method_is_refused_before_loading(dirs, capsys, monkeypatch):
    def load_target(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lincompile.cli.serve_cmd.load_target", load_target)
    for model in (str(dirs / "hf"), "smollm2-135m"):
        assert main(["generate", model, "--prompt", "x"]) == 1
        assert f"{model} is a softmax model: add --method" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_refused_before_loading(capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates; the tokenizer would fail on them obscurely."""
    assert main(["generate", "/no/such/model", "--prompt", "To be \udcff or not"]) == 1
    assert "not valid UTF-8" in capsys.readouterr().err
