"""SmolLM2-135M under onnxruntime in several export layouts side by side in one run (with and without the decode
step's own site form, `export_onnx(decode_step=...)`, or the graph simplification, `simplify=...`): decode step,
a speculative verify call, prefill, and the logits.

Every export comes from the same linearized model (`lincompile.pretrained.linearized`, the shipped weights when
there are some) and runs on onnxruntime's CPU provider with the same thread count (`--forms`, default the first
three; ratios are against `--baseline`, default the first form):
  parallel     every call through each site's parallel form (`decode_step=False`);
  step         one-token calls through the recurrent form, other calls through the parallel one, the two forms
               in the branches of one `If` per site (the default export);
  step+chunks  the same with calls longer than 64 tokens in chunks inside the graph (`chunk_size=64`), whose
               `If` a decode step no longer reaches;
  unsimplified `step` as torch.onnx wrote it (`simplify=False`): no shared constants or repeated nodes.
`--quantize int8` exports every form with 8-bit weights.
Measured:
  prefill   `--context` held-out tokens through `lincompile.runtime.prefill` in calls of `--prefill-chunk`, and
            one call of `--prefill-chunk` tokens: best of 3 each (what a call of several tokens pays for running
            its nodes inside a branch);
  verify    the median call of `--verify` tokens after that prompt (a speculative verify of `--verify` - 1
            drafts), the exports taking turns call by call for `--rounds` / 5 calls each;
  decode    the median greedy single-token step after that prompt, the exports taking turns step by step for
            `--rounds` steps each (the order rotated each round, `time_steps`); how many greedy tokens
            agree, and the first step's largest logit difference;
  nodes     how many nodes a one-token call runs: the main graph's once onnxruntime has optimized it (an `If`
            counts one; the branch it does not take runs none, the Identity branch it takes is not counted).

Writes bench/results/onnx_decode_step[_<tag>]_<machine>.json; prints the table and the command.
    python bench/onnx_decode_step.py --threads 1        # about 7 minutes
    python bench/onnx_decode_step.py --threads 1 --forms unsimplified step --tag simplify
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lincompile.cli.args import positive_int
from lincompile.runtime.timing import (alternate, best_time, first_difference, linear_session, open_ort, report_bench,
                                       time_steps)

RESULTS = Path(__file__).resolve().parent / "results"
FORMS = {"parallel": {"decode_step": False}, "step": {}, "step+chunks": {"chunk_size": 64},
         "unsimplified": {"simplify": False}}  # -> export_onnx


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def decode_nodes(directory: Path, threads: int) -> int:
    """Nodes in the main graph of the export in `directory` after onnxruntime's optimizations."""
    import onnx
    import onnxruntime as ort

    from lincompile.backends.onnx import MODEL_FILE

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    options.optimized_model_filepath = str(directory / "optimized.onnx")
    ort.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    nodes = len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)
    for written in directory.glob("optimized.onnx*"):
        written.unlink()
    return nodes


def time_calls(runners: dict[str, Any], states: dict[str, Any], ids: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds of one call of `ids` from each form's state (left as it was), the forms taking turns (the
    order rotated each round, as `time_steps`)."""
    times: dict[str, list[float]] = {form: [] for form in runners}
    for turn in range(rounds):
        for form, runner in alternate(runners, turn):
            start = time.perf_counter()
            runner(ids, past_state=states[form])
            times[form].append(time.perf_counter() - start)
    return {form: statistics.median(values) for form, values in times.items()}


def run(args: argparse.Namespace, scratch: Path) -> dict:
    from lincompile.assets import load_model
    from lincompile.backends.onnx import export_onnx
    from lincompile.pretrained import linearized
    from lincompile.runtime.prefill import prefill
    from lincompile.train.data import heldout_blocks

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    prompt = heldout_blocks(tokenizer, args.context, 1)
    linear = linearized(model, args.method, weights="auto")
    runners, rows = {}, {}
    for form in args.forms:
        start = time.perf_counter()
        export_onnx(linear, scratch / form, quantize=args.quantize, **FORMS[form])
        rows[form] = {"export_s": time.perf_counter() - start, "decode_nodes": decode_nodes(scratch / form, 1)}
        _log(f"export ({form}) took {rows[form]['export_s']:.0f} s; a decode step runs {rows[form]['decode_nodes']} "
             "nodes")
        runners[form] = open_ort(scratch / form, args.threads)
    sessions, first_step, prompt_states = {}, {}, {}
    for form, runner in runners.items():
        rows[form]["prefill_call_s"], _ = best_time(lambda: runner(prompt[:, :args.prefill_chunk]), 3)
        rows[form]["prefill_s"], filled = best_time(
            lambda: prefill(runner, prompt, chunk_size=args.prefill_chunk), 3)
        first_step[form] = linear_session(runner, filled.logits, filled.state, filled.next_position_ids)()
        sessions[form] = linear_session(runner, filled.logits, filled.state, filled.next_position_ids)
        prompt_states[form] = filled.state
    verify = time_calls(runners, prompt_states, prompt[:, :args.verify], max(args.rounds // 5, 3))
    timings = time_steps(sessions, warmup=2, rounds=args.rounds, steps=1)  # the forms take turns step by step
    for form, rate in timings.tokens_per_s().items():
        rows[form]["decode_ms"] = 1e3 / rate
        rows[form]["verify_ms"] = 1e3 * verify[form]
    base = args.baseline
    for form in args.forms:
        agree = timings.agreement(base, form)
        rows[form]["greedy_steps_agreeing"] = f"{agree['same']} of {agree['steps']}"
        rows[form]["greedy_tokens_same_until"] = agree["same_until"]
        rows[form]["first_step_max_abs_logit_diff"] = (first_step[form] - first_step[base]).abs().max().item()
    return {"forms": rows, "baseline": base, "quantize": args.quantize, "context": int(prompt.shape[1]),
            "prefill_chunk": args.prefill_chunk, "verify_tokens": args.verify}


def print_table(result: dict) -> None:
    rows = result["forms"]
    name = result.get("baseline", "parallel")  # files written before --baseline compared with parallel
    base = rows[name]
    chunk, context = result["prefill_chunk"], result["context"]
    print(f"{'':>24}" + "".join(f"  {form:>18}" for form in rows))
    lines = [("decode ms", "decode_ms", True), (f"verify ms, {result['verify_tokens']} tokens", "verify_ms", True),
             (f"prefill s, {chunk} tokens", "prefill_call_s", False),
             (f"prefill s, {context} tokens", "prefill_s", False)]
    for label, key, faster in lines:
        cells = [f"{row[key]:.3f}" + ("" if row is base else f" ({base[key] / row[key]:.2f}x)" if faster
                                       else f" ({row[key] / base[key]:.2f}x)") for row in rows.values()]
        print(f"{label:>24}" + "".join(f"  {cell:>18}" for cell in cells))
    print(f"{'nodes a decode step runs':>24}" + "".join(f"  {row['decode_nodes']:>18}" for row in rows.values()))
    print(f"(decode, verify: ratio = times faster than {name}; prefill: ratio = times {name}'s time; the "
          f"{context}-token prompt in calls of {chunk}" + (f"; {result['quantize']} weights" if result.get("quantize")
                                                           else "") + ")")
    for form, row in rows.items():
        if row is not base:
            print(f"{form}: greedy steps agreeing with {name} {row['greedy_steps_agreeing']} "
                  f"({first_difference(row['greedy_tokens_same_until'])}); first step's logits "
                  f"differ by at most {row['first_step_max_abs_logit_diff']:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--context", type=positive_int, default=512, help="prompt tokens before decoding")
    parser.add_argument("--prefill-chunk", type=positive_int, default=128, help="prompt tokens per call")
    parser.add_argument("--verify", type=positive_int, default=9,
                        help="tokens per verify call (drafts + 1; bench/speculative.py's k = 8 verifies 9)")
    parser.add_argument("--rounds", type=positive_int, default=150,
                        help="decode: timed steps per form, the forms taking turns (verify: a fifth as many calls)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="onnxruntime intra-op threads")
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=["parallel", "step", "step+chunks"],
                        help="the export layouts to compare (default: parallel step step+chunks)")
    parser.add_argument("--baseline", choices=list(FORMS), default=None,
                        help="the form the ratios are against (default: the first of --forms)")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="export every form with 8-bit weights")
    parser.add_argument("--tag", default="", help="suffix of the result file (onnx_decode_step[_<tag>]_<machine>)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.verify > args.context:
        parser.error(f"--verify {args.verify} is longer than --context {args.context}, which it is taken from")
    if len(set(args.forms)) != len(args.forms):
        parser.error("--forms names a form twice")
    args.baseline = args.baseline or args.forms[0]
    if args.baseline not in args.forms:
        parser.error(f"--baseline {args.baseline} is not one of --forms {' '.join(args.forms)}")
    with tempfile.TemporaryDirectory(prefix="lincompile-bench-") as scratch:
        result = run(args, Path(scratch))
    result["method"] = args.method
    stem = "onnx_decode_step" + (f"_{args.tag}" if args.tag else "")
    return report_bench(result, args.out, stem, args.threads, argv, print_table)


if __name__ == "__main__":
    sys.exit(main())
