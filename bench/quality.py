"""The paper's quality comparison on SmolLM2-135M: every method trained with the same budget, held-out perplexity.

Each method is swapped into the same captured model and trained with `lincompile.train.trainer.train` on the
Shakespeare train split, in the same data order, for the same number of optimizer steps of the same batch:
stage 1 (attention transfer) fits the method's new parameters for `--stage1-steps`, then stage 2 fine-tunes LoRA
(r=8 on q/k/v/o) plus those parameters. A method without new parameters (e.g. linear-elu) has nothing to fit in
stage 1, so it spends those steps in stage 2: every method sees the same number of training tokens. `softmax`
(the original attention through the lincompile op) is trained with the same recipe: perplexity divided by its
perplexity is what linearization costs, once the fine-tuning's own adaptation to the corpus is taken out.

Every run is evaluated on the same held-out blocks, untrained, every `--eval-every` steps and at the end.

    python bench/quality.py --quick                       # 4 methods, a few steps each: a smoke run
    python bench/quality.py                               # every method below, CPU budget (~1 h on one core)
    python bench/quality.py --device cuda --stage2-steps 1000 --block-size 1024   # a GPU-sized budget

Writes bench/results/quality_<tag>.json and quality_<tag>.png (perplexity against training tokens); the JSON is
rewritten after each method, so a run stopped midway keeps what it measured (`complete` says whether it finished).
`--jobs N` trains N methods at once, each in its own process on its share of the CPUs.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch

from lincompile.atomic import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("linear-elu", "linear-relu", "performer", "cosformer", "hedgehog", "taylor", "retnet", "yoso",
             "castling")
ABLATIONS = ("local", "grouped", "local+grouped", "augmented")  # local only, global only, both, both + conv
AUGMENTED_BASES = ("augmented-hedgehog",)  # the causal conv on the strongest baseline: does the augmentation help it?
REFERENCE = "softmax"
QUICK_METHODS = ("softmax", "linear-elu", "local+grouped", "augmented")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def role(method: str) -> str:
    if method == REFERENCE:
        return "reference"
    if method.startswith("augmented"):
        return "ours"
    return "ablation" if method in ABLATIONS else "baseline"


def has_new_parameters(linear: object) -> bool:
    from lincompile.train.attention_transfer import attention_parameters

    return bool(attention_parameters(linear))


def train_one(model: torch.nn.Module, captured: object, method: str, blocks: torch.Tensor, held: torch.Tensor,
              args: argparse.Namespace, work: Path) -> dict:
    """Linearize `captured` with `method`, train it with the shared budget, return its evaluations."""
    import lincompile
    from lincompile.config import LinearizeConfig
    from lincompile.train.eval import perplexity
    from lincompile.train.trainer import TrainConfig, train

    linear = lincompile.optimize(model, config=LinearizeConfig(method=method, seed=args.seed), captured=captured)
    stage1 = args.stage1_steps if has_new_parameters(linear) else 0
    config = TrainConfig(stage1_steps=stage1, stage2_steps=args.stage2_steps + args.stage1_steps - stage1,
                         batch_size=args.batch_size, block_size=args.block_size, lr=args.lr,
                         warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_blocks=held.shape[0],
                         checkpoint_every=0, keep_checkpoints=1, seed=args.seed, bf16=args.device == "cuda")
    start = time.perf_counter()
    result = train(linear, blocks, config, work / method, eval_blocks=held, progress=not args.no_progress,
                   desc=method)
    seconds = time.perf_counter() - start
    tokens_per_step = args.batch_size * args.block_size
    curve = [{"tokens": e["step"] * tokens_per_step, "step": e["step"], "ppl": e["ppl"]} for e in result.evals]
    final = perplexity(linear, held, progress=False, desc=method).ppl
    return {"method": method, "role": role(method), "stage1_steps": stage1, "stage2_steps": config.stage2_steps,
            "tokens": config.total_steps * tokens_per_step, "seconds": seconds, "ppl_untrained": curve[0]["ppl"],
            "ppl": final, "curve": curve}


def summarize(args: argparse.Namespace, ppl_original: float, heldout_tokens: int, runs: list[dict]) -> dict:
    """The result so far: every run with its ratios to the original and to the fine-tuned softmax."""
    reference = next((r["ppl"] for r in runs if r["method"] == REFERENCE), None)
    for r in runs:
        r["ratio_to_original"] = r["ppl"] / ppl_original
        r["ratio_to_softmax_finetuned"] = r["ppl"] / reference if reference else None
    return {"model": args.model, "ppl_original": ppl_original, "heldout_tokens": heldout_tokens, "runs": runs}


class Setup:
    """What every method's run shares: the model, its captured graph, the training and held-out token blocks."""

    def __init__(self, args: argparse.Namespace) -> None:
        from lincompile.assets import load_model
        from lincompile.train.data import heldout_blocks, load_texts, token_blocks

        torch.manual_seed(args.seed)
        self.model, tokenizer = load_model(args.model)
        self.model.to(args.device)
        self.blocks = token_blocks(tokenizer, load_texts("train"), args.block_size, None)
        self.held = heldout_blocks(tokenizer, args.block_size, args.eval_blocks).to(args.device)

    @functools.cached_property
    def captured(self) -> object:
        """The model's captured graph, made on first use (the main process of a `--jobs` run never trains)."""
        import lincompile

        return lincompile.api.capture_model(self.model)


_WORKER: dict = {}


def _start_worker(args: argparse.Namespace, counter: object, jobs: int) -> None:
    """A worker process: its share of the CPUs (disjoint from the other workers'), then its own Setup."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if hasattr(os, "sched_setaffinity") and args.device == "cpu":
        cpus = sorted(os.sched_getaffinity(0))
        mine = cpus[index::jobs] or cpus
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))
    args.no_progress = True  # one bar per process would garble the terminal: evaluation lines name their method
    _WORKER.update(args=args, setup=Setup(args))


def _train_in_worker(method: str) -> dict:
    args, setup = _WORKER["args"], _WORKER["setup"]
    try:
        with tempfile.TemporaryDirectory(prefix="lincompile-quality-") as tmp:
            return train_one(setup.model, setup.captured, method, setup.blocks, setup.held, args, Path(tmp))
    except Exception as exc:  # sent back as text: some errors (torch.export's UserError) fail to unpickle, which
        # stops the pool's result thread and leaves the main process waiting forever (seen on a GPU)
        raise RuntimeError(f"{method}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None


def _runs(args: argparse.Namespace, setup: Setup) -> Iterator[dict]:
    """Each method's result as it finishes: in this process one after another, or in `--jobs` worker processes."""
    if args.jobs == 1:
        with tempfile.TemporaryDirectory(prefix="lincompile-quality-") as tmp:
            for method in args.methods:
                _log(f"{method}: training {args.stage1_steps + args.stage2_steps} steps")
                yield train_one(setup.model, setup.captured, method, setup.blocks, setup.held, args, Path(tmp))
        return
    workers = min(args.jobs, len(args.methods))
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    _log(f"training {len(args.methods)} methods in {workers} processes")
    with context.Pool(workers, _start_worker, (args, counter, workers)) as pool:
        yield from pool.imap_unordered(_train_in_worker, args.methods)
        pool.close()  # then join: a clean exit, where the context manager's terminate() stops workers abruptly
        pool.join()


def run(args: argparse.Namespace, on_method: Callable[[dict], None]) -> dict:
    """Train and evaluate every method; `on_method` gets the result so far after each one (for saving). Runs are
    listed in `args.methods`' order whichever finishes first."""
    from lincompile.train.eval import perplexity

    setup = Setup(args)
    held = setup.held
    ppl_original = perplexity(setup.model, held, progress=False, desc="original").ppl
    _log(f"original perplexity {ppl_original:.2f} on {held[:, 1:].numel()} held-out tokens")
    runs: list[dict] = []
    for result in _runs(args, setup):
        _log(f"{result['method']}: ppl {result['ppl']:.2f} ({result['seconds']:.0f} s)")
        runs.append(result)
        runs.sort(key=lambda r: args.methods.index(r["method"]))
        on_method(summarize(args, ppl_original, int(held[:, 1:].numel()), runs))
    return summarize(args, ppl_original, int(held[:, 1:].numel()), runs)


def print_table(result: dict) -> None:
    header = ["method", "role", "ppl untrained", "ppl trained", "/ original", "/ softmax fine-tuned", "tokens",
              "seconds"]
    lines = [header]
    for r in result["runs"]:
        tuned = r["ratio_to_softmax_finetuned"]
        lines.append([r["method"], r["role"], f"{r['ppl_untrained']:.1f}", f"{r['ppl']:.2f}",
                      f"{r['ratio_to_original']:.2f}x", "-" if tuned is None else f"{tuned:.2f}x",
                      str(r["tokens"]), f"{r['seconds']:.0f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"original {result['model']}: held-out perplexity {result['ppl_original']:.2f} "
          f"({result['heldout_tokens']} tokens)")
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"reference": "--", "ours": "-", "ablation": "-.", "baseline": ":"}
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: a full comparison has 15 methods
    lowest = result["ppl_original"]
    for i, r in enumerate(result["runs"]):
        curve = r["curve"] + [{"tokens": r["tokens"], "ppl": r["ppl"]}]
        lowest = min(lowest, *(p["ppl"] for p in curve))
        ax.plot([p["tokens"] for p in curve], [p["ppl"] for p in curve], styles[r["role"]], marker="o",
                markersize=3, color=colors[i % len(colors)], label=r["method"])
    ax.axhline(result["ppl_original"], color="black", linewidth=0.8, label="original (untouched)")
    # the top is clipped at 1000x the original: an untrained map can start at 1e9 and flatten every other curve
    ax.set(yscale="log", xlabel="training tokens", ylabel="held-out perplexity", ylim=(lowest / 1.2, None),
           title=f"{result['model']}: quality at an equal training budget")
    ax.set_ylim(top=min(ax.get_ylim()[1], 1000 * result["ppl_original"]))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", help="default: softmax, every baseline, ablation and augmented "
                        "form (with --quick: " + ", ".join(QUICK_METHODS) + ")")
    parser.add_argument("--stage1-steps", type=int, default=10, help="attention-transfer steps (default 10)")
    parser.add_argument("--stage2-steps", type=int, default=20, help="fine-tuning steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per optimizer step (default 4)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default 128)")
    parser.add_argument("--lr", type=float, default=5e-4, help="stage-2 LR (default 5e-4)")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="data order, LoRA init and random features (Performer) (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--jobs", type=int, default=1,
                        help="methods trained at once, each in its own process on its share of the CPUs (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 + 4 steps of 2 x 64 tokens, 2 held-out blocks")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", help="names the outputs quality_<tag>.json / .png (default: the device, plus _quick)")
    args = parser.parse_args(argv)
    default_methods = QUICK_METHODS if args.quick else (REFERENCE, *BASELINES, *ABLATIONS, *AUGMENTED_BASES)
    args.methods = args.methods or list(default_methods)
    if args.quick:
        args.stage1_steps, args.stage2_steps = 2, 4
        args.batch_size, args.block_size, args.eval_every, args.eval_blocks = 2, 64, 3, 2
    from lincompile.methods.spec import get_method

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this PyTorch sees no CUDA GPU")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods lists a method twice")
    for method in args.methods:
        get_method(method)  # an unknown name fails here, before the model loads
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    tag = args.tag or f"{args.device}{'_quick' if args.quick else ''}"
    meta = {"command": command, "device": args.device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "budget": {k: getattr(args, k) for k in (
                "stage1_steps", "stage2_steps", "batch_size", "block_size", "lr", "warmup_steps", "seed")}}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"quality_{tag}.json", args.out / f"quality_{tag}.png"

    def save(result: dict, complete: bool) -> None:  # atomic: a long run stopped midway keeps what it measured
        result.update(meta, complete=complete)
        atomic_write(json_path, json.dumps(result, indent=1) + "\n")

    result = run(args, lambda so_far: save(so_far, complete=False))
    save(result, complete=True)
    plot(result, png_path)
    print()
    print_table(result)
    print(f"\nwrote {json_path} and {png_path}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
