"""One comparison table from several `bench/quality.py` result files, at one training budget.

A long comparison is trained as several runs (one method per core, or a longer run for the leaders). Their result
files can be compared point for point when they share the model, the held-out blocks and the training recipe
(batch, block size, LR, seed, and the warm-up where both files record it): the LR is constant after warm-up and
the data order fixed, so a run's evaluation at N tokens is what a run stopped at N tokens reports. This script
checks that the files agree on all of that, takes every run's evaluation at `--at` tokens, and prints each
method's perplexity beside the original's and `--versus`'s (the paper's `augmented` by default), then whether
`--versus` leads every plain baseline.

    python bench/quality_report.py bench/results/quality_cpu_16x_*_stage1-20.json bench/results/quality_cpu_32x*.json

A method trained with two stage-1 lengths appears once per length. `--window W` averages each run's evaluations from
`--at` - W to `--at` (one evaluation on a small held-out set is noisy). `--plot PATH` draws the curves up
to `--at`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

SHARED = ("model", "ppl_original", "heldout_tokens", "device")  # a GPU trains in bf16, a CPU in fp32
RECIPE = ("batch_size", "block_size", "lr", "seed", "warmup_steps")  # files before session 14 lack warm-up
AGREE = 1e-3  # two files' evaluations of the same run (method, split) must agree this closely (relative)


class ReportError(ValueError):
    """The result files cannot be compared: which file, which field, and what to do."""


@dataclass(frozen=True)
class Row:
    """One run's perplexity at the report's budget; `label` names the method and, when split, its stage-1 length."""

    label: str
    method: str
    role: str
    stage1_steps: int
    ppl: float
    source: str


def load(paths: list[Path]) -> list[dict]:
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: cannot read a quality result ({exc})") from None
        missing = [k for k in (*SHARED, "budget", "runs") if k not in result]
        if missing:
            raise ReportError(f"{path}: not a bench/quality.py result file (no {', '.join(missing)})")
        result["source"] = path.name
        results.append(result)
    if not results:
        raise ReportError("no result files given")
    first = results[0]
    for result in results[1:]:
        for key in SHARED:
            if not _same(result[key], first[key]):
                raise ReportError(f"{result['source']} has {key} = {result[key]}, {first['source']} has "
                                  f"{first[key]}: they were evaluated differently; compare them in separate reports")
        for key in RECIPE:
            if key == "warmup_steps" and key not in result["budget"].keys() & first["budget"].keys():
                continue
            if result["budget"].get(key) != first["budget"].get(key):
                raise ReportError(f"{result['source']} was trained with {key} = {result['budget'].get(key)}, "
                                  f"{first['source']} with {first['budget'].get(key)}: not the same recipe")
    return results


def unfinished(results: list[dict]) -> list[str]:
    """The files whose run was stopped before it finished (`complete` false): the methods it had yet to train are
    missing from them, so a report built on them may lack a baseline (files older than the field count as finished)."""
    return [result["source"] for result in results if result.get("complete") is False]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= AGREE * abs(b)
    return a == b


def rows_at(results: list[dict], tokens: int, window: int) -> tuple[list[Row], list[str]]:
    """Every run's perplexity at `tokens` (the mean of its evaluations from tokens - window to tokens), one row per
    (method, stage-1 length), best first; and the runs that did not reach `tokens`."""
    found: dict[tuple[str, int], Row] = {}
    short: list[str] = []
    for result in results:
        for run in result["runs"]:
            points = [p["ppl"] for p in run["curve"] if tokens - window <= p["tokens"] <= tokens]
            if not any(p["tokens"] == tokens for p in run["curve"]):
                short.append(f"{run['method']} ({result['source']}: {run['curve'][-1]['tokens']} tokens)")
                continue
            key = (run["method"], run["stage1_steps"])
            row = Row(run["method"], run["method"], run["role"], run["stage1_steps"], sum(points) / len(points),
                      result["source"])
            if key in found:
                if not _same(row.ppl, found[key].ppl):
                    raise ReportError(f"{run['method']} with {run['stage1_steps']} attention-transfer steps reads "
                                      f"{found[key].ppl:.4g} in {found[key].source} and {row.ppl:.4g} in "
                                      f"{result['source']} at {tokens} tokens: the same run should agree")
                continue
            found[key] = row
    splits: dict[str, set[int]] = {}
    for method, stage1 in found:
        splits.setdefault(method, set()).add(stage1)
    rows = [replace(row, label=f"{row.method} ({row.stage1_steps} AT steps)") if len(splits[row.method]) > 1
            else row for row in found.values()]
    return sorted(rows, key=lambda r: r.ppl), short


def verdict(rows: list[Row], versus: str) -> str:
    """Whether `versus` leads every plain baseline, each at its best split in the report, in one line."""
    ours = [r for r in rows if r.method == versus]
    baselines = [r for r in rows if r.role == "baseline"]
    if not ours or not baselines:
        return f"no verdict: the report needs both {versus} and a plain baseline"
    mine, best = min(ours, key=lambda r: r.ppl), min(baselines, key=lambda r: r.ppl)
    if mine.ppl < best.ppl:
        return (f"{versus} leads every plain baseline ({len(baselines)} runs): {mine.ppl:.1f} against the best "
                f"baseline's {best.ppl:.1f} ({best.label}, {best.ppl / mine.ppl:.2f}x)")
    return f"{versus} does NOT lead every plain baseline: {best.label} {best.ppl:.1f} against {mine.ppl:.1f}"


def table(rows: list[Row], ppl_original: float, versus: str, mean: bool) -> list[list[str]]:
    reference = min((r.ppl for r in rows if r.method == versus), default=None)
    lines = [["method", "role", "mean ppl" if mean else "ppl", "/ original", f"/ {versus}", "from"]]
    for r in rows:
        lines.append([r.label, r.role, f"{r.ppl:.1f}", f"{r.ppl / ppl_original:.2f}x",
                      "-" if reference is None else f"{r.ppl / reference:.2f}x", r.source])
    return lines


def render(lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" + ("\n|" + "---|" * len(line) if i == 0 else "")
                         for i, line in enumerate(lines))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def plot(results: list[dict], rows: list[Row], tokens: int, path: Path) -> None:
    """The kept runs' curves up to `tokens`, drawn by `bench/quality.py`'s plot."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import plot as quality_plot

    kept = {(r.method, r.stage1_steps): r for r in rows}
    runs = []
    for result in results:
        for run in result["runs"]:
            row = kept.pop((run["method"], run["stage1_steps"]), None)
            if row is not None:
                curve = [p for p in run["curve"] if p["tokens"] <= tokens]
                runs.append({**run, "method": row.label, "curve": curve, "tokens": tokens, "ppl": curve[-1]["ppl"]})
    quality_plot({"model": results[0]["model"], "ppl_original": results[0]["ppl_original"], "runs": runs}, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="bench/quality.py result files (quality_*.json)")
    parser.add_argument("--at", type=int, default=245760,
                        help="training tokens to compare at: a point every run was evaluated at (default 245760)")
    parser.add_argument("--window", type=int, default=0,
                        help="average each run's evaluations from --at - W to --at (default 0: one point)")
    parser.add_argument("--versus", default="augmented", help="the method the ratios are to (default augmented)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--plot", type=Path, help="also draw the kept runs' curves up to --at into this PNG")
    args = parser.parse_args(argv)
    try:
        results = load(args.files)
        rows, short = rows_at(results, args.at, args.window)
    except ReportError as exc:
        parser.error(str(exc))
    if not rows:
        parser.error(f"no run was evaluated at {args.at} tokens; pick --at from the runs' evaluation points")
    first = results[0]
    span = f", mean of the evaluations from {args.at - args.window} tokens" if args.window else ""
    print(f"{first['model']} at {args.at} training tokens{span}; held-out perplexity on {first['heldout_tokens']} "
          f"tokens, original {first['ppl_original']:.2f}")
    print(render(table(rows, first["ppl_original"], args.versus, args.window > 0), args.markdown))
    if short:
        print("not reaching " + str(args.at) + " tokens: " + "; ".join(short))
    stopped = unfinished(results)
    if stopped:
        print(f"stopped before finishing (complete: false): {', '.join(stopped)}; the methods they had not trained "
              "yet are missing from this report")
    print(verdict(rows, args.versus))
    print("made by:")
    for result in results:
        if any(r.source == result["source"] for r in rows):
            print(f"  {result['source']}: {result.get('command', '(no command recorded)')}")
    if args.plot:
        plot(results, rows, args.at, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
