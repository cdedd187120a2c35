"""`lincompile train-medusa`, `make-draft` and `build-ngram`: the trained draft sources of speculative decoding.

train-medusa writes OUT/medusa.json + OUT/medusa.safetensors (heads only; the target's lm_head is shared),
loadable with `lincompile.runtime.medusa.attach(model, OUT)`. make-draft writes a linearized N-layer model with
`save_pretrained` (`lincompile.load(OUT)` reads it back); build-ngram writes OUT/ngram.json
(`lincompile.runtime.ngram.NgramTable.load(OUT)`). All write atomically and print a summary (one JSON line
with --json); errors are one line (`lincompile: error: ...`), as for every subcommand.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from torch import nn

from lincompile.api import SAVE_FILE
from lincompile.atomic import check_not_inside, check_replaceable
from lincompile.cli.args import nonnegative_float, nonnegative_int, positive_float, positive_int
from lincompile.cli.summary import print_summary
from lincompile.pretrained import trained
from lincompile.runtime.medusa import CONFIG_FILE as MEDUSA_CONFIG
from lincompile.runtime.ngram import DEFAULT_ORDER, TABLE_FILE
from lincompile.runtime.state import check_positions
from lincompile.train.draft_model import DistillConfig

__all__ = ["add_parsers", "cmd_build_ngram", "cmd_make_draft", "cmd_train_medusa", "command_parser", "load_target"]

PROG = "lincompile"
_DISTILL = DistillConfig()


def load_target(name: str, method: str | None, weights: str = "auto") -> tuple[nn.Module, Any]:
    """(model, tokenizer): a lincompile directory loads its linearized model; an HF model (embedded name or
    directory) loads as it is, or linearized with `method` when given, with the trained tensors `weights`
    names (see `lincompile.pretrained.linearized`); `weights` other than 'auto' needs `method`."""
    from lincompile.api import load
    from lincompile.assets import load_model
    from lincompile.pretrained import linearized

    path = Path(name).expanduser()
    if weights != "auto" and (path / SAVE_FILE).is_file():  # checked before anything loads
        raise ValueError(f"{path} is a saved linearized model with its own trained tensors; drop --weights")
    if weights != "auto" and not method:
        raise ValueError("--weights picks the trained tensors of a --method linearization; add --method, or pass a "
                         "saved linearized directory as MODEL_OR_DIR")
    if (path / SAVE_FILE).is_file():
        from transformers import AutoTokenizer

        model = load(path)
        if method is not None and method != model.config.spec.name:
            raise ValueError(f"{path} is already linearized with {model.config.spec.name}; drop --method {method}")
        has_tokenizer = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    model, tokenizer = load_model(name)
    return (linearized(model, method, weights, model_name=name) if method else model), tokenizer


def weights_label(model: Any, weights: str) -> str:
    """Which trained tensors a linearized `load_target(name, method, weights)` model holds: 'saved model' (a
    linearized directory's own), 'none' (untrained), 'default' (the shipped ones) or the `weights` path."""
    loaded = trained(model)
    return "saved model" if loaded is None else "default" if loaded and weights == "auto" else \
        str(weights) if loaded else "none"


def _frozen_target(args: argparse.Namespace, purpose: str) -> tuple[Any, Any]:
    """(the target as a HiddenTarget, its tokenizer) for a command that runs it over --tokens training tokens;
    checks --tokens against --block-size, and --weights, first."""
    from lincompile.train.medusa import as_target

    if args.tokens < args.block_size:
        raise ValueError(f"--tokens ({args.tokens}) must be at least one block (--block-size {args.block_size})")
    model, tokenizer = load_target(args.model, args.method, args.weights)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; {purpose} needs one to tokenize the corpus")
    check_positions(model, args.block_size, f"a block of {args.block_size} tokens (--block-size)")
    return as_target(model), tokenizer


def cmd_train_medusa(args: argparse.Namespace) -> int:
    """Train Medusa heads on the frozen target over --tokens training tokens; save them to --out."""
    from lincompile.runtime.medusa import MedusaConfig
    from lincompile.train.data import heldout_blocks, load_texts, token_blocks
    from lincompile.train.medusa import train_medusa

    # head i (1-based) at t learns position t + i of its block (the target's own prediction there) or, for corpus
    # labels, the token at t + 1 + i: each head needs one inside the block
    if args.heads + (args.labels == "corpus") >= args.block_size:
        raise ValueError(f"--heads {args.heads} leaves heads with no token to predict in a block of "
                         f"{args.block_size}: use fewer heads or a larger --block-size")
    if 0 < args.heldout_tokens < args.block_size:  # (--tokens: `_frozen_target` checks it)
        raise ValueError(f"--heldout-tokens ({args.heldout_tokens}) must be at least one block (--block-size "
                         f"{args.block_size}), or 0 for none")
    if args.heldout_tokens == 0 and args.eval_every is not None:
        raise ValueError(f"--heldout-tokens 0 holds nothing out, so --eval-every {args.eval_every} would have no "
                         "effect: drop it, or hold tokens out")
    check_replaceable(args.out, MEDUSA_CONFIG)
    check_not_inside(args.out, args.model)
    target, tokenizer = _frozen_target(args, "training the heads")
    vocab, hidden = target.lm_head_weight.shape
    config = MedusaConfig(num_heads=args.heads, hidden_size=hidden, vocab_size=vocab, num_layers=args.head_layers)
    blocks = token_blocks(tokenizer, load_texts("train", args.data), args.block_size, args.tokens // args.block_size)
    held = (heldout_blocks(tokenizer, args.block_size, args.heldout_tokens // args.block_size, data=args.data,
                           skip="--heldout-tokens 0") if args.heldout_tokens else None)
    result = train_medusa(target, blocks, config, args.steps, args.lr, args.batch_size, args.out, heldout=held,
                          labels=args.labels, warmup_steps=args.warmup_steps, eval_every=args.eval_every or 0,
                          seed=args.seed, feature_batch=args.feature_batch, progress=not args.no_progress,
                          metadata={"target": args.model, "method": args.method,
                                    "weights": args.weights if args.method else None})
    final = result.evals[-1] if result.evals else {}
    print_summary({"out": str(result.saved), "heads": args.heads, "steps": args.steps,
                   "train_tokens": int(blocks.numel()), "labels": args.labels,
                   "loss": result.history[-1]["loss"] if result.history else None,
                   "accuracy": final.get("accuracy"), "top5": final.get("top5"),
                   "chain_tokens": final.get("chain_tokens")}, args.json)
    return 0


def cmd_make_draft(args: argparse.Namespace) -> int:
    """Make an N-layer linearized draft of MODEL, distill it toward the target, save it to --out."""
    from lincompile.train.draft_model import make_draft

    check_replaceable(args.out, SAVE_FILE)
    check_not_inside(args.out, args.model, args.teacher)
    config = DistillConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, block_size=args.block_size,
                           warmup_steps=args.warmup_steps, ce_weight=args.ce_weight,
                           train_embeddings=args.train_embeddings, seed=args.seed)
    teacher = load_target(args.teacher, None)[0] if args.teacher else None
    result = make_draft(args.model, args.layers, args.method, args.out, config=config, data=args.data,
                        eval_blocks=args.eval_blocks, teacher=teacher, progress=not args.no_progress)
    first, last = (result.evals[0], result.evals[-1]) if result.evals else ({}, {})
    print_summary({"out": str(result.saved), "layers": args.layers, "method": result.draft.config.spec.name,
                   "steps": len(result.history), "kl": result.history[-1]["kl"] if result.history else None,
                   "top1_before": first.get("top1"), "top1_after": last.get("top1"),
                   "heldout_kl_after": last.get("kl")}, args.json)
    return 0


def cmd_build_ngram(args: argparse.Namespace) -> int:
    """Run the target over --tokens training tokens and save the n-gram table of its greedy predictions."""
    from lincompile.runtime.ngram import build_ngram_table
    from lincompile.train.data import load_texts, token_blocks
    from lincompile.train.medusa import precompute_features

    check_replaceable(args.out, TABLE_FILE)
    check_not_inside(args.out, args.model)
    target, tokenizer = _frozen_target(args, "building the table")
    blocks = token_blocks(tokenizer, load_texts("train", args.data), args.block_size, args.tokens // args.block_size)
    features = precompute_features(target, blocks, args.batch_size, progress=not args.no_progress, keep_hidden=False)
    table = build_ngram_table(features.ids, features.greedy, int(target.lm_head_weight.shape[0]),
                              {"target": args.model, "method": args.method,
                               "weights": args.weights if args.method else None, "tokens": int(blocks.numel()),
                               "data": args.data}, order=args.order)
    path = table.save(args.out)
    print_summary({"out": str(path), "tokens": int(blocks.numel()), "order": args.order,
                   "contexts_by_order": table.counts_by_order()}, args.json)
    return 0


def command_parser(sub: Any, name: str, func: Callable[[argparse.Namespace], int], summary: str, description: str,
                   examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand with `summary` as its help line, `description` under it, the examples as its epilog and
    --debug (the CLI's way to show a traceback)."""
    parser = sub.add_parser(name, help=summary, description=f"{summary}\n\n{description}",
                            epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on error, and warnings in Python's form")
    parser.set_defaults(func=func)
    return parser


def _common(parser: argparse.ArgumentParser, block_size: int, batch_help: str, batch_default: int) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    parser.add_argument("--data", default="default", help="'default' (Shakespeare train split) or a .txt file/dir")
    parser.add_argument("--block-size", type=positive_int, default=block_size,
                        help=f"tokens per block (default {block_size})")
    parser.add_argument("--batch-size", type=positive_int, default=batch_default,
                        help=f"{batch_help} (default {batch_default})")
    parser.add_argument("--seed", type=int, default=0, help="data order and sampling seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")


def add_parsers(sub: Any) -> None:
    """Register `train-medusa`, `make-draft` and `build-ngram` on the `lincompile` subparsers."""
    p = command_parser(
        sub, "train-medusa", cmd_train_medusa, "train Medusa-style draft heads on a frozen target",
        "Head i maps the target's final hidden state at t through a zero-initialised residual block and\n"
        "the target's own lm_head to token t+1+i. The target runs once over the training tokens (hidden\n"
        "states and greedy labels are kept in memory); the heads then train on random positions. Labels\n"
        "are the target's own greedy predictions (self-distillation) unless --labels corpus. Held-out\n"
        "top-1 accuracy per head (vs the target's argmax) is reported. Attach the heads with\n"
        "lincompile.runtime.medusa.attach(model, OUT) and decode with generate(draft='medusa').",
        [f"{PROG} train-medusa runs/aug1/final --out runs/aug1/medusa --steps 1000 --tokens 200000",
         f"{PROG} train-medusa smollm2-135m --method augmented --out out/medusa --heads 4 --steps 200"
                 "   # shipped weights"])
    p.add_argument("model", metavar="MODEL_OR_DIR", help="a saved linearized directory (its model is the target), "
                   "an embedded model name or a Hugging Face directory")
    p.add_argument("--method", default=None, help="linearize a Hugging Face MODEL with this method first")
    p.add_argument("--weights", default="auto", help="with --method: the trained linearization to load: 'auto' "
                   "(the shipped one when there is one, else untrained; default), 'default' (the shipped one), "
                   "'none' (untrained), a directory written by lincompile.pretrained.ship, or a training checkpoint "
                   "OUT/checkpoints/step-N")
    p.add_argument("--heads", type=positive_int, default=4, help="number of heads = draft tokens per step (default 4)")
    p.add_argument("--head-layers", type=positive_int, default=1, help="residual blocks per head (default 1)")
    p.add_argument("--steps", type=nonnegative_int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--tokens", type=positive_int, default=131072, help="training tokens the target is run over "
                   "(default 131072; hidden states kept in fp16: tokens x hidden x 2 bytes)")
    p.add_argument("--heldout-tokens", type=nonnegative_int, default=8192,
                   help="held-out tokens for the accuracy metric, in whole blocks (default 8192; 0 = none)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=20, help="linear warm-up steps (default 20)")
    p.add_argument("--labels", choices=("self", "corpus"), default="self",
                   help="self: the target's greedy predictions (default); corpus: the text's own tokens")
    p.add_argument("--eval-every", type=nonnegative_int, default=None,
                   help="held-out accuracy every N steps (default 0: at the start and the end)")
    p.add_argument("--feature-batch", type=positive_int, default=4,
                   help="blocks per target forward when precomputing (default 4)")
    _common(p, 256, "token positions per step", 512)
    p = command_parser(
        sub, "make-draft", cmd_make_draft, "make a shallow linearized draft model distilled from its target",
        "Keeps the first N decoder layers (plus embeddings, final norm and lm_head), linearizes them\n"
        "with the target's method and trains them on KL(target || draft) over the training text. From a\n"
        "saved linearized directory the draft inherits its trained layers and the teacher is that model;\n"
        "from a Hugging Face model the teacher is the original (or --teacher). The draft is saved with\n"
        "save_pretrained: lincompile.load(OUT) reads it back; pass it as generate(draft=...).",
        [f"{PROG} make-draft runs/aug1/final --layers 4 --out runs/aug1/draft4 --steps 300",
         f"{PROG} make-draft smollm2-135m --layers 4 --method augmented --out out/draft4 --steps 100"])
    p.add_argument("model", metavar="MODEL_OR_DIR", help="a saved linearized directory, an embedded model name or a "
                   "Hugging Face directory")
    p.add_argument("--layers", type=positive_int, required=True,
                   help="decoder layers the draft keeps (1 .. target's - 1)")
    p.add_argument("--method", default=None, help="attention method for a Hugging Face MODEL (default augmented); "
                   "a linearized directory keeps its own")
    p.add_argument("--teacher", default=None, metavar="MODEL_OR_DIR",
                   help="distill toward this model instead (e.g. the trained linearized target)")
    p.add_argument("--steps", type=nonnegative_int, default=_DISTILL.steps,
                   help=f"distillation steps (default {_DISTILL.steps})")
    p.add_argument("--lr", type=positive_float, default=_DISTILL.lr, help=f"learning rate (default {_DISTILL.lr})")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=_DISTILL.warmup_steps,
                   help=f"linear warm-up, then constant (default {_DISTILL.warmup_steps})")
    p.add_argument("--ce-weight", type=nonnegative_float, default=_DISTILL.ce_weight,
                   help="weight of the corpus next-token CE added to the KL (default 0)")
    p.add_argument("--train-embeddings", action="store_true", help="also train the token embeddings (and a tied "
                   "lm_head)")
    p.add_argument("--eval-blocks", type=nonnegative_int, default=4,
                   help="held-out blocks for top-1 agreement (default 4; 0 = none)")
    _common(p, _DISTILL.block_size, "blocks per step", _DISTILL.batch_size)
    p = command_parser(
        sub, "build-ngram", cmd_build_ngram, "build an n-gram draft table from the target's own predictions",
        "Runs the target once over --tokens training tokens and keeps, for every context of 1 to --order\n"
        "tokens seen, the token it predicted most often next and how often (the longest seen context wins).\n"
        "At decode time the draft takes each token from prompt lookup (a 3- or 4-token match earlier in the\n"
        "context) or else from the table, and stops where the chain gets unlikely (no draft model runs): use\n"
        "--draft ngram:OUT, or pass lincompile.runtime.ngram.NgramTable.load(OUT) as generate(draft=...).\n"
        "Greedy output stays identical to plain decoding (but for near-ties with 8-bit weights); the table\n"
        "only changes how many drafts are accepted. Writes OUT/ngram.json atomically.",
        [f"{PROG} build-ngram smollm2-135m --method augmented --out out/ngram --tokens 131072",
         f"{PROG} build-ngram runs/aug1/final --out runs/aug1/ngram"])
    p.add_argument("model", metavar="MODEL_OR_DIR", help="a saved linearized directory (its model is the target), "
                   "an embedded model name or a Hugging Face directory")
    p.add_argument("--method", default=None, help="linearize a Hugging Face MODEL with this method first")
    p.add_argument("--weights", default="auto", help="with --method: the trained linearization to load: 'auto' "
                   "(default), 'default', 'none' or a directory (as for train-medusa)")
    p.add_argument("--tokens", type=positive_int, default=131072, help="training tokens the target is run over "
                   "(default 131072)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (ngram.json written atomically)")
    p.add_argument("--data", default="default", help="'default' (Shakespeare train split) or a .txt file/dir")
    p.add_argument("--block-size", type=positive_int, default=256, help="tokens per block (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="blocks per target forward (default 4)")
    p.add_argument("--order", type=positive_int, default=DEFAULT_ORDER,
                   help=f"longest context in tokens (default {DEFAULT_ORDER})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
