"""Prefill and decode of SmolLM2-135M under onnxruntime: an export that runs each call in one piece against one
that runs calls past 64 tokens in chunks inside the graph (`export_onnx(chunk_size=64)`), side by side in one run.

Both exports come from the same linearized model (`lincompile.pretrained.linearized`, the shipped weights when
there are some) and run on onnxruntime's CPU provider with the same thread count. Measured, on a held-out
Shakespeare prompt:
  one call   the whole prompt of each `--contexts` length in a single call (what a caller of the raw session
             does), best of `--repeats`;
  calls of   the longest prompt fed by `lincompile.runtime.prefill` in calls of each `--call-sizes` length
             (`OrtModel.prefill_chunk_size` picks 128 for the unchunked export, 512 for the chunked one), best
             of `--repeats` rounds that each time every export and size once, taking turns;
  decode     the median greedy single-token step from the longest prompt's state, the two exports taking turns
             step by step for `--rounds` steps each (whether their greedy tokens agree is recorded).
The largest logit difference between the two exports is recorded beside each one-call row.

Writes bench/results/onnx_prefill_<machine>.json; prints the table and the command.
    python bench/onnx_prefill.py --threads 1                 # contexts 512 and 2K (about 4 minutes)
    python bench/onnx_prefill.py --contexts 256 --rounds 5   # a smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from lincompile.cli.args import positive_int
from lincompile.runtime.timing import alternate, best_time, linear_session, open_ort, report_bench, time_steps

RESULTS = Path(__file__).resolve().parent / "results"
FORMS = {"whole": None, "chunked": 64}  # form -> export_onnx(chunk_size=...)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, scratch: Path) -> dict:
    from lincompile.assets import load_model
    from lincompile.backends.onnx import export_onnx
    from lincompile.pretrained import linearized
    from lincompile.runtime.prefill import prefill
    from lincompile.train.data import heldout_blocks

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    longest = max(args.contexts)
    ids = heldout_blocks(tokenizer, block_size=longest, max_blocks=1)
    linear = linearized(model, args.method, weights="auto")
    runners = {}
    for form, chunk in FORMS.items():
        start = time.perf_counter()
        export_onnx(linear, scratch / form, chunk_size=chunk)
        _log(f"export ({form}) took {time.perf_counter() - start:.0f} s")
        runners[form] = open_ort(scratch / form, args.threads)
    for runner in runners.values():  # first calls allocate onnxruntime's buffers: not timed
        prefill(runner, ids[:, :min(longest, 2 * 64 + 1)], chunk_size=None)
    one_call = []
    for context in sorted(args.contexts):
        row: dict = {"context": context}
        logits = {}
        for form, runner in runners.items():
            row[f"s_{form}"], out = best_time(lambda: runner(ids[:, :context]), args.repeats)
            logits[form] = out.logits
        row["max_logit_difference"] = float((logits["whole"] - logits["chunked"]).abs().max())
        _log(f"one call of {context}: " + ", ".join(f"{f} {row[f's_{f}']:.2f} s" for f in runners))
        one_call.append(row)
    cases = {(form, size): runner for form, runner in runners.items() for size in args.call_sizes}
    best = dict.fromkeys(cases, float("inf"))
    for turn in range(args.repeats):  # every (export, call size) once per round, the order rotated each round
        for (form, size), runner in alternate(cases, turn):
            seconds = best_time(lambda: prefill(runner, ids, chunk_size=size), 1)[0]
            best[(form, size)] = min(best[(form, size)], seconds)
    calls = [{"form": form, "call_size": size, "s": seconds} for (form, size), seconds in best.items()]
    for row in calls:
        _log(f"{row['form']}: {longest} tokens in calls of {row['call_size']}: {row['s']:.2f} s")
    sessions = {form: linear_session(runner, *prefill(runner, ids)) for form, runner in runners.items()}
    timings = time_steps(sessions, warmup=2, rounds=args.rounds, steps=1)  # the forms take turns step by step
    decode = {f"ms_{form}": 1e3 / rate for form, rate in timings.tokens_per_s().items()}
    decode["greedy_tokens_agree"] = timings.tokens["whole"] == timings.tokens["chunked"]
    return {"one_call": one_call, "calls": calls, "decode": decode,
            "prefill_chunk_size": {form: runner.prefill_chunk_size for form, runner in runners.items()}}


def print_table(result: dict) -> None:
    print(f"{'one call of':>12}  {'whole s':>8}  {'chunked s':>9}  {'whole/chunked':>13}  max |logit diff|")
    for row in result["one_call"]:
        print(f"{row['context']:>12}  {row['s_whole']:>8.2f}  {row['s_chunked']:>9.2f}  "
              f"{row['s_whole'] / row['s_chunked']:>12.2f}x  {row['max_logit_difference']:.1e}")
    best = min(row["s"] for row in result["calls"] if row["form"] == "whole")
    print(f"\n{'form':>8}  {'call size':>9}  {'s':>6}  vs best whole")
    for row in result["calls"]:
        print(f"{row['form']:>8}  {row['call_size']:>9}  {row['s']:>6.2f}  {row['s'] / best:.2f}x")
    decode = result["decode"]
    print(f"\ndecode step: whole {decode['ms_whole']:.2f} ms, chunked {decode['ms_chunked']:.2f} ms "
          f"(chunked/whole {decode['ms_chunked'] / decode['ms_whole']:.3f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[512, 2048],
                        help="prompt lengths for the one-call rows (the longest also for the calls and decode)")
    parser.add_argument("--call-sizes", type=positive_int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="one-call and calls-of timings: best of this many")
    parser.add_argument("--rounds", type=positive_int, default=150,
                        help="decode: timed steps per form, the forms taking turns")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lincompile-bench-") as scratch:  # two exports, ~0.6 GB each
        result = run(args, Path(scratch))
    result.update({"method": args.method})
    return report_bench(result, args.out, "onnx_prefill", args.threads, argv, print_table)


if __name__ == "__main__":
    sys.exit(main())
