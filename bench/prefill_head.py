"""Prefill of SmolLM2-135M with the LM head on the last token only (`logits_to_keep=1`, what `prefill` asks for)
against the LM head on every token (what it computed before), side by side in one run, in PyTorch and onnxruntime.

Both modes run the same model: the linearized one (`lincompile.pretrained.linearized`, the shipped weights) and one
ONNX export of it, which takes `logits_index`. "every token" calls the same model through a wrapper that does not
take `logits_to_keep`, so `prefill` cannot ask for it. Each round times every (runtime, mode) once, the order
rotated each round; best of `--repeats`. The last token's logits of the two modes are compared.

Writes bench/results/prefill_head_<machine>.json; prints the table and the command.
    python bench/prefill_head.py --threads 1                  # prompts of 128, 512 and 2K tokens (about 5 minutes)
    python bench/prefill_head.py --contexts 128 --repeats 1   # a smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lincompile.cli.args import positive_int
from lincompile.runtime.timing import alternate, best_time, open_ort, report_bench

RESULTS = Path(__file__).resolve().parent / "results"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _every_token(model: Callable[..., Any]) -> Callable[..., Any]:
    """`model` behind a call that takes no `logits_to_keep`: prefill then computes every token's logits."""
    def call(input_ids, attention_mask=None, past_state=None, position_ids=None):
        return model(input_ids, attention_mask=attention_mask, past_state=past_state, position_ids=position_ids)
    call.prefill_chunk_size = getattr(model, "prefill_chunk_size", None) or 512
    return call


def run(args: argparse.Namespace, scratch: Path) -> dict:
    from lincompile.assets import load_model
    from lincompile.backends.onnx import export_onnx
    from lincompile.pretrained import linearized
    from lincompile.runtime.prefill import prefill
    from lincompile.train.data import heldout_blocks

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    ids = heldout_blocks(tokenizer, block_size=max(args.contexts), max_blocks=1)
    linear = linearized(model, args.method, weights="auto")
    start = time.perf_counter()
    export_onnx(linear, scratch / "onnx")
    _log(f"export took {time.perf_counter() - start:.0f} s")
    runner = open_ort(scratch / "onnx", args.threads)
    models = {"torch": linear, "onnxruntime": runner}
    cases = {(runtime, mode): (model if mode == "last token" else _every_token(model))
             for runtime, model in models.items() for mode in ("last token", "every token")}
    for call in cases.values():  # first calls allocate: not timed
        prefill(call, ids[:, :64])
    rows = []
    for context in sorted(args.contexts):
        best = dict.fromkeys(cases, float("inf"))
        logits = {}
        with torch.no_grad():
            for turn in range(args.repeats):
                for case, call in alternate(cases, turn):
                    seconds, out = best_time(lambda: prefill(call, ids[:, :context]), 1)
                    best[case] = min(best[case], seconds)
                    logits[case] = out.logits
        for runtime in models:
            last, every = best[(runtime, "last token")], best[(runtime, "every token")]
            difference = float((logits[(runtime, "last token")] - logits[(runtime, "every token")]).abs().max())
            rows.append({"runtime": runtime, "context": context, "s_last_token": last, "s_every_token": every,
                         "speedup": every / last, "max_logit_difference": difference})
            _log(f"{runtime} {context}: last token {last:.2f} s, every token {every:.2f} s ({every / last:.2f}x)")
    return {"rows": rows, "prefill_chunk_size": {runtime: getattr(m, "prefill_chunk_size", 512)
                                                 for runtime, m in models.items()}}


def print_table(result: dict) -> None:
    print(f"{'runtime':>12}  {'prompt':>6}  {'last token s':>12}  {'every token s':>13}  {'speedup':>7}  "
          "max |logit diff|")
    for row in result["rows"]:
        print(f"{row['runtime']:>12}  {row['context']:>6}  {row['s_last_token']:>12.3f}  {row['s_every_token']:>13.3f}"
              f"  {row['speedup']:>6.2f}x  {row['max_logit_difference']:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[128, 512, 2048],
                        help="prompt lengths, each prefilled in the runtime's default calls")
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--repeats", type=positive_int, default=3, help="best of this many rounds")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="torch and onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lincompile-bench-") as scratch:
        result = run(args, Path(scratch))
    result.update({"method": args.method})
    return report_bench(result, args.out, "prefill_head", args.threads, argv, print_table)


if __name__ == "__main__":
    sys.exit(main())
