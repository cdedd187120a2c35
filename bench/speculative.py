"""Speculative decoding on held-out Shakespeare: acceptance and wall-clock speed per draft kind and k.

For each draft kind and k, on the same prompts and in the same run: mean accepted draft tokens per target
call, target calls per new token, and tokens/s against plain (greedy) decoding of the same linearized target.
Every speculative output is also compared with the plain greedy output of its target: identical for a float
export (`identical` counts the sequences); an int8 export's can differ where the top tokens are close (its verify
calls and one-token calls round differently, and 8-bit activations magnify that; `SpeculativeDecoder` warns).

    python bench/speculative.py                         # prompt lookup (+ the drafts given below), k in 2,4,6,8
    python bench/speculative.py --draft-model DIR --medusa DIR --runtime ort
    python bench/speculative.py --runtime ort --ngram DIR --ks 4,8,12   # DIR from `lincompile build-ngram`
    python bench/speculative.py --runtime ort --ngram DIR1 DIR2 --ks 4,8 # two tables side by side
    python bench/speculative.py --runtime ort --onnx-dir A B --ngram DIR  # two exports side by side
    python bench/speculative.py --prompts 20 --new-tokens 64 --ks 4 --weights none --draft-model layers:4 --medusa zero
    python bench/speculative.py --quantize int8 --ks 4,8  # torch: float and 8-bit linear layers side by side
    python bench/speculative.py --quick                 # 2 prompts x 16 tokens, k in 2,4
"""
from __future__ import annotations

import argparse
import atexit
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lincompile.atomic import atomic_write
from lincompile.cli.args import positive_int, positive_int_list

ROOT = Path(__file__).resolve().parent.parent


def _prompts(tokenizer: Any, count: int, length: int) -> list[torch.Tensor]:
    from lincompile.train.data import heldout_blocks

    blocks = heldout_blocks(tokenizer, length, count)
    return [blocks[i:i + 1] for i in range(blocks.shape[0])]


def _targets(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """(the models to decode with by name: the torch model, or an onnxruntime session per export, named by its
    directory when there are several; the torch LinearizedModel; the tokenizer)."""
    from lincompile.assets import load_model
    from lincompile.pretrained import linearized

    model, tokenizer = load_model(args.model)
    linear = linearized(model, args.method, args.weights, args.model)
    args.weights = "none" if linear.recipe is None else "default" if args.weights == "auto" else args.weights
    if args.runtime == "ort":
        from lincompile.backends.onnx import META_FILE
        from lincompile.runtime.timing import open_ort

        if not args.onnx_dir:  # a fresh export (~0.6 GB), removed when the bench exits
            scratch = tempfile.mkdtemp(prefix="lincompile-bench-")
            atexit.register(shutil.rmtree, scratch, True)
        directories = args.onnx_dir or [Path(scratch) / "onnx"]
        names = [directory.name if len(directories) > 1 else "ort" for directory in directories]
        if len(set(names)) < len(names):
            raise SystemExit("--onnx-dir: two exports in directories of the same name; rename one")
        targets = {}
        for name, directory in zip(names, directories):
            if not (directory / META_FILE).is_file():  # an export given with --onnx-dir is reused
                linear.export_onnx(str(directory), tokenizer=tokenizer)
            targets[name] = open_ort(directory, args.threads, cpu_only=False)
        return targets, linear, tokenizer
    if args.quantize:  # the float model and its quantized twin side by side
        return {"torch": linear, f"torch-{args.quantize}": linear.quantize(args.quantize)}, linear, tokenizer
    return {"torch": linear}, linear, tokenizer


def _drafts(args: argparse.Namespace, linear: Any) -> dict[str, Any]:
    """prompt lookup, plus prompt lookup + an n-gram table, a draft model (a saved one, or `layers:N`: the
    target's first N layers linearized, undistilled) and Medusa heads (a saved directory, or `zero`: untrained
    heads) when asked for."""
    import lincompile

    drafts: dict[str, Any] = {"prompt-lookup": "prompt-lookup"}
    if args.ngram:
        from lincompile.runtime.ngram import NgramTable

        for directory in args.ngram:  # several tables are told apart by their directory's name
            name = "prompt-lookup+ngram" + (f"({Path(directory).name})" if len(args.ngram) > 1 else "")
            if name in drafts:
                raise SystemExit(f"--ngram: two tables in directories named {Path(directory).name!r}; rename one")
            drafts[name] = NgramTable.load(directory)
    if args.draft_model and args.draft_model.startswith("layers:"):
        from lincompile.assets import load_model
        from lincompile.train.draft_model import shallow_hf

        shallow = shallow_hf(load_model(args.model)[0], int(args.draft_model.split(":", 1)[1]))
        drafts["model"] = lincompile.optimize(shallow, args.method)
    elif args.draft_model:
        drafts["model"] = lincompile.load(args.draft_model)
    if args.medusa:
        from lincompile.runtime.medusa import MedusaConfig, MedusaHeads, lm_head_weight

        weight = lm_head_weight(linear)
        drafts["medusa"] = (MedusaHeads(MedusaConfig(num_heads=4, hidden_size=weight.shape[1],
                                                     vocab_size=weight.shape[0]), weight)
                            if args.medusa == "zero" else MedusaHeads.load(args.medusa, weight))
    return drafts


def _plain(target: Any, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    from lincompile.runtime.generate import generate

    start = time.perf_counter()
    out = generate(target, prompt, new_tokens)
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prompt by prompt and target by target, plain decoding then every (draft, k) on that prompt: a change in
    the machine's load during the run weighs on every column alike, so the ratios stay side by side. Each row's
    speedup is against plain decoding of its own target."""
    from lincompile.runtime.speculative import speculative_generate

    torch.set_num_threads(args.threads)
    targets, linear, tokenizer = _targets(args)
    prompts = _prompts(tokenizer, args.prompts, args.prompt_tokens)
    drafts = _drafts(args, linear)
    configs = [(target, name, k) for target in targets for name in drafts for k in args.ks]
    for target in targets.values():
        _plain(target, prompts[0], 4)  # warm-up
    for target, name, k in configs:  # warm-up: each verify width's first call, a draft model's or heads' first use
        speculative_generate(targets[target], prompts[0], k + 2, drafts[name], k)
    plain = {target: [0.0, 0] for target in targets}  # seconds, tokens
    totals = {c: {"seconds": 0.0, "calls": 0, "accepted": 0, "produced": 0, "identical": 0} for c in configs}
    for number, prompt in enumerate(prompts, 1):
        print(f"prompt {number}/{len(prompts)}", file=sys.stderr, flush=True)
        references = {}
        for target, model in targets.items():
            references[target], seconds = _plain(model, prompt, args.new_tokens)
            plain[target][0] += seconds
            plain[target][1] += references[target].shape[1] - prompt.shape[1]
        for target, name, k in configs:
            out, stats = speculative_generate(targets[target], prompt, args.new_tokens, drafts[name], k)
            total = totals[(target, name, k)]
            total["seconds"] += stats.seconds
            total["calls"] += stats.target_calls
            total["accepted"] += stats.accepted
            total["produced"] += stats.new_tokens
            total["identical"] += torch.equal(out, references[target])
    plain_rates = {target: tokens / seconds for target, (seconds, tokens) in plain.items()}
    first = next(iter(plain_rates.values()))
    rows = []
    for (target, name, k), total in totals.items():
        rate = total["produced"] / total["seconds"]
        calls = max(total["calls"], 1)
        rows.append({"target": target, "draft": name, "k": k, "accepted_per_call": total["accepted"] / calls,
                     "tokens_per_call": total["produced"] / calls, "calls_per_token": calls / max(total["produced"], 1),
                     "tokens_per_s": rate, "speedup": rate / plain_rates[target],
                     "speedup_vs_first_target": rate / first,
                     "identical_to_greedy": total["identical"] == len(prompts),
                     "identical_sequences": total["identical"]})
    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "runtime": args.runtime,
            "method": args.method, "weights": args.weights, "prompts": len(prompts),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "plain_tokens_per_s": first, "plain_tokens_per_s_by_target": plain_rates,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "rows": rows}


def _label(result: dict[str, Any], row: dict[str, Any]) -> str:
    """The row's draft, after its target's name when the run had several targets."""
    return f"{row['target']}: {row['draft']}" if len(result["plain_tokens_per_s_by_target"]) > 1 else row["draft"]


def _table(result: dict[str, Any]) -> str:
    width = max([len("draft")] + [len(_label(result, r)) for r in result["rows"]])
    targets = list(result["plain_tokens_per_s_by_target"])
    several = len(targets) > 1
    versus_width = max(len(targets[0]) + 3, 8)  # the column's header, "vs NAME", or a ratio as wide as "speedup"
    plain = ", ".join(f"{rate:.1f} tok/s" + (f" ({target})" if several else "")
                      for target, rate in result["plain_tokens_per_s_by_target"].items())
    lines = [f"plain greedy decoding: {plain} ({result['runtime']}, {result['method']}, weights "
             f"{result['weights']}, {result['prompts']} prompts x {result['new_tokens']} new tokens)",
             f"{'draft':>{width}} {'k':>3} {'accepted/call':>14} {'tokens/call':>12} {'tok/s':>8} {'speedup':>8} "
             + (f"{'vs ' + targets[0]:>{versus_width}} " if several else "") + f"{'identical':>9}",
             "(accepted/call: drafted tokens kept per target call; tokens/call: new tokens / target calls, the "
             "target's own tokens included; speedup: against plain decoding of the same target"
             + (f"; vs {targets[0]}: against plain decoding of {targets[0]}" if several else "")
             + "; identical: outputs equal to the target's plain greedy output)"]
    for r in result["rows"]:
        versus = f"{r['speedup_vs_first_target']:>{versus_width - 1}.2f}x " if several else ""
        lines.append(f"{_label(result, r):>{width}} {r['k']:>3} {r['accepted_per_call']:>14.2f} "
                     f"{r['tokens_per_call']:>12.2f} {r['tokens_per_s']:>8.1f} {r['speedup']:>7.2f}x {versus}"
                     f"{str(r['identical_sequences']) + '/' + str(result['prompts']):>9}")
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(_label(result, r) for r in result["rows"]):
        rows = [r for r in result["rows"] if _label(result, r) == name]
        left.plot([r["k"] for r in rows], [r["accepted_per_call"] for r in rows], marker="o", label=name)
        right.plot([r["k"] for r in rows], [r["speedup"] for r in rows], marker="o", label=name)
    left.set(xlabel="drafted tokens k", ylabel="accepted drafts per target call", title="acceptance")
    right.axhline(1.0, color="gray", linestyle=":")
    right.set(xlabel="drafted tokens k", ylabel="tokens/s vs plain decoding of the same target",
              title="wall-clock speedup")
    left.legend()
    fig.suptitle(f"speculative decoding, {result['method']} SmolLM2 ({result['runtime']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--weights", default="auto",
                        help="trained linearization: 'default' (shipped), a directory, 'none' (untrained), or 'auto' "
                             "(shipped when there is one, else untrained; the table says which)")
    parser.add_argument("--runtime", choices=("torch", "ort"), default="torch")
    parser.add_argument("--draft-model", help="a saved draft model (lincompile make-draft), or layers:N for the "
                        "target's first N layers, linearized and undistilled")
    parser.add_argument("--medusa", help="Medusa heads directory (lincompile train-medusa), or 'zero' for untrained "
                        "heads")
    parser.add_argument("--ngram", metavar="DIR", nargs="+", help="n-gram tables (lincompile build-ngram): each adds "
                        "prompt lookup filled up from that table")
    parser.add_argument("--ks", type=positive_int_list, default="2,4,6,8",
                        help="comma-separated numbers of drafted tokens")
    parser.add_argument("--prompts", type=positive_int, default=8)
    parser.add_argument("--prompt-tokens", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="2 prompts x 16 new tokens, k in 2,4")
    parser.add_argument("--onnx-dir", type=Path, nargs="+", default=None,
                        help="with --runtime ort: reuse the export in each directory, or export there (default: a "
                             "new temporary directory); several are decoded side by side, prompt by prompt")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="torch runtime: also decode with the model's 8-bit linear layers "
                             "(LinearizedModel.quantize), side by side with the float model")
    parser.add_argument("--tag", default="",
                        help="suffix of the result files (speculative_<runtime>[_<tag>][_quick])")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.ks = 2, 16, [2, 4]
    if args.quantize and args.runtime != "torch":
        parser.error("--quantize applies to the torch runtime; for onnxruntime pass an export with 8-bit weights "
                     "(lincompile export --quantize int8) in --onnx-dir")
    result = run(args)
    print(_table(result))
    print(f"command: {result['command']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speculative_{args.runtime}" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    atomic_write(out / f"{stem}.json", json.dumps(result, indent=2))
    _plot(result, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
