"""Held-out perplexity of SmolLM2-135M by position in long blocks: the original against linearizations, side by side.

A model trained on short blocks can fall apart past them (a linear method's state sums what it has seen, and
the sums grow with the context). This scores `--blocks` held-out blocks of `--block-size` tokens (the fixed
held-out split; one forward per block) and reports the perplexity of the tokens in each of `--buckets` equal
ranges of positions, for the original and for each `--weights` of `--method` ("default": the shipped
trained tensors; a `lincompile.pretrained.ship` directory or a training checkpoint `OUT/checkpoints/step-N`).

`--global-cap` scores each cap of the grouped global branch side by side (`MethodSpec.global_cap`, 0: the
paper's unbounded sum; default: the one the weights' recipe records). `--split train` scores the training
text instead, so such a setting can be chosen without looking at the held-out text.

Writes bench/results/context_quality_<machine>.json; prints the table and the command.
    python bench/context_quality.py                                   # the shipped weights, 8 x 1024 tokens
    python bench/context_quality.py --weights default runs/x/checkpoints/step-00000120
    python bench/context_quality.py --block-size 4096 --blocks 2 --tag 4096
    python bench/context_quality.py --block-size 8192 --blocks 2 --split train --global-cap 0 512 1024
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lincompile.cli.args import nonnegative_int, positive_int
from lincompile.runtime.timing import report_bench

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def bucket_perplexity(model: object, blocks: torch.Tensor, buckets: int) -> tuple[list[float], float]:
    """Perplexity of the next-token predictions at positions 1.. of `blocks` [N, T], in `buckets` equal ranges,
    and over all of them."""
    nll = torch.cat([F.cross_entropy(model(ids[None]).logits[0, :-1].float(), ids[1:], reduction="none")[None]
                     for ids in blocks]).double()  # [N, T - 1]
    edges = [round(i * nll.shape[1] / buckets) for i in range(buckets + 1)]
    return [math.exp(nll[:, a:b].mean()) for a, b in zip(edges, edges[1:])], math.exp(nll.mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--weights", nargs="+", default=["default"], help="trained tensors to score (default: shipped)")
    parser.add_argument("--global-cap", type=nonnegative_int, nargs="+", default=[None],
                        help="caps of the grouped global branch to score side by side (0: none; default: the "
                             "weights' recipe's)")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="the text scored: the fixed held-out split, or the training split (to choose "
                             "settings without looking at the held-out text)")
    parser.add_argument("--block-size", type=positive_int, default=1024)
    parser.add_argument("--blocks", type=positive_int, default=8)
    parser.add_argument("--buckets", type=positive_int, default=4)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--tag", default="", help="suffix of the result file's stem (context_quality_TAG_...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from lincompile.assets import load_model
    from lincompile.pretrained import side_by_side
    from lincompile.train.data import heldout_blocks, load_texts, token_blocks

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    blocks = (heldout_blocks(tokenizer, args.block_size, args.blocks) if args.split == "heldout" else
              token_blocks(tokenizer, load_texts("train"), args.block_size, args.blocks))
    rows, overall = {}, {}
    rows["original"], overall["original"] = bucket_perplexity(model, blocks, args.buckets)
    for name, linear in side_by_side(model, args.method, args.weights, args.global_cap):
        rows[name], overall[name] = bucket_perplexity(linear, blocks, args.buckets)
    width = (blocks.shape[1] - 1) / args.buckets
    result = {"method": args.method, "split": args.split, "block_size": args.block_size,
              "blocks": int(blocks.shape[0]),
              "buckets": [f"{round(i * width) + 1}-{round((i + 1) * width)}" for i in range(args.buckets)],
              "ppl": rows, "ppl_all_positions": overall}
    stem = f"context_quality_{args.tag}" if args.tag else "context_quality"
    return report_bench(result, args.out, stem, args.threads, argv, print_table)


def print_table(result: dict) -> None:
    width = max(len(name) for name in result["ppl"])
    print(f"{'positions':>{width}}" + "".join(f"  {b:>10}" for b in result["buckets"]) + f"  {'all':>8}")
    for name, values in result["ppl"].items():
        print(f"{name:>{width}}" + "".join(f"  {v:>10.1f}" for v in values)
              + f"  {result['ppl_all_positions'][name]:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
