"""Choosing the n-gram draft's settings: replay them against the target's greedy output.

Runs the target (an onnxruntime export) once: greedy continuations of `--prompts` prompts, and the time of one call
per width (1 to the largest k + 1 tokens, best of `--rounds`, from the state after a prompt). Then replays prompt
lookup and `NgramDraft` with every `--min-match` x `--min-confidence` x k against those continuations
(`lincompile.runtime.replay`): tokens per target call are exact, the speedup is modelled from the call times
(overheads outside the target left out). By default the prompts come from the training split, past the text the
table was built from, so settings are not chosen on the held-out text that bench/speculative.py measures.

Writes bench/results/draft_replay[_TAG]_<machine>.json; prints the rows, best first.
    python bench/draft_replay.py --onnx-dir /tmp/smol-onnx --ngram runs/ngram8
    python bench/draft_replay.py --onnx-dir /tmp/smol-onnx --ngram runs/ngram8 --split heldout --tag heldout
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lincompile.cli.args import nonnegative_float, positive_int, positive_int_list

RESULTS = Path(__file__).resolve().parent / "results"


def _confidences(text: str) -> list[float]:
    """Comma-separated numbers in [0, 1]."""
    values = [nonnegative_float(item.strip()) for item in text.split(",")]
    if any(v > 1 for v in values):
        raise argparse.ArgumentTypeError(f"confidences lie in [0, 1], got {text!r}")
    return values


def _target(onnx_dir: Path, threads: int) -> Any:
    """The export in `onnx_dir`, made there from the shipped linearization of the embedded model when missing."""
    from lincompile.backends.onnx import META_FILE
    from lincompile.runtime.timing import open_ort

    if not (onnx_dir / META_FILE).is_file():
        from lincompile.assets import load_model
        from lincompile.pretrained import linearized

        model, tokenizer = load_model("smollm2-135m")
        linearized(model, "augmented", "default", "smollm2-135m").export_onnx(str(onnx_dir), tokenizer=tokenizer)
    return open_ort(onnx_dir, threads)


def _prompts(tokenizer: Any, args: argparse.Namespace, table_tokens: int, data: str) -> torch.Tensor:
    """`--prompts` blocks of the held-out split (bench/speculative.py's), or spread over the training split past
    the first `table_tokens` tokens the table was built from (`data`: it must be the default split)."""
    from lincompile.train.data import heldout_blocks, load_texts, token_blocks

    if args.split == "heldout":
        return heldout_blocks(tokenizer, args.prompt_tokens, args.prompts)
    if data != "default":
        raise SystemExit(f"the table was built from {data!r}, not the default training split: its prompts may not lie "
                         "past the table's text; use --split heldout")
    blocks = token_blocks(tokenizer, load_texts("train"), args.prompt_tokens)
    first = -(-table_tokens // args.prompt_tokens)
    if blocks.shape[0] - first < args.prompts:
        raise SystemExit(f"the training split has {blocks.shape[0] - max(first, 0)} blocks of {args.prompt_tokens} "
                         f"tokens past the table's {table_tokens}; ask for fewer --prompts or use --split heldout")
    return blocks[first + torch.linspace(0, blocks.shape[0] - first - 1, args.prompts).long()]


def _call_seconds(target: Any, sequence: torch.Tensor, prompt: int, widths: int, rounds: int) -> list[float]:
    """The target's best time for a call of width w = 1..widths from the state after `prompt` tokens, over `rounds`
    rounds that each time every width once (so a change in the machine's load weighs on all widths alike)."""
    state = target(sequence[None, :prompt]).past_state
    seconds = [float("inf")] * widths
    for _ in range(rounds):
        for width in range(1, widths + 1):
            ids = sequence[None, prompt:prompt + width]
            positions = torch.arange(prompt, prompt + width)[None]
            start = time.perf_counter()
            target(ids, past_state=state, position_ids=positions)
            seconds[width - 1] = min(seconds[width - 1], time.perf_counter() - start)
    return seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lincompile.runtime.drafts import PromptLookupDraft
    from lincompile.runtime.generate import generate
    from lincompile.runtime.ngram import NgramDraft, NgramTable
    from lincompile.runtime.replay import replay_draft

    torch.set_num_threads(args.threads)
    table = NgramTable.load(args.ngram)
    target = _target(args.onnx_dir, args.threads)
    prompts = _prompts(target.tokenizer, args, int(table.metadata.get("tokens", 0)),
                       str(table.metadata.get("data", "default")))
    sequences = []
    for number in range(prompts.shape[0]):
        print(f"greedy continuation {number + 1}/{prompts.shape[0]}", file=sys.stderr, flush=True)
        sequences.append(generate(target, prompts[number:number + 1], args.new_tokens)[0])
    widest = max(args.ks) + 1
    if min(len(s) for s in sequences) < args.prompt_tokens + widest:
        raise SystemExit(f"a continuation ended before {widest} tokens: time the calls with fewer --ks")
    seconds = _call_seconds(target, sequences[0], args.prompt_tokens, widest, args.rounds)
    drafts: dict[str, Any] = {"prompt-lookup": PromptLookupDraft}
    for match in args.min_match:
        for confidence in args.min_confidence:
            drafts[f"ngram min_match={match} min_confidence={confidence:g}"] = (
                lambda m=match, c=confidence: NgramDraft(table, min_match=m, max_match=max(m, 4), min_confidence=c))
    rows = []
    for name, make in drafts.items():
        for k in args.ks:
            stats = replay_draft(make(), sequences, args.prompt_tokens, k)
            rows.append({"draft": name, "k": k, "tokens_per_call": stats.tokens_per_call,
                         "drafted_per_call": stats.drafted_per_call,
                         "modelled_speedup": stats.modelled_speedup(seconds)})
    rows.sort(key=lambda row: -row["modelled_speedup"])
    return {"split": args.split, "prompts": prompts.shape[0], "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "onnx_dir": str(args.onnx_dir), "ngram": str(args.ngram),
            "table_tokens": table.metadata.get("tokens"), "table_contexts_by_order": table.counts_by_order(),
            "call_ms_by_width": [1000 * s for s in seconds], "rows": rows}


def print_rows(result: dict[str, Any]) -> None:
    widths = ", ".join(f"{w}: {ms:.1f}" for w, ms in enumerate(result["call_ms_by_width"], 1))
    print(f"{result['prompts']} {result['split']} prompts x {result['new_tokens']} greedy tokens; target call ms by "
          f"width {widths}")
    name = max(len(row["draft"]) for row in result["rows"])
    print(f"{'draft':>{name}} {'k':>3} {'tokens/call':>12} {'drafted/call':>13} {'modelled speedup':>17}")
    for row in result["rows"]:
        print(f"{row['draft']:>{name}} {row['k']:>3} {row['tokens_per_call']:>12.3f} {row['drafted_per_call']:>13.2f} "
              f"{row['modelled_speedup']:>16.3f}x")


def main(argv: list[str] | None = None) -> int:
    from lincompile.runtime.timing import report_bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-dir", type=Path, required=True,
                        help="the target's export (made there from the shipped linearization when missing)")
    parser.add_argument("--ngram", type=Path, required=True, help="the table (lincompile build-ngram)")
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--prompts", type=positive_int, default=60)
    parser.add_argument("--prompt-tokens", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--ks", type=positive_int_list, default="4,6,8,12")
    parser.add_argument("--min-match", type=positive_int_list, default="2,3,4")
    parser.add_argument("--min-confidence", type=_confidences, default="0,0.02,0.05,0.1,0.2")
    parser.add_argument("--rounds", type=positive_int, default=10,
                        help="timed calls per width, one per round (the best counts)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result file's stem (draft_replay_TAG_...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args)
    stem = f"draft_replay_{args.tag}" if args.tag else "draft_replay"
    return report_bench(result, args.out, stem, args.threads, argv, print_rows)


if __name__ == "__main__":
    sys.exit(main())
