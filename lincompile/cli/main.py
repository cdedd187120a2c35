"""The `lincompile` command line: list methods and passes, inspect attention sites, run the pass pipeline.

Errors print one line (`lincompile: error: ...`) and exit 1, and lincompile's warnings start with
`lincompile: warning:`; `--debug` shows the traceback too, and warnings in Python's form.
Progress of slow steps (model load, torch.export capture) goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from lincompile.api import UnrecognizedAttentionError, example_inputs, run_pipeline
from lincompile.assets import EMBEDDED_MODELS, load_model
from lincompile.capture.export import CapturedGraph
from lincompile.cli import draft_cmd, kernels_cmd, serve_cmd
from lincompile.cli.args import given_flags, nonnegative_int
from lincompile.cli.demo import add_demo_arguments, cmd_demo
from lincompile.cli.evaluate import add_eval_arguments, cmd_eval
from lincompile.cli.train_cmd import add_train_arguments, cmd_train
from lincompile.config import LinearizeConfig
from lincompile.diagnostics import LincompileWarning, warn
from lincompile.kernels.linear_attention.reference import init_state
from lincompile.methods.leakage import leakage_report
from lincompile.methods.spec import get_method, methods
from lincompile.passes.base import (PassContext, PassManager, PassResult, Verifier, check_dump_dir,
                                    registered_passes)
from lincompile.passes.detect_attention import AttentionSite
from lincompile.passes.pipeline import DEFAULT_PIPELINE, build_pipeline
from lincompile.runtime.state import default_positions, position_limit, position_padding
from lincompile.train.data import heldout_blocks

PROG = "lincompile"


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


# --- models and verification ------------------------------------------------------------------------

def load(name: str, attn_impl: str | None) -> tuple[torch.nn.Module, Any | None]:
    """(model, tokenizer); a local directory without tokenizer files gives tokenizer None."""
    _log(f"loading {name} ...")
    start = time.perf_counter()
    model, tokenizer = load_model(name, attn_implementation=attn_impl)
    _log(f"loaded {type(model).__name__} in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def verify_sample(model: torch.nn.Module, tokenizer: Any | None, batch: int = 2, seq: int = 64,
                  pad: int = 8) -> dict[str, object]:
    """Fixed inputs: held-out text (seeded random ids without a tokenizer), row 1 left-padded on `pad` tokens; `seq`
    tokens, or the model's position limit when shorter."""
    seq = min(seq, position_limit(model) or seq)
    pad = min(pad, seq - 1)
    sample = example_inputs(model, batch, seq, seed=0)
    ids = heldout_blocks(tokenizer, seq, batch).clone() if tokenizer is not None else sample["input_ids"]
    pad_id = getattr(tokenizer, "pad_token_id", None) or getattr(model.config, "pad_token_id", None) or 0
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = pad_id
    sample.update(input_ids=ids, attention_mask=mask)
    if "position_ids" in sample:  # numbered as the model numbers them itself (RoBERTa-style: after its pad id)
        sample["position_ids"] = default_positions(ids, 0, position_padding(model)).contiguous()
    return sample


def initial_states(ctx: PassContext, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The empty state for every state input that `linearize` added to the graph."""
    states: dict[str, torch.Tensor] = {}
    for r in ctx.rewritten:
        if r.state_inputs:
            site = ctx.sites[r.index]
            parts = init_state(r.spec, batch, site.kv_heads, site.head_dim, site.v_head_dim,
                               dtype=dtype)
            states.update(zip(r.state_inputs, parts))
    return states


def make_verifier(model: torch.nn.Module, sample: dict[str, object]) -> Verifier:
    """Compare the current graph's logits with the original model's on the sample's non-padded positions."""
    keep = sample["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**sample)[0][keep]
    scale = reference.abs().max().item() or 1.0
    dtype = next(model.parameters()).dtype

    def verify(ctx: PassContext) -> tuple[float, float]:
        values = {**sample, **initial_states(ctx, keep.shape[0], dtype)}
        missing = [n for n in ctx.captured.input_names if n not in values]
        if missing:
            raise ValueError(f"--verify has no value for graph inputs {missing}")
        with torch.no_grad():
            logits = ctx.gm(*[values[n] for n in ctx.captured.input_names])[0]
        diff = (logits[keep].float() - reference.float()).abs().max().item()
        return diff, diff / scale

    return verify


# --- optimize ---------------------------------------------------------------------------------------

class PipelineWatcher:
    """Hooks for run_pipeline: builds the verifier after capture, prints each pass (and its node diff)."""

    def __init__(self, model: torch.nn.Module, sample: dict[str, object] | None, print_between: bool,
                 stream: TextIO) -> None:
        self.model, self.sample, self.print_between, self.stream = model, sample, print_between, stream
        self.captured: CapturedGraph | None = None
        self.snapshot: Counter[str] = Counter()

    def _targets(self) -> Counter[str]:
        assert self.captured is not None
        return Counter(str(n.target) for n in self.captured.gm.graph.nodes)

    def attach(self, captured: CapturedGraph) -> Verifier | None:
        """verifier_factory: called once with the graph before any pass."""
        _log(f"captured in {captured.seconds:.1f} s ({len(captured.gm.graph.nodes)} nodes)")
        self.captured = captured
        self.snapshot = self._targets()
        if self.sample is None:
            return None
        _log("computing reference logits of the original model")
        return make_verifier(self.model, self.sample)

    def on_result(self, r: PassResult) -> None:
        diff = "" if r.max_abs_diff is None else f"  max_abs_diff={r.max_abs_diff:.3g}"
        print(f"{r.name:<18} {r.seconds:8.3f} s  {r.nodes_before:>6} -> {r.nodes_after:<6}{diff}  "
              f"{'; '.join(r.notes)}", file=self.stream, flush=True)
        if self.print_between:
            after = self._targets()
            added, removed = after - self.snapshot, self.snapshot - after
            for sign, counts in (("+", added), ("-", removed)):
                for target, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                    print(f"    {sign}{n:<5} {target}", file=self.stream)
            if not added and not removed:
                print("    (no node changes)", file=self.stream)
            self.snapshot = after


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _pass_list(text: str) -> list[str]:
    """--passes: at least one pass name (an empty list would silently run the default pipeline)."""
    names = _csv(text)
    if not names:
        raise argparse.ArgumentTypeError(f"names no pass: {text!r}; list them comma-separated (`{PROG} passes`)")
    return names


def _site_list(text: str) -> tuple[int, ...]:
    """--layers: at least one site index (an empty list would silently keep every site exact softmax)."""
    try:
        sites = tuple(int(part) for part in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sites:
        raise argparse.ArgumentTypeError(f"names no site: {text!r}; omit --layers to convert every site")
    return sites


def cmd_optimize(args: argparse.Namespace) -> int:
    """Run the pipeline pass by pass and report timings, node counts and (with --verify) output drift."""
    config = LinearizeConfig(method=args.method, layers=args.layers, fuel=args.fuel, strict=args.strict)
    names = tuple(args.passes) if args.passes else DEFAULT_PIPELINE
    disabled = frozenset(name for item in args.disable for name in _csv(item))
    PassManager(build_pipeline(config, names), disabled, args.stop_after)  # validate names before the slow load
    reached = names[:names.index(args.stop_after) + 1] if args.stop_after in names else names
    if "linearize" not in reached or "linearize" in disabled:
        ignored = given_flags({"--layers": args.layers, "--fuel": args.fuel})
        if ignored:
            raise ValueError(f"{ignored} choose what the linearize pass rewrites, and this run does not "
                             "run it: drop them, or run linearize")
    if args.strict and ("detect_attention" not in reached or "detect_attention" in disabled):
        raise ValueError("--strict fails on attention the detect_attention pass does not recognize, and this run "
                         "does not run it: drop --strict, or run detect_attention")
    if args.dump_dir is not None:
        check_dump_dir(args.dump_dir)  # and a user's directory
    model, tokenizer = load(args.model, args.attn_impl)
    sample = verify_sample(model, tokenizer) if args.verify else None
    stream = sys.stderr if args.json else sys.stdout
    watcher = PipelineWatcher(model, sample, args.print_between, stream)
    _log(f"capturing {args.model} (torch.export) ...")
    ctx, report = run_pipeline(model, config, names=names, disabled=disabled, stop_after=args.stop_after,
                               dump_dir=args.dump_dir, verifier_factory=watcher.attach, on_result=watcher.on_result)
    unmatched = [str(u) for u in report.unmatched]
    if unmatched and config.strict:
        raise UnrecognizedAttentionError("attention-like softmax not recognized: " + "; ".join(unmatched))
    for u in unmatched:
        warn(f"attention-like softmax not recognized, left unchanged: {u}")
    final = report.passes[-1] if report.passes else None
    if args.json:
        print(json.dumps({"model": args.model, "method": get_method(config.method).name, **report.to_dict(),
                          "sites_rewritten": len(ctx.rewritten),
                          "max_abs_diff": final.max_abs_diff if final else None,
                          "max_rel_diff": final.max_rel_diff if final else None}))
        return 0
    print(f"sites_found={len(report.sites)} sites_rewritten={len(ctx.rewritten)} unmatched={len(unmatched)}")
    if final is not None and final.max_abs_diff is not None:
        print(f"final max_abs_diff={final.max_abs_diff:.3g} max_rel_diff={final.max_rel_diff:.3g}")
    if args.dump_dir is not None:
        print(f"graphs dumped to {args.dump_dir}")
    return 0


# --- inspect, methods, passes -----------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in [headers, ["-" * w for w in widths], *rows])


def _site_row(s: AttentionSite) -> list[str]:
    flags = ",".join(flag for flag, on in (
        ("causal", s.causal), ("cross", s.cross), (f"window={s.window}", s.window is not None),
        (f"softcap={s.softcap:g}", bool(s.softcap)), ("sinks", s.sinks is not None)) if on) or "-"
    return [str(s.index), s.path, s.form, str(s.heads), str(s.kv_heads), str(s.head_dim), f"{s.scale:.4g}",
            s.mask_kind, flags]


def cmd_inspect(args: argparse.Namespace) -> int:
    """Capture the model and list what the detector finds."""
    model, _ = load(args.model, args.attn_impl)
    _log(f"capturing {args.model} (torch.export) ...")
    _, report = run_pipeline(model, LinearizeConfig(method="softmax"), names=("normalize", "detect_attention"))
    unmatched = [str(u) for u in report.unmatched]
    if args.json:
        print(json.dumps({"model": args.model, "sites": [s.to_dict() for s in report.sites],
                          "unmatched": unmatched}))
        return 0
    headers = ["#", "path", "form", "heads", "kv", "head_dim", "scale", "mask", "flags"]
    print(_table(headers, [_site_row(s) for s in report.sites]))
    print(f"{len(report.sites)} attention sites; {len(unmatched)} unmatched attention-like softmax")
    for u in unmatched:
        print(f"  unmatched: {u}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """One line per registered method."""
    names = methods()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {get_method(name).description}")
    return 0


def cmd_leakage(args: argparse.Namespace) -> int:
    """Per method: does the output at t change when tokens after t change? (the paper's leakage check)"""
    results = leakage_report(args.methods or None, seed=args.seed)
    if args.json:
        print(json.dumps([{"method": r.name, "leaks": r.leaks, "max_change": r.max_change} for r in results]))
        return 0
    width = max(len(r.name) for r in results)
    for r in results:
        verdict = "LEAKS (uses future tokens)" if r.leaks else "causal"
        use = "" if get_method(r.name).causal_safe else "  (expected: not a causal method, see `methods`)"
        print(f"{r.name:<{width}}  {verdict:<26}  max change at <= t: {r.max_change:.3g}{use}")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    """One line per registered pass (the default pipeline order first)."""
    known = registered_passes()
    order = list(DEFAULT_PIPELINE) + sorted(set(known) - set(DEFAULT_PIPELINE))
    width = max(map(len, order))
    for name in order:
        default = "*" if name in DEFAULT_PIPELINE else " "
        print(f"{default} {name:<{width}}  {known[name].description}")
    print(f"(* = default pipeline: {','.join(DEFAULT_PIPELINE)})")
    return 0


# --- parser -----------------------------------------------------------------------------------------

def _subcommand(sub: Any, name: str, func: Callable[[argparse.Namespace], int], summary: str,
                description: str, example: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=f"{summary}\n\n{description}",
                            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on error, and warnings in Python's form")
    parser.set_defaults(func=func)
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help=f"embedded model name ({', '.join(EMBEDDED_MODELS)}) or a local Hugging Face directory")
    parser.add_argument("--attn-impl", choices=("sdpa", "eager"), default=None,
                        help="attention implementation to load the model with (default: the model's own)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="Turn softmax-attention transformers into "
                                     "linear-attention models with torch.export graph passes.")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show tracebacks on error, and warnings in Python's form")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _subcommand(sub, "methods", cmd_methods, "list the registered attention methods",
                "Each method is a MethodSpec usable as `optimize --method NAME`.", f"{PROG} methods")
    _subcommand(sub, "passes", cmd_passes, "list the registered graph passes",
                "Names usable with `optimize --passes/--disable/--stop-after`.", f"{PROG} passes")
    p = _subcommand(sub, "leakage", cmd_leakage, "check every method for information leakage from future tokens",
                    "Perturbs the tokens after position t (random inputs, nonzero parameters) and reports whether\n"
                    "any output at <= t changes. The centered DWConv leaks; the masked (causal) one must not.",
                    f"{PROG} leakage augmented augmented-centered")
    p.add_argument("methods", nargs="*", metavar="METHOD", help="methods to check (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random inputs and parameters seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p = _subcommand(sub, "inspect", cmd_inspect, "list the attention sites the detector finds in a model",
                    "Captures MODEL with torch.export, runs normalize + detect_attention and prints one row per\n"
                    "site, then any softmax that looks like attention but matched no pattern.",
                    f"{PROG} inspect smollm2-135m --attn-impl eager")
    _model_args(p)
    p = _subcommand(sub, "optimize", cmd_optimize, "run the linearization pipeline pass by pass",
                    "Captures MODEL, runs the pass pipeline and prints one line per pass (seconds,\n"
                    "nodes before -> after, notes). --verify compares the logits after every pass with\n"
                    "the original model's on 2 x 64 held-out tokens (row 1 left-padded on 8 tokens).",
                    f"{PROG} optimize smollm2-135m --method softmax --verify --stop-after linearize")
    _model_args(p)
    p.add_argument("--method", required=True, help=f"attention method (one of: {', '.join(methods())})")
    p.add_argument("--layers", type=_site_list, default=None, metavar="I,J,...",
                   help="site indices to convert (default: all); the others become exact softmax")
    p.add_argument("--strict", action="store_true", help="fail if an attention-like softmax matched no pattern")
    p.add_argument("--verify", action="store_true", help="report the max logit difference after every pass")
    p.add_argument("--passes", type=_pass_list, default=None, metavar="A,B,...",
                   help=f"pipeline to run instead of the default ({','.join(DEFAULT_PIPELINE)})")
    p.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="skip this pass (repeatable, or a comma-separated list)")
    p.add_argument("--stop-after", default=None, metavar="PASS", help="end the pipeline after this pass")
    p.add_argument("--print-between", action="store_true",
                   help="after each pass print the node targets it added (+) and removed (-)")
    p.add_argument("--dump-dir", type=Path, default=None, metavar="DIR",
                   help="write the graph code before the first pass and after each pass into DIR, plus DOT and SVG "
                        "pictures of every attention site before and after rewriting (DIR/sites); DIR must be new, "
                        "empty or a previous dump's (holding lincompile_dump.json)")
    p.add_argument("--fuel", type=nonnegative_int, default=None, metavar="N",
                   help="rewrite at most N sites (for bisecting)")
    p = _subcommand(sub, "eval", cmd_eval, "held-out perplexity of a linearized model and of the original",
                    "Scores the same fixed held-out token blocks with both models and prints the ratio.",
                    f"{PROG} eval smollm2-135m --method linear-elu --max-blocks 8 --json")
    add_eval_arguments(p)
    p = _subcommand(sub, "train", cmd_train, "train a linearized model: attention transfer, then LoRA/full fine-tuning",
                    "Stage 1 fits each site's new attention parameters to the exact softmax output of the same q/k/v;\n"
                    "stage 2 fine-tunes on next-token loss. Checkpoints in OUT/checkpoints are atomic (--resume\n"
                    "continues); the model goes to OUT/final with LoRA merged. Under torchrun it trains data-parallel.",
                    f"{PROG} train smollm2-135m --method augmented --out runs/augmented --stage1-steps 100 "
                    "--stage2-steps 200")
    add_train_arguments(p)
    p = _subcommand(sub, "demo", cmd_demo, "the main job on the embedded default, end to end",
                    "Loads SmolLM2-135M, inspects it, linearizes it (augmented, with the shipped trained weights),\n"
                    "compiles it, exports it to ONNX and runs it in onnxruntime, generates with speculative\n"
                    "decoding, and prints one table: perplexity, decode tokens/s at 512 and 8K tokens of context\n"
                    "(eager, torch.compile, onnxruntime vs the HF original), tokens per target call, and state\n"
                    "memory against the KV cache. About 2 minutes on 2 CPU cores (the ONNX export and Inductor\n"
                    "take about half). --out must be new, empty, or an earlier demo's directory.",
                    f"{PROG} demo --out out/demo")
    add_demo_arguments(p)
    serve_cmd.add_parsers(sub)
    draft_cmd.add_parsers(sub)
    kernels_cmd.add_parser(sub)
    return parser


def _one_line_warnings(python_form: Callable[..., None]) -> Callable[..., None]:
    """A `warnings.showwarning` printing lincompile's own warnings (`LincompileWarning`) as `lincompile: warning:
    ...`, as errors are; other libraries' keep `python_form`."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
             line: str | None = None) -> None:
        if not issubclass(category, LincompileWarning):
            python_form(message, category, filename, lineno, file, line)
            return
        print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file, flush=True)
    return show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lincompile` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # --debug keeps Python's form (file, line and source)
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return args.func(args)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except BrokenPipeError as exc:
        if not _stdout_closed():  # another pipe (a subprocess's, a socket): an error as any other
            return _report(exc, args.debug)
        return 141  # the reader went away (`lincompile methods | head -1`): nothing left to say
    except Exception as exc:
        return _report(exc, args.debug)


def _report(exc: BaseException, debug: bool) -> int:
    """Print the error (with its traceback under --debug); the exit code of a failed command."""
    if debug:
        traceback.print_exception(exc)
    print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
    return 1


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it); if so, stdout is pointed at
    /dev/null so that the flush at exit does not fail again."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        return True
    except (OSError, ValueError, AttributeError):  # a stdout with no file (captured), or no poll here
        return False


if __name__ == "__main__":
    sys.exit(main())
