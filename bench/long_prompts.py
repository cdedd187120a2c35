"""Greedy continuations of long held-out prompts: the original SmolLM2-135M against linearizations, side by side.

Perplexity by position (bench/context_quality.py) says how well a model predicts past a length; this shows what
it writes there. The prompts are the first N tokens of one held-out block, for each N of `--prompt-tokens` (so
each prompt is a prefix of the next). Every model continues each greedily for `--new-tokens` tokens: the
original (Hugging Face `generate`, KV cache) and each `--weights` of `--method` read with each `--global-cap`
(lincompile's `generate`, recurrent state), as in `bench/context_quality.py`.

Writes bench/results/long_prompts_<machine>.json; prints each continuation and the command.
    python bench/long_prompts.py                                   # shipped weights; prompts of 1100/3000/6000
    python bench/long_prompts.py --weights default runs/x/checkpoints/step-00000064 --global-cap 0 64
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lincompile.cli.args import nonnegative_int, positive_float, positive_int
from lincompile.runtime.timing import report_bench

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--weights", nargs="+", default=["default"], help="trained tensors (default: shipped)")
    parser.add_argument("--global-cap", type=nonnegative_int, nargs="+", default=[None],
                        help="caps of the grouped global branch (0: none; default: the weights' recipe's)")
    parser.add_argument("--prompt-tokens", type=positive_int, nargs="+", default=[1100, 3000, 6000])
    parser.add_argument("--new-tokens", type=positive_int, default=40)
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                        help="as Hugging Face's (1: none; > 1 discourages tokens already in the text)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--tag", default="", help="suffix of the result file's stem (long_prompts_TAG_...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from lincompile.assets import load_model
    from lincompile.pretrained import side_by_side
    from lincompile.runtime.generate import generate
    from lincompile.train.data import heldout_blocks

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    block = heldout_blocks(tokenizer, max(args.prompt_tokens), 1)[0]
    greedy = {"max_new_tokens": args.new_tokens, "do_sample": False, "repetition_penalty": args.repetition_penalty,
              "eos_token_id": tokenizer.eos_token_id}  # both stop where the tokenizer's end of text comes

    def continuations(decode: Callable[[torch.Tensor], torch.Tensor]) -> list[str]:
        texts = []
        for n in args.prompt_tokens:
            with torch.no_grad():
                out = decode(block[None, :n])
            texts.append(tokenizer.decode(out[0, n:], skip_special_tokens=True))
        return texts

    rows = {"original": continuations(lambda ids: model.generate(ids, attention_mask=torch.ones_like(ids),
                                                                 pad_token_id=tokenizer.eos_token_id, **greedy))}
    for name, linear in side_by_side(model, args.method, args.weights, args.global_cap):
        rows[name] = continuations(functools.partial(generate, linear, **greedy))
    result = {"method": args.method, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "repetition_penalty": args.repetition_penalty,
              "prompt_ends": [tokenizer.decode(block[max(0, n - 24):n]) for n in args.prompt_tokens],
              "continuations": rows}
    stem = f"long_prompts_{args.tag}" if args.tag else "long_prompts"
    return report_bench(result, args.out, stem, args.threads, argv, print_samples)


def print_samples(result: dict) -> None:
    for i, n in enumerate(result["prompt_tokens"]):
        print(f"after {n} held-out tokens, ending {result['prompt_ends'][i]!r}:")
        for name, texts in result["continuations"].items():
            print(f"  {name}: {texts[i]!r}")


if __name__ == "__main__":
    sys.exit(main())
