"""SmolLM2-135M in PyTorch with float linear layers against 8-bit ones (`LinearizedModel.quantize("int8")`), and
the Hugging Face original with its KV cache, side by side in one run: held-out perplexity, decode step, a
speculative-decoding verify call, a one-call prefill and the weights' size.

Both linearized models are the same `lincompile.pretrained.linearized` model (the shipped weights when there are
some), eager PyTorch, the same thread count; the 8-bit one calibrated on `--calibration-blocks` blocks of 256
tokens of the training split (its projections' inputs smoothed, as `lincompile generate/eval --quantize` do;
0: not smoothed):
  perplexity  the held-out blocks `lincompile eval` scores (`--max-blocks` x `--block-size` tokens), the
              original's too;
  decode      the median greedy single-token step after a `--context`-token held-out prompt, the three engines
              taking turns step by step for `--rounds` steps each (how many greedy tokens agree is recorded);
  verify      the median call of `--verify` tokens from that state (what a speculative-decoding
              target call costs), the two linearized models taking turns;
  prefill     one call over the first `--prefill` tokens of the prompt, best of 3.

Writes bench/results/torch_quantize_<machine>.json; prints the table and the command.
    python bench/torch_quantize.py --threads 1        # about 4 minutes
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lincompile.cli.args import nonnegative_int, positive_int
from lincompile.train.data import CALIBRATION_BLOCKS
from lincompile.runtime.timing import (HFCache, best_time, first_difference, linear_session, report_bench,
                                       time_steps)

RESULTS = Path(__file__).resolve().parent / "results"
FORMS = ("float", "int8")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def weight_megabytes(model: torch.nn.Module) -> float:
    """MiB of a linearized model's parameters and buffers (a tensor shared by two names counted once)."""
    tensors = {t.data_ptr(): t for t in [*model.graph.parameters(), *model.graph.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def run(args: argparse.Namespace) -> dict:
    from lincompile.assets import load_model
    from lincompile.pretrained import linearized
    from lincompile.runtime.prefill import prefill
    from lincompile.train.data import calibration_blocks, heldout_blocks
    from lincompile.train.eval import perplexity

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    blocks = heldout_blocks(tokenizer, args.block_size, args.max_blocks)
    float_model = linearized(model, args.method, weights="auto")
    calibration = calibration_blocks(tokenizer, args.calibration_blocks) if args.calibration_blocks else None
    runners = {"float": float_model, "int8": float_model.quantize("int8", calibration=calibration)}
    rows: dict[str, dict] = {form: {"weights_mib": weight_megabytes(runner)} for form, runner in runners.items()}
    with torch.no_grad():
        original_ppl = perplexity(model, blocks, progress=False).ppl
        for form, runner in runners.items():
            rows[form]["ppl"] = perplexity(runner, blocks, progress=False).ppl
            _log(f"{form}: perplexity {rows[form]['ppl']:.3f} (original {original_ppl:.3f})")
        prompt = heldout_blocks(tokenizer, args.context + args.verify, 1)
        context, drafts = prompt[:, :args.context], prompt[:, args.context:]
        sessions, states = {}, {}
        for form, runner in runners.items():
            rows[form]["prefill_s"] = best_time(lambda: runner(context[:, :args.prefill]), 3)[0]
            filled = prefill(runner, context, chunk_size=args.prefill)
            states[form] = filled.state
            sessions[form] = linear_session(runner, filled.logits, filled.state, filled.next_position_ids)
        hf = HFCache(model)
        hf.extend(context, args.prefill)
        sessions = {"hf": hf.session(), **sessions}
        timings = time_steps(sessions, warmup=2, rounds=args.rounds, steps=1)  # taking turns step by step
        verify = {form: (lambda r=runner, s=states[form]: r(drafts, past_state=s).logits[:, -1])
                  for form, runner in runners.items()}
        verify_times = time_steps(verify, warmup=1, rounds=args.verify_rounds, steps=1)
    for name, rate in timings.tokens_per_s().items():
        (rows.setdefault(name, {}))["decode_ms"] = 1e3 / rate
    for form in FORMS:
        rows[form]["verify_ms"] = 1e3 * statistics.median(verify_times.steps[form])
    agree = timings.agreement("float", "int8")
    return {"forms": rows, "ppl_original": original_ppl, "tokens_scored": int(blocks[:, 1:].numel()),
            "context": args.context, "prefill_tokens": args.prefill, "verify_tokens": args.verify,
            "greedy_steps_agreeing": f"{agree['same']} of {agree['steps']}",
            "greedy_tokens_same_until": agree["same_until"]}


def print_table(result: dict) -> None:
    rows = result["forms"]
    base, quant, hf = rows["float"], rows["int8"], rows["hf"]
    print(f"{'':>16}  {'float':>9}  {'int8':>9}  int8 vs float")
    print(f"{'perplexity':>16}  {base['ppl']:>9.3f}  {quant['ppl']:>9.3f}  {quant['ppl'] / base['ppl']:.4f}x "
          f"(the original: {result['ppl_original']:.3f})")
    print(f"{'decode ms':>16}  {base['decode_ms']:>9.2f}  {quant['decode_ms']:>9.2f}  "
          f"{base['decode_ms'] / quant['decode_ms']:.2f}x faster (HF + KV cache: {hf['decode_ms']:.2f} ms; float "
          f"{hf['decode_ms'] / base['decode_ms']:.2f}x its speed, int8 {hf['decode_ms'] / quant['decode_ms']:.2f}x; "
          f"after {result['context']} tokens)")
    print(f"{'verify ms':>16}  {base['verify_ms']:>9.2f}  {quant['verify_ms']:>9.2f}  "
          f"{base['verify_ms'] / quant['verify_ms']:.2f}x faster ({result['verify_tokens']} tokens, one call)")
    print(f"{'prefill s':>16}  {base['prefill_s']:>9.3f}  {quant['prefill_s']:>9.3f}  "
          f"{base['prefill_s'] / quant['prefill_s']:.2f}x faster ({result['prefill_tokens']} tokens, one call)")
    print(f"{'weights MiB':>16}  {base['weights_mib']:>9.0f}  {quant['weights_mib']:>9.0f}  "
          f"{quant['weights_mib'] / base['weights_mib']:.2f}x")
    print(f"greedy decode steps agreeing: {result['greedy_steps_agreeing']} "
          f"({first_difference(result['greedy_tokens_same_until'])})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--block-size", type=positive_int, default=256)
    parser.add_argument("--max-blocks", type=positive_int, default=16)
    parser.add_argument("--context", type=positive_int, default=512, help="prompt tokens before the decode steps")
    parser.add_argument("--prefill", type=positive_int, default=128, help="prompt tokens per prefill call")
    parser.add_argument("--verify", type=positive_int, default=9,
                        help="tokens per verify call (drafts + 1; bench/speculative.py's k = 8 verifies 9)")
    parser.add_argument("--rounds", type=positive_int, default=150,
                        help="decode: timed steps per engine, the engines taking turns")
    parser.add_argument("--verify-rounds", type=positive_int, default=40, help="verify: timed calls per model")
    parser.add_argument("--calibration-blocks", type=nonnegative_int, default=CALIBRATION_BLOCKS,
                        help="training-split blocks of 256 tokens the int8 model is calibrated on (0: none)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.prefill > args.context:
        parser.error(f"--prefill {args.prefill} is longer than the --context {args.context} it is cut from")
    result = run(args)
    result.update({"method": args.method, "block_size": args.block_size, "blocks": args.max_blocks,
                   "calibration_blocks": args.calibration_blocks})
    return report_bench(result, args.out, "torch_quantize", args.threads, argv, print_table)


if __name__ == "__main__":
    sys.exit(main())
