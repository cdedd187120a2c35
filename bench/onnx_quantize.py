"""SmolLM2-135M under onnxruntime with float weights against 8-bit weights (`export_onnx(quantize="int8")`), side
by side in one run: held-out perplexity, decode step, a one-call prefill and the size on disk.

Both exports come from the same linearized model (`lincompile.pretrained.linearized`, the shipped weights when
there are some) and run on onnxruntime's CPU provider with the same thread count:
  perplexity  the held-out blocks `lincompile eval` scores (`--max-blocks` x `--block-size` tokens);
  prefill     one call over the first `--prefill` tokens of a held-out block, best of 3;
  decode      the median greedy single-token step after that prompt, the two exports taking turns step by step
              for `--rounds` steps each (how many greedy tokens agree is recorded).

Writes bench/results/onnx_quantize_<machine>.json; prints the table and the command.
    python bench/onnx_quantize.py --threads 1        # about 4 minutes
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from lincompile.cli.args import positive_int
from lincompile.runtime.timing import best_time, linear_session, open_ort, report_bench, time_steps

RESULTS = Path(__file__).resolve().parent / "results"
FORMS = {"float": None, "int8": "int8"}  # form -> export_onnx(quantize=...)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, scratch: Path) -> dict:
    from lincompile.assets import load_model
    from lincompile.backends.onnx import MODEL_FILE, export_onnx
    from lincompile.pretrained import linearized
    from lincompile.train.data import heldout_blocks
    from lincompile.train.eval import perplexity

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    blocks = heldout_blocks(tokenizer, args.block_size, args.max_blocks)
    linear = linearized(model, args.method, weights="auto")
    runners, rows = {}, {}
    for form, scheme in FORMS.items():
        start = time.perf_counter()
        export_onnx(linear, scratch / form, quantize=scheme)
        _log(f"export ({form}) took {time.perf_counter() - start:.0f} s")
        runners[form] = open_ort(scratch / form, args.threads)
        rows[form] = {"megabytes": (scratch / form / MODEL_FILE).stat().st_size / 2**20}
    for form, runner in runners.items():
        rows[form]["ppl"] = perplexity(runner, blocks, progress=False).ppl
        _log(f"{form}: perplexity {rows[form]['ppl']:.3f}")
    prompt = blocks[:1, :args.prefill]
    sessions = {}
    for form, runner in runners.items():
        rows[form]["prefill_s"], out = best_time(lambda: runner(prompt), 3)
        position = torch.tensor([[prompt.shape[1]]])
        sessions[form] = linear_session(runner, out.logits[:, -1], out.past_state, position)
    timings = time_steps(sessions, warmup=2, rounds=args.rounds, steps=1)  # the forms take turns step by step
    for form, rate in timings.tokens_per_s().items():
        rows[form]["decode_ms"] = 1e3 / rate
    agree = timings.agreement("float", "int8")
    return {"forms": rows, "tokens_scored": int(blocks[:, 1:].numel()), "prefill_tokens": int(prompt.shape[1]),
            "greedy_steps_agreeing": f"{agree['same']} of {agree['steps']}",
            "greedy_tokens_same_until": agree["same_until"]}


def print_table(result: dict) -> None:
    rows = result["forms"]
    base, quant = rows["float"], rows["int8"]
    print(f"{'':>14}  {'float':>9}  {'int8':>9}  int8 vs float")
    print(f"{'perplexity':>14}  {base['ppl']:>9.3f}  {quant['ppl']:>9.3f}  {quant['ppl'] / base['ppl']:.4f}x")
    print(f"{'decode ms':>14}  {base['decode_ms']:>9.2f}  {quant['decode_ms']:>9.2f}  "
          f"{base['decode_ms'] / quant['decode_ms']:.2f}x faster")
    print(f"{'prefill s':>14}  {base['prefill_s']:>9.3f}  {quant['prefill_s']:>9.3f}  "
          f"{base['prefill_s'] / quant['prefill_s']:.2f}x faster ({result['prefill_tokens']} tokens, one call)")
    print(f"{'model.onnx MiB':>14}  {base['megabytes']:>9.0f}  {quant['megabytes']:>9.0f}  "
          f"{quant['megabytes'] / base['megabytes']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--block-size", type=positive_int, default=256)
    parser.add_argument("--max-blocks", type=positive_int, default=16)
    parser.add_argument("--prefill", type=positive_int, default=128, help="prompt tokens (one call)")
    parser.add_argument("--rounds", type=positive_int, default=150,
                        help="decode: timed steps per form, the forms taking turns")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lincompile-bench-") as scratch:
        result = run(args, Path(scratch))
    result.update({"method": args.method, "block_size": args.block_size, "blocks": args.max_blocks})
    return report_bench(result, args.out, "onnx_quantize", args.threads, argv, print_table)


if __name__ == "__main__":
    sys.exit(main())
