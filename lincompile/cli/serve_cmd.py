"""`lincompile export` and `lincompile generate`: the serving side from the command line.

export writes a linearized model as ONNX with recurrent-state inputs and outputs (atomically; what
`lincompile.OrtModel.from_dir` reads). generate writes text with a linearized model: in PyTorch, or in
onnxruntime when MODEL_OR_DIR is such an export, optionally with speculative decoding. Greedy output is the
same token for token with any draft (but for near-ties with 8-bit weights); a draft only changes how many target
calls it takes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lincompile.api import SAVE_FILE
from lincompile.cli.args import draft_tokens, given_flags, opset_type, positive_float, positive_int, probability
from lincompile.cli.draft_cmd import command_parser, load_target, weights_label
from lincompile.cli.evaluate import add_calibration_argument, check_calibration, quantize_calibrated
from lincompile.cli.summary import format_value, print_summary
from lincompile.diagnostics import warn
from lincompile.pretrained import trained

__all__ = ["add_parsers", "cmd_export", "cmd_generate", "parse_draft"]

PROG = "lincompile"
DRAFTS = "none, prompt-lookup, ngram:DIR, medusa:DIR or model:DIR"


_SOFTMAX_MODEL = ("{model} is a softmax model: add --method METHOD (augmented: the paper's method, with shipped "
                  "trained weights for smollm2-135m) or pass a saved linearized directory")


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _linearized(args: argparse.Namespace) -> tuple[Any, Any]:
    """(LinearizedModel, tokenizer or None) from MODEL_OR_DIR, --method and --weights."""
    from lincompile.assets import EMBEDDED_MODELS
    from lincompile.backends.eager import LinearizedModel

    path = Path(args.model).expanduser()
    saved = (path / SAVE_FILE).is_file()
    if saved and (args.method or args.weights != "auto"):
        raise ValueError(f"{args.model} is a saved linearized model, with its method and trained tensors; drop "
                         "--method and --weights")
    if (not saved and not args.method and args.weights == "auto"  # (load_target names --weights without --method)
            and (args.model in EMBEDDED_MODELS or (path / "config.json").is_file())):
        raise ValueError(_SOFTMAX_MODEL.format(model=args.model))  # before it loads
    _log(f"loading {args.model} ...")
    model, tokenizer = load_target(args.model, args.method, args.weights)
    if not isinstance(model, LinearizedModel):
        raise ValueError(_SOFTMAX_MODEL.format(model=args.model))
    if trained(model) is False and model.config.spec.kind != "softmax":  # exact softmax needs no training
        warn(f"{args.method} is untrained here (no shipped or given weights): expect poor text; train one with "
             "`lincompile train` and pass it as MODEL_OR_DIR")
    return model, tokenizer


def _export_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def cmd_export(args: argparse.Namespace) -> int:
    """Export MODEL_OR_DIR (linearized) to ONNX in --out and print a summary."""
    from lincompile.atomic import check_not_inside, check_replaceable
    from lincompile.backends.onnx import META_FILE, check_export_options, export_onnx

    check_export_options(args.opset, args.chunk_size, args.quantize)
    check_replaceable(args.out, META_FILE)
    check_not_inside(args.out, args.model)
    model, tokenizer = _linearized(args)
    _log(f"exporting to ONNX in {args.out} (SmolLM2-135M takes about a minute on 2 CPU cores) ...")
    start = time.perf_counter()
    out = export_onnx(model, args.out, opset=args.opset, tokenizer=tokenizer, optimize=args.optimize,
                      chunk_size=args.chunk_size, quantize=args.quantize, decode_step=args.decode_step,
                      simplify=args.simplify)
    meta = json.loads((out / META_FILE).read_text())
    summary = {"out": str(out), "method": model.config.spec.name, "weights": weights_label(model, args.weights),
               "tokenizer": tokenizer is not None,
               "chunk_size": meta["chunk_size"], "decode_step": meta["decode_step_sites"] > 0,
               "quantize": (meta["quantize"] or {}).get("scheme"),
               "seconds": round(time.perf_counter() - start, 1), "megabytes": round(_export_size(out) / 2**20, 1)}
    print_summary(summary, args.json)
    if not args.json:
        if not meta["supports_state"]:
            print(f"this export keeps no recurrent state (supports_state in {META_FILE}), so `{PROG} generate` "
                  "cannot decode with it: run it on whole sequences with lincompile.OrtModel")
        elif tokenizer is not None:
            print(f"run it: {PROG} generate {shlex.quote(str(out))} --prompt 'To be, or not to be'")
        else:
            print(f"no tokenizer was found beside {args.model}, so `{PROG} generate` cannot read text for this "
                  "export: save the model's tokenizer in its directory and export again, or feed token ids to "
                  "lincompile.OrtModel")
    return 0


def _target(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model to decode with, tokenizer, runtime): an ONNX export runs in onnxruntime, anything else in torch."""
    from lincompile.backends.onnx import META_FILE

    path = Path(args.model).expanduser()
    if (path / META_FILE).is_file():
        from lincompile.runtime.timing import open_ort

        if args.method or args.weights != "auto":
            raise ValueError(f"{path} is an ONNX export, linearized and trained when it was exported; drop --method "
                             "and --weights")
        if args.quantize:
            raise ValueError(f"{path} is an ONNX export, whose weights were fixed when it was exported; drop "
                             f"--quantize (`{PROG} export --quantize int8` writes an export with 8-bit weights)")
        model = open_ort(path, torch.get_num_threads(), cpu_only=False)
        if model.meta.get("trained") is False and any(m["kind"] != "softmax" for m in model.meta["methods"].values()):
            warn(f"{path} was exported untrained: expect poor text; export a trained model (--method with shipped "
                 f"weights, or a `{PROG} train` output)")
        if model.tokenizer is None:
            raise ValueError(f"{path} was exported without a tokenizer, so text cannot be encoded for it: export "
                             f"again from a model directory that holds its tokenizer (`{PROG} export` copies it), or "
                             "feed token ids to lincompile.OrtModel")
        return model, model.tokenizer, "onnxruntime"
    model, tokenizer = _linearized(args)
    if args.quantize:
        model = quantize_calibrated(model, args, tokenizer)
    return model, tokenizer, "torch"


def draft_kind(spec: str) -> tuple[str, Path | None]:
    """(kind, directory) of a --draft value; ValueError naming the accepted forms."""
    if spec in ("none", "prompt-lookup"):
        return spec, None
    kind, _, directory = spec.partition(":")
    if kind not in ("ngram", "medusa", "model") or not directory:
        raise ValueError(f"--draft {spec!r} is not a draft; use {DRAFTS}")
    return kind, Path(directory).expanduser()


def parse_draft(spec: str, target: Any, runtime: str) -> Any:
    """The `draft=` of generate that --draft names (None for 'none')."""
    kind, directory = draft_kind(spec)
    if kind == "none":
        return None
    if kind == "prompt-lookup":
        return kind
    if kind == "ngram":
        from lincompile.runtime.ngram import NgramTable

        return NgramTable.load(directory)
    if kind == "medusa":
        from lincompile.runtime.medusa import MedusaHeads, lm_head_weight

        if runtime != "torch":
            raise ValueError("--draft medusa:DIR needs the PyTorch target, whose lm_head the heads share: pass the "
                             "linearized model rather than its ONNX export")
        return MedusaHeads.load(directory, lm_head_weight(target))
    from lincompile.api import load

    if not (directory / SAVE_FILE).is_file():
        raise ValueError(f"--draft model:{directory}: not a saved linearized model (make one with `{PROG} make-draft`)")
    return load(directory)


def _prompt_text(args: argparse.Namespace) -> str:
    """--prompt, or standard input for '-' (without the one newline `echo` adds)."""
    text = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    if not text:
        raise ValueError("the prompt is empty; give --prompt TEXT (or - to read it from standard input)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # bytes that are not UTF-8 arrive as lone surrogates
        raise ValueError(f"the prompt is not valid UTF-8 (at character {error.start}); convert it first, e.g. "
                         "iconv -f latin1 -t utf-8") from None
    return text


def _prompt_ids(args: argparse.Namespace, text: str, tokenizer: Any) -> torch.Tensor:
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{args.model}'s tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt")
        return torch.as_tensor(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in newer HF
    return tokenizer(text, return_tensors="pt").input_ids


class _Clock:
    """A streamer that notes when the first new token arrives (the prompt's prefill is done then) and passes
    everything on to `inner` (or nowhere). Set `start` before generating."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.start, self.first_token, self._puts = inner, 0.0, 0.0, 0

    def put(self, ids: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2:  # the first put is the prompt
            self.first_token = time.perf_counter()
        if self.inner is not None:
            self.inner.put(ids)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def _check_sampling(args: argparse.Namespace) -> None:
    """Refuse sampling options given without --sample (greedy decoding would ignore them)."""
    given = given_flags({"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p,
                         "--seed": args.seed})
    if given and not args.sample:
        one = "," not in given
        raise ValueError(f"{given} only {'applies' if one else 'apply'} when sampling: add --sample "
                         f"(without it, decoding is greedy and would ignore {'it' if one else 'them'})")


#: generate's statistics in the stderr line, where the --json key alone would not say the unit
_STATS_TEXT = {"seconds": "{} s in all", "first_token_s": "first token after {} s",
               "tokens_per_s": "{} tokens/s after it", "num_draft_tokens": "k {}",
               "tokens_per_call": "{} tokens per target call"}


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate --max-new-tokens tokens after --prompt, streamed to stdout, then one line of statistics."""
    from transformers import TextStreamer

    from lincompile.runtime.generate import generate
    from lincompile.runtime.speculative import speculative_generate

    _check_sampling(args)
    kind = draft_kind(args.draft)[0]  # a misspelt --draft fails before the model loads
    if kind == "none" and (args.num_draft_tokens is not None or args.adaptive):
        raise ValueError("--num-draft-tokens and --adaptive set up speculative decoding, which --draft turns on: add "
                         "--draft (prompt-lookup needs no files)")
    check_calibration(args)
    if args.quantize and kind == "medusa":
        raise ValueError("--draft medusa reads the target's float LM head, which --quantize stores in 8 bits: drop "
                         "--quantize, or quantize in Python with LinearizedModel.quantize(skip=['lm_head'])")
    loaded_first = kind in ("ngram", "model")  # needing no target, so a bad DIR fails before the model loads too
    draft = parse_draft(args.draft, None, "torch") if loaded_first else None
    text = _prompt_text(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, runtime = _target(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; save one beside the model (tokenizer.save_pretrained)")
    if not loaded_first:
        draft = parse_draft(args.draft, model, runtime)
    ids = _prompt_ids(args, text, tokenizer)
    streamer = _Clock(None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    sampling = {"do_sample": args.sample, "temperature": 1.0 if args.temperature is None else args.temperature,
                "top_k": args.top_k, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
                "eos_token_id": None if args.ignore_eos else tokenizer.eos_token_id,
                "generator": torch.Generator().manual_seed(args.seed or 0), "streamer": streamer}
    streamer.start = time.perf_counter()
    if draft is None:
        out = generate(model, ids, args.max_new_tokens, **sampling)
    else:
        out, stats = speculative_generate(model, ids, args.max_new_tokens, draft, args.num_draft_tokens,
                                          adaptive=args.adaptive, **sampling)
    end = time.perf_counter()
    new = out[0, ids.shape[1]:]
    first = streamer.first_token - streamer.start
    summary = {"runtime": runtime, "draft": args.draft, "prompt_tokens": int(ids.shape[1]),
               "new_tokens": int(new.numel()), "seconds": round(end - streamer.start, 3),
               "first_token_s": round(first, 3),
               "tokens_per_s": round((new.numel() - 1) / (end - streamer.first_token), 2) if new.numel() > 1 else None}
    if draft is not None:  # new tokens / target calls after the prefill, as bench/speculative.py counts them
        summary["num_draft_tokens"] = stats.num_draft_tokens
        summary["tokens_per_call"] = round(stats.tokens_per_call, 2)
    if args.json:
        print(json.dumps({"text": tokenizer.decode(new, skip_special_tokens=True), **summary}))
    else:
        _log(", ".join(_STATS_TEXT.get(key, key.replace("_", " ") + " {}").format(format_value(value))
                       for key, value in summary.items()))
    return 0


def _model_arguments(p: argparse.ArgumentParser, onnx: bool) -> None:
    p.add_argument("model", metavar="MODEL_OR_DIR", help="an embedded model name or Hugging Face directory "
                   "(with --method), a saved linearized directory" + (", or an ONNX export" if onnx else ""))
    p.add_argument("--method", default=None, help="linearize a Hugging Face MODEL with this method first")
    p.add_argument("--weights", default="auto", help="with --method: the trained linearization to load: 'auto' "
                   "(shipped when there is one, else untrained), 'default', 'none', a directory written by "
                   "lincompile.pretrained.ship or a training checkpoint")


def add_parsers(sub: Any) -> None:
    """Register `export` and `generate` on the `lincompile` subparsers."""
    p = command_parser(
        sub, "export", cmd_export, "export a linearized model to ONNX with recurrent-state inputs/outputs",
        "Writes DIR/model.onnx, lincompile_onnx.json (method, state layout), the method parameters and the\n"
        "tokenizer, atomically (a failed export leaves DIR as it was; a non-empty DIR that is not an earlier\n"
        "export is refused, not replaced). One graph serves prefill, decode and multi-token verify;\n"
        "`lincompile generate DIR` and lincompile.OrtModel.from_dir(DIR) run it in onnxruntime.",
        [f"{PROG} export smollm2-135m --method augmented --out out/smol-onnx",
         f"{PROG} export smollm2-135m --method augmented --out out/smol-int8 --quantize int8",
         f"{PROG} export runs/aug/final --out runs/aug/onnx"])
    _model_arguments(p, onnx=False)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--opset", type=opset_type, default=None, help="ONNX opset (>= 18; default: torch.onnx's)")
    p.add_argument("--optimize", action="store_true", help="also run the onnxscript optimizer (about 3x fewer "
                   "nodes; slower export, no speedup under onnxruntime)")
    p.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="run calls longer than N tokens in chunks of N inside the graph (64 is the torch path's): "
                        "time and memory linear in a call's length, for callers who send long prompts to the "
                        "session in one call; the decode step gets slightly slower (an If per site: 2%% on "
                        "SmolLM2, see bench/onnx_decode_step.py). Default: each call in one piece (lincompile's "
                        "runners feed prompts in calls of 128 tokens then)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: every linear layer's weights in 8 bits (onnxruntime's MatMulNBits, blocks of 32, "
                        "int8 compute): about half the size and a faster CPU decode, onnxruntime only (see "
                        "bench/onnx_quantize.py for perplexity and speed). Default: float weights, standard ONNX")
    p.add_argument("--no-decode-step", dest="decode_step", action="store_false",
                   help="run one-token calls through each site's parallel form too. Default: causal linear sites "
                        "run a decode step through their recurrent form (on SmolLM2 a quarter as many nodes): a "
                        "faster decode step, and multi-token calls (prefill, speculative verify) as fast as "
                        "without it (see bench/onnx_decode_step.py)")
    p.add_argument("--no-simplify", dest="simplify", action="store_false",
                   help="keep the graph as torch.onnx wrote it. Default: share repeated constants and nodes and drop "
                        "no-op slices and unsqueeze/reshape chains, which onnxruntime leaves inside the sites' If "
                        "branches (exact: the same outputs bit for bit; see bench/onnx_decode_step.py)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p = command_parser(
        sub, "generate", cmd_generate, "generate text with a linearized model (PyTorch or onnxruntime)",
        "Streams the continuation of --prompt to stdout, then prints to stderr the time to the first new token\n"
        "(the prompt's prefill), the decode rate after it in tokens/s and, with a draft, tokens per target call.\n"
        "MODEL_OR_DIR may be an ONNX export (`lincompile export`), which then runs in onnxruntime. --draft\n"
        "turns on speculative decoding: greedy output stays the same token for token (an export with 8-bit\n"
        "weights can differ at near-ties); sampling keeps the target's distribution. Stops at the tokenizer's\n"
        "end-of-sequence token unless --ignore-eos.",
        [f"{PROG} generate smollm2-135m --method augmented --prompt 'ROMEO. ' --max-new-tokens 48",
         f"{PROG} generate out/smol-onnx --prompt 'ROMEO. ' --draft ngram:runs/ngram",
         f"{PROG} generate smollm2-135m --method augmented --prompt 'ROMEO. ' --quantize int8 --draft prompt-lookup",
         f"echo 'To be, or not' | {PROG} generate smollm2-135m --method augmented --prompt - --json"])
    _model_arguments(p, onnx=True)
    p.add_argument("--prompt", required=True, help="the text to continue ('-': read it from standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--draft", default="none", help=f"speculative draft: {DRAFTS} (an n-gram table from build-ngram, "
                   "heads from train-medusa, a draft model from make-draft; default none)")
    p.add_argument("--num-draft-tokens", "-k", type=draft_tokens, default=None,
                   help="drafted tokens per target call (default: 8 with prompt-lookup and ngram drafts, 4 with "
                   "medusa and model drafts)")
    p.add_argument("--adaptive", action="store_true", help="adapt the number of drafted tokens to the acceptance")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=None, help="with --sample (> 0, default 1.0)")
    p.add_argument("--top-k", type=positive_int, default=None, help="with --sample: keep the k likeliest tokens")
    p.add_argument("--top-p", type=probability, default=None, help="with --sample: nucleus sampling, in (0, 1]")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="> 1 discourages tokens already in the text, greedy or sampled (Hugging Face's; default "
                        "1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="with --sample: the sampling seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="PyTorch runtime: run the linear layers in 8 bits on the CPU (LinearizedModel.quantize; "
                        "int8 weights, activations per token; see bench/torch_quantize.py for perplexity and speed)."
                        " Default: float weights")
    add_calibration_argument(p, "the default corpus's (Shakespeare's) training split")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch and onnxruntime (default: "
                   "torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and statistics) instead")
