"""Held-out perplexity of SmolLM2-135M by position in long blocks: the original against linearizations, side by side.

A model trained on short blocks can fall apart past them (a linear method's state sums what it has seen, and
the sums grow with the context). This scores `--blocks` held-out blocks of `--block-size` tokens (the fixed
held-out split; one forward per block) and reports the perplexity of the tokens in each of `--buckets` equal
ranges of positions, for the original and for each `--weights` of `--method` ("default": the shipped
trained tensors; a `lincompile.pretrained.ship` directory or a training checkpoint `OUT/checkpoints/step-N`).

Writes bench/results/context_quality_<machine>.json; prints the table and the command.
    python bench/context_quality.py                                   # the shipped weights, 8 x 1024 tokens
    python bench/context_quality.py --weights default runs/x/checkpoints/step-00000120
    python bench/context_quality.py --block-size 4096 --blocks 2 --tag 4096
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lincompile.cli.args import positive_int
from lincompile.runtime.timing import report_bench

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def bucket_perplexity(model: object, blocks: torch.Tensor, buckets: int) -> list[float]:
    """Perplexity of the next-token predictions at positions 1.. of `blocks` [N, T], in `buckets` equal ranges."""
    nll = torch.cat([F.cross_entropy(model(ids[None]).logits[0, :-1].float(), ids[1:], reduction="none")[None]
                     for ids in blocks]).double()  # [N, T - 1]
    edges = [round(i * nll.shape[1] / buckets) for i in range(buckets + 1)]
    return [math.exp(nll[:, a:b].mean()) for a, b in zip(edges, edges[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--weights", nargs="+", default=["default"], help="trained tensors to score (default: shipped)")
    parser.add_argument("--block-size", type=positive_int, default=1024)
    parser.add_argument("--blocks", type=positive_int, default=8)
    parser.add_argument("--buckets", type=positive_int, default=4)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--tag", default="", help="suffix of the result file's stem (context_quality_TAG_...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from lincompile.assets import load_model
    from lincompile.pretrained import linearized
    from lincompile.train.data import heldout_blocks

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    blocks = heldout_blocks(tokenizer, args.block_size, args.blocks)
    rows = {"original": bucket_perplexity(model, blocks, args.buckets)}
    for weights in args.weights:
        rows[f"{args.method} ({weights})"] = bucket_perplexity(linearized(model, args.method, weights), blocks,
                                                               args.buckets)
    width = (blocks.shape[1] - 1) / args.buckets
    result = {"method": args.method, "block_size": args.block_size, "blocks": int(blocks.shape[0]),
              "buckets": [f"{round(i * width) + 1}-{round((i + 1) * width)}" for i in range(args.buckets)],
              "ppl": rows}
    stem = f"context_quality_{args.tag}" if args.tag else "context_quality"
    return report_bench(result, args.out, stem, args.threads, argv, print_table)


def print_table(result: dict) -> None:
    print(f"{'positions':>32}" + "".join(f"  {b:>10}" for b in result["buckets"]))
    for name, values in result["ppl"].items():
        print(f"{name:>32}" + "".join(f"  {v:>10.1f}" for v in values))


if __name__ == "__main__":
    sys.exit(main())
