"""`lincompile eval`: held-out perplexity of a linearized model beside the original's.

Both models see the same token blocks (the fixed held-out split), so the ratio is the cost of
linearization on that text.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lincompile.api import SAVE_FILE
from lincompile.api import load as load_linearized
from lincompile.assets import load_model
from lincompile.cli.args import nonnegative_int, positive_int
from lincompile.cli.draft_cmd import weights_label
from lincompile.cli.summary import print_summary
from lincompile.diagnostics import warn
from lincompile.pretrained import linearized
from lincompile.runtime.state import position_limit
from lincompile.train.data import CALIBRATION_BLOCK, CALIBRATION_BLOCKS, calibration_blocks, heldout_blocks
from lincompile.train.eval import perplexity


def _original_of_saved(directory: Path, global_cap: int | None
                       ) -> tuple[torch.nn.Module, Any, torch.nn.Module, str]:
    """(linearized, tokenizer, original, what the original is) for a directory written by `save_pretrained`, the
    linearized model read with `global_cap` (None: its own): the original is the model training started from when
    the save records it (`source_model`; the saved weights have been trained since), else the saved weights with
    softmax attention."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lincompile.assets import TOKENIZER_FILES

    linear = load_linearized(directory, global_cap=global_cap)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{directory} holds no tokenizer; perplexity needs one to tokenize the corpus (save the "
                         "model with save_pretrained(dir, tokenizer))")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if linear.source_model is not None:
        try:
            return linear, tokenizer, load_model(linear.source_model)[0].eval(), linear.source_model
        except Exception as error:  # moved, or another machine: the saved weights are the next best original
            warn(f"{directory / SAVE_FILE} names {linear.source_model!r} as the model training started "
                 f"from, which does not load here ({str(error).splitlines()[0]}); comparing with the saved "
                 "weights under softmax attention instead")
    original = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
    weights = load_file(directory / "model.safetensors")
    missing, _ = original.load_state_dict(weights, strict=False)
    own = original.state_dict(keep_vars=True)
    loaded = {id(own[name]) for name in weights if name in own}
    uncovered = [name for name in missing if id(own[name]) not in loaded]  # a tied tensor is saved under one name
    if uncovered:
        raise ValueError(f"{directory}: the saved weights do not cover the original model ({uncovered[:3]} ...)")
    return linear, tokenizer, original.eval(), "the saved weights with softmax attention"


def check_calibration(args: argparse.Namespace) -> None:
    """Refuse --calibration-blocks without --quantize (it would change nothing), before any model loads."""
    if args.calibration_blocks is not None and not args.quantize:
        raise ValueError(f"--calibration-blocks {args.calibration_blocks} calibrates --quantize, which was not given")


def calibration_count(args: argparse.Namespace) -> int:
    """The training blocks --quantize calibrates on: --calibration-blocks, or CALIBRATION_BLOCKS when not given."""
    return CALIBRATION_BLOCKS if args.calibration_blocks is None else args.calibration_blocks


def quantize_calibrated(model: Any, args: argparse.Namespace, tokenizer: Any, data: str = "default") -> Any:
    """`model` with --quantize's 8-bit linear layers, calibrated on `calibration_count` blocks of the training
    split of `data` (none: not smoothed), of CALIBRATION_BLOCK tokens or the model's position limit if shorter."""
    count = calibration_count(args)
    block = min(CALIBRATION_BLOCK, position_limit(model) or CALIBRATION_BLOCK)
    return model.quantize(args.quantize,
                          calibration=calibration_blocks(tokenizer, count, data, block) if count else None)


def add_calibration_argument(parser: argparse.ArgumentParser, corpus: str) -> None:
    parser.add_argument("--calibration-blocks", type=nonnegative_int, default=None,
                        help="with --quantize: smooth each layer's input by its ranges over this many 256-token "
                             f"blocks of {corpus} (SmoothQuant; 0: none; default {CALIBRATION_BLOCKS})")


def cmd_eval(args: argparse.Namespace) -> int:
    """Print perplexity of the linearized and the original model (and a fine-tuned softmax reference)."""
    path = Path(args.model).expanduser()
    saved = (path / SAVE_FILE).is_file()
    if saved and args.method:
        raise ValueError(f"{path} is a saved linearized model, which has its method: drop --method {args.method}")
    if saved and args.weights != "auto":
        raise ValueError(f"{path} is a saved linearized model with its own trained tensors: drop --weights")
    if not args.method and args.weights != "auto":
        raise ValueError(f"--weights {args.weights} chooses the trained tensors of --method, which was not given")
    if not (args.method or saved) and args.global_cap is not None:
        raise ValueError(f"--global-cap {args.global_cap} sets a cap of --method, which was not given")
    check_calibration(args)
    if args.quantize and not (saved or args.method):
        raise ValueError(f"--quantize {args.quantize} applies to the linearized model: add --method (or pass a saved "
                         "linearized directory)")
    tuned = None
    if args.softmax_finetuned:  # loaded first: a directory that is no model fails before any scoring
        tuned_path = Path(args.softmax_finetuned).expanduser()  # a `lincompile train --method softmax` run's final/
        if not tuned_path.is_dir():
            raise ValueError(f"--softmax-finetuned {args.softmax_finetuned} is not a directory")
        tuned = load_linearized(tuned_path) if (tuned_path / SAVE_FILE).is_file() else load_model(str(tuned_path))[0]
    progress = not args.no_progress
    original_is = args.model
    if saved:
        linear, tokenizer, original, original_is = _original_of_saved(path, args.global_cap)
        method, weights = linear.config.spec.name, weights_label(linear, args.weights)
    else:
        original, tokenizer = load_model(args.model)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; perplexity needs one to tokenize the corpus")
        method = args.method
        linear = linearized(original, method, args.weights, args.model, args.global_cap) if method else None
        weights = None if linear is None else weights_label(linear, args.weights)
    if args.quantize:
        linear = quantize_calibrated(linear, args, tokenizer, args.data)
    blocks = heldout_blocks(tokenizer, args.block_size, args.max_blocks, data=args.data)
    result: dict[str, object] = {"model": args.model, "original": original_is, "method": method, "weights": weights,
                                 **({"global_cap": linear.config.spec.global_cap} if linear is not None
                                    and linear.config.spec.global_branch == "grouped" else {}),
                                 **({"quantize": args.quantize, "calibration_blocks": calibration_count(args)}
                                    if args.quantize else {}),
                                 "tokens": blocks[:, 1:].numel(),
                                 "block_size": args.block_size, "blocks": int(blocks.shape[0])}
    base = perplexity(original, blocks, args.batch_size, progress=progress, desc="original")
    result["ppl_original"] = base.ppl
    if linear is not None:
        result["ppl"] = perplexity(linear, blocks, args.batch_size, progress=progress,
                                   desc=method or "linearized").ppl
        result["ratio"] = result["ppl"] / base.ppl
    if tuned is not None:
        result["ppl_softmax_finetuned"] = perplexity(tuned, blocks, args.batch_size, progress=progress,
                                                     desc="softmax fine-tuned").ppl
        if "ppl" in result:
            result["ratio_to_finetuned"] = result["ppl"] / result["ppl_softmax_finetuned"]
    print_summary(result, args.json)
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_DIR",
                        help="embedded model name, a Hugging Face directory, or a saved linearized model directory")
    parser.add_argument("--method", default=None, help="linearize MODEL with this method first (not needed "
                        "for a saved linearized directory; omit to evaluate only the original)")
    parser.add_argument("--weights", default="auto",
                        help="with --method: 'auto' (the shipped trained linearization when there is one, else "
                             "untrained), 'default' (shipped, required), 'none' (untrained), a directory "
                             "written by lincompile.pretrained.ship, or a training checkpoint "
                             "OUT/checkpoints/step-N")
    parser.add_argument("--global-cap", type=nonnegative_int, default=None, metavar="N",
                        help="with --method or a saved directory: bound the grouped global branch's sum as if it "
                             "summed at most N tokens (0: the paper's unbounded sum; default: the trained weights' "
                             "recipe's, or the saved model's; see README 'Long contexts')")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="score the linearized model with 8-bit linear layers (LinearizedModel.quantize; the "
                             "original stays float)")
    add_calibration_argument(parser, "the training split of --data")
    parser.add_argument("--data", default="default", help="'default' (held-out Shakespeare) or a .txt file/dir")
    parser.add_argument("--block-size", type=positive_int, default=256,
                        help="tokens per evaluation block (default 256)")
    parser.add_argument("--max-blocks", type=positive_int, default=16, help="number of held-out blocks (default 16)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="blocks per forward (default 4)")
    parser.add_argument("--softmax-finetuned", default=None, metavar="DIR",
                        help="a softmax model fine-tuned with the same recipe and tokens, for the honest ratio")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
