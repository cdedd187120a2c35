"""`lincompile train`: linearize a model, then attention transfer (stage 1) and fine-tuning (stage 2).

Writes OUT/checkpoints/step-N (atomic, resumable with --resume), OUT/history.json, and the trained model in
OUT/final (`LinearizedModel.save_pretrained`: LoRA adapters are merged into the base weights first, so
`lincompile.load(OUT/final)` reads it back like any linearized model). Under torchrun every rank trains on its
shard of each batch; rank 0 evaluates and writes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lincompile.api import SAVE_FILE, optimize
from lincompile.assets import load_model
from lincompile.atomic import atomic_write, check_not_inside, check_replaceable
from lincompile.cli.args import given_flags, nonnegative_float, nonnegative_int, positive_float, positive_int
from lincompile.cli.summary import print_summary
from lincompile.config import LinearizeConfig
from lincompile.methods.spec import methods
from lincompile.pretrained import warn_other_source
from lincompile.train.checkpoint import latest_checkpoint, source_fingerprint
from lincompile.train.data import heldout_blocks, load_texts, token_blocks
from lincompile.train.lora import DEFAULT_TARGETS, lora_matches, merge_lora
from lincompile.train.trainer import LR_SCHEDULES, Distributed, TrainConfig, train

_DEFAULTS = TrainConfig()


def _or(value: Any, default: Any) -> Any:
    """`value` unless the option was not given (None)."""
    return default if value is None else value


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line describes. `--full` trains every weight, so the options choosing what
    else to train are refused beside it rather than ignored."""
    adapters = {"--lora-alpha": args.lora_alpha, "--lora-targets": args.lora_targets}
    extra = given_flags({"--lora-rank": args.lora_rank, **adapters, "--train-norms": args.train_norms,
                         "--train-embeddings": args.train_embeddings})
    if args.full and extra:
        raise ValueError(f"--full trains every weight, so {extra} would have no effect: drop them, or drop --full "
                         "to train LoRA adapters")
    given = given_flags(adapters)
    if args.lora_rank == 0 and given:
        raise ValueError(f"--lora-rank 0 trains no adapters, so {given} would have no effect: drop them, or give "
                         "a rank > 0")
    if args.eval_blocks == 0 and args.eval_every is not None:
        raise ValueError(f"--eval-blocks 0 evaluates nothing, so --eval-every {args.eval_every} would have no effect: "
                         "drop it, or give held-out blocks")
    targets = DEFAULT_TARGETS if args.lora_targets is None else args.lora_targets.split(",")
    return TrainConfig(
        stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, block_size=args.block_size, stage1_lr=args.stage1_lr, lr=args.lr,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lora_rank=0 if args.full else _or(args.lora_rank, _DEFAULTS.lora_rank),
        lora_alpha=_or(args.lora_alpha, _DEFAULTS.lora_alpha),
        lora_targets=tuple(t.strip() for t in targets if t.strip()), full=args.full,
        train_norms=args.train_norms, train_embeddings=args.train_embeddings, kl_weight=args.kl_weight,
        eval_every=_or(args.eval_every, _DEFAULTS.eval_every), eval_blocks=args.eval_blocks,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, seed=args.seed, bf16=not args.no_bf16)


def cmd_train(args: argparse.Namespace) -> int:
    """Train, save OUT/final, print a summary (one JSON line with --json)."""
    config = train_config(args)
    if not config.total_steps:
        raise ValueError("--stage1-steps and --stage2-steps are both 0: this run trains 0 steps. " + (
            f"Use --init's tensors as they are with --weights {args.init} in eval, generate or export" if args.init
            else "An untrained linearization needs no run: eval, generate and export take --weights none, and "
            "Python saves one with lincompile.optimize(model, method).save_pretrained(dir)"))
    out = Path(args.out).expanduser()
    _check_out(out, args)
    if not args.resume and latest_checkpoint(out / "checkpoints") is not None:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue, or another --out")
    if args.resume and latest_checkpoint(out / "checkpoints") is None:
        print(f"lincompile train: no checkpoint in {out / 'checkpoints'} to resume; training from the start",
              file=sys.stderr)
    parallel = Distributed.from_env(args.device)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not at the first checkpoint
    try:
        model, tokenizer = load_model(args.model, attn_implementation=args.attn_impl)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; training needs one to tokenize the corpus")
        init, linearize, recipe = _init_tensors(args, config) if args.init else (None, linearize_config(args), {})
        linear = optimize(model, config=linearize)
        warn_other_source(recipe, source_fingerprint(linear.graph), args.init)  # --init's tensors go in later
        if config.lora_rank and config.stage2_steps:
            # stage 2 adds them: a bad --lora-targets fails now (each one the user named must match)
            lora_matches(linear.graph, config.lora_targets, each=args.lora_targets is not None)
        blocks = token_blocks(tokenizer, load_texts("train", args.data), config.block_size, args.max_train_blocks)
        held = (heldout_blocks(tokenizer, config.block_size, config.eval_blocks, data=args.data,
                               skip="--eval-blocks 0") if config.eval_blocks else None)
        result = train(linear, blocks, config, out, eval_blocks=held, resume=args.resume, parallel=parallel,
                       progress=not args.no_progress, init=init)
        if not parallel.is_main:
            return 0
        merged = merge_lora(linear.graph)
        local = Path(args.model).expanduser()
        linear.source_model = str(local.resolve()) if local.is_dir() else args.model  # what `eval` compares with
        final = linear.save_pretrained(str(out / "final"), tokenizer)
        atomic_write(out / "history.json", json.dumps(
            {"train_config": config.to_dict(), "init": args.init, "history": result.history,
             "evals": result.evals}, indent=2))
    except KeyboardInterrupt:
        _drop_if_empty(out, created)
        latest = latest_checkpoint(out / "checkpoints")
        print("lincompile train: interrupted; " + (
            f"the newest checkpoint is {latest}: run the same command with --resume to continue from it"
            if latest is not None else "no checkpoint was written yet"), file=sys.stderr)
        return 130
    except BaseException:
        _drop_if_empty(out, created)
        raise
    finally:
        parallel.close()
    summary = {"final": final, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "steps": len(result.history), "train_blocks": int(blocks.shape[0]), "lora_merged": merged,
               "global_cap": linear.config.spec.global_cap,
               "loss": result.history[-1]["loss"] if result.history else None,
               "ppl": result.evals[-1]["ppl"] if result.evals else None, "world_size": parallel.world}
    print_summary(summary, args.json)
    return 0


def _drop_if_empty(out: Path, created: bool) -> None:
    """Remove --out when this run created it and wrote nothing there (a run that failed to start)."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _check_out(out: Path, args: argparse.Namespace) -> None:
    """Refuse, before any work, an --out whose files a run could overwrite: a file, or a non-empty directory that
    `lincompile train` did not write (no checkpoints/), or one whose final/ is not a saved model or is what the run
    reads (MODEL, --init)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "checkpoints").is_dir())):
        raise FileExistsError(f"{out} is a file or a non-empty directory that lincompile train did not write (no "
                              "checkpoints/); a run would overwrite its files: pass a new or empty --out")
    check_replaceable(out / "final", SAVE_FILE)
    check_not_inside(out / "final", args.model, args.init)


def linearize_config(args: argparse.Namespace, global_cap: int | None = None) -> LinearizeConfig:
    """The LinearizeConfig of a run: --method with --global-cap (None: `global_cap`, else the method's own)."""
    from lincompile.pretrained import with_global_cap

    return with_global_cap(LinearizeConfig(method=args.method),
                           global_cap if args.global_cap is None else args.global_cap)


def _init_tensors(args: argparse.Namespace, config: TrainConfig) -> tuple[dict, LinearizeConfig, dict]:
    """The tensors `--init` names, checked against this run (the same LinearizeConfig up to the global cap, and
    the same LoRA layout), the run's LinearizeConfig (without --global-cap, the cap `--init`'s tensors are read
    with) and their recipe."""
    from lincompile.pretrained import lora_layout, recipe_config, same_tensor_layout, trained_tensors

    tensors, recipe = trained_tensors(args.init, args.model, args.method)
    their_config = recipe_config(recipe)
    linearize = linearize_config(args, their_config.spec.global_cap)
    if not same_tensor_layout(their_config, linearize):
        raise ValueError(f"--init {args.init} was linearized with {their_config.to_dict()}, this run with "
                         f"{linearize.to_dict()}")
    theirs, ours = recipe.get("lora"), lora_layout(config.to_dict())
    layout = ("targets", "rank", "alpha")
    if theirs and (not ours or any(theirs[k] != ours[k] for k in layout)):
        raise ValueError(f"--init {args.init} holds LoRA adapters {({k: theirs[k] for k in layout})}; train with "
                         "the same --lora-rank, --lora-alpha and --lora-targets to continue them")
    return tensors, linearize, recipe


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument("model", metavar="MODEL", help="embedded model name or a local Hugging Face directory")
    parser.add_argument("--method", required=True, help=f"attention method (one of: {', '.join(methods())})")
    parser.add_argument("--global-cap", type=nonnegative_int, default=None, metavar="N",
                        help="train with the grouped global branch scaled by min(1, N / n), n the tokens it sums "
                             "(MethodSpec.global_cap; 0: the paper's unbounded sum). Default: the cap --init's "
                             "tensors are read with, else the method's own (0)")
    parser.add_argument("--data", default="default", help="'default' (Shakespeare train split) or a .txt file/dir")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints, final model)")
    parser.add_argument("--attn-impl", choices=("sdpa", "eager"), default=None,
                        help="attention implementation to load the model with (default: the model's own)")
    parser.add_argument("--stage1-steps", type=nonnegative_int, default=d.stage1_steps,
                        help=f"attention-transfer steps (default {d.stage1_steps}; 0 skips stage 1)")
    parser.add_argument("--stage2-steps", type=nonnegative_int, default=d.stage2_steps,
                        help=f"fine-tuning steps (default {d.stage2_steps}; 0 skips stage 2)")
    parser.add_argument("--stage1-lr", type=positive_float, default=d.stage1_lr,
                        help=f"stage-1 LR (default {d.stage1_lr})")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help=f"stage-2 LR (default {d.lr})")
    parser.add_argument("--warmup-steps", type=nonnegative_int, default=d.warmup_steps,
                        help=f"linear warm-up steps of each stage (default {d.warmup_steps})")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                        help=f"LR after each stage's warm-up: constant, or a cosine decay to 0 at the stage's end "
                             f"(default {d.lr_schedule})")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay,
                        help=f"AdamW weight decay (default {d.weight_decay})")
    parser.add_argument("--max-grad-norm", type=nonnegative_float, default=d.max_grad_norm,
                        help=f"gradient-norm clip (default {d.max_grad_norm}; 0 = off)")
    parser.add_argument("--lora-rank", type=nonnegative_int, default=None,
                        help=f"LoRA rank (default {d.lora_rank}; "
                        "0 = no adapters: stage 2 trains the attention parameters and the flags below)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help=f"LoRA alpha (default {d.lora_alpha})")
    parser.add_argument("--lora-targets", default=None, metavar="A,B,...",
                        help=f"projection module names to adapt (default {','.join(DEFAULT_TARGETS)}; GPT-2: "
                             "c_attn,attn.c_proj; OPT: add out_proj)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning of every weight instead of LoRA")
    parser.add_argument("--train-norms", action="store_true", help="also train the norm weights in stage 2")
    parser.add_argument("--train-embeddings", action="store_true", help="also train the embeddings in stage 2")
    parser.add_argument("--kl-weight", type=nonnegative_float, default=d.kl_weight,
                        help="weight of KL(original softmax model || linearized) added to the stage-2 loss")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                        help=f"global blocks per optimizer step, over all ranks (default {d.batch_size})")
    parser.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                        help=f"micro-batches per step (default {d.grad_accum})")
    parser.add_argument("--block-size", type=positive_int, default=d.block_size,
                        help=f"tokens per block ({d.block_size})")
    parser.add_argument("--max-train-blocks", type=positive_int, default=None,
                        help="use only the first N training blocks")
    parser.add_argument("--eval-every", type=nonnegative_int, default=None,
                        help=f"held-out perplexity every N steps (default {d.eval_every}; 0 = only at the end of "
                             "each stage)")
    parser.add_argument("--eval-blocks", type=nonnegative_int, default=d.eval_blocks,
                        help=f"held-out blocks (default {d.eval_blocks}; 0 = no evaluation)")
    parser.add_argument("--checkpoint-every", type=nonnegative_int, default=d.checkpoint_every,
                        help=f"steps between checkpoints (default {d.checkpoint_every}; also at each stage end)")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints,
                        help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in OUT")
    parser.add_argument("--init", default=None, metavar="WEIGHTS",
                        help="start a new run from trained tensors: 'default' (the shipped linearization of MODEL "
                             "and --method), a directory written by lincompile.pretrained.ship, or a checkpoint "
                             "OUT/checkpoints/step-N; its LoRA adapters continue (same --lora-* options); resume "
                             "such a run with the same --init")
    parser.add_argument("--seed", type=int, default=d.seed, help="data order and LoRA init (default 0)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available; "
                             "under torchrun each process uses cuda:LOCAL_RANK)")
    parser.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPU (CPU never uses it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
