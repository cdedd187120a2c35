"""Which Hugging Face causal-LM families lincompile linearizes: tiny random models, built from configs alone.

For each family in `lincompile.testing.families.FAMILIES` and each attention implementation Hugging Face offers
for it: attention sites found per layer, mask kinds and sliding windows, softmax-like nodes left unmatched, the
exact `softmax` rewrite's largest logit difference from the original over real tokens of a left-padded batch,
and `augmented` prefill + single-token decode against its own full forward (relative); with --onnx, also that
`augmented` model exported to ONNX, its prefill and decode steps in onnxruntime against torch's (relative).
Prints a table; with --json, writes the rows too.

    python bench/families.py [--onnx] [--json bench/results/families.json] [--families gemma phi3 ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from lincompile.atomic import atomic_write
    from lincompile.testing.families import FAMILIES, check_family

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=sorted(FAMILIES), choices=sorted(FAMILIES),
                        metavar="FAMILY", help="families to check (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--onnx", action="store_true",
                        help="also export each `augmented` model to ONNX and compare onnxruntime's decoding with "
                             "torch's")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'family':<14} {'attn':<6} {'sites':>6} {'unmatched':>9} {'kinds':<16} {'window':>7} "
          f"{'softmax diff':>12} {'decode rel':>10} {'onnx rel':>9}  note")
    for family in args.families:
        for impl in ("sdpa", "eager"):
            start = time.perf_counter()
            try:
                with tempfile.TemporaryDirectory() if args.onnx else contextlib.nullcontext() as onnx_dir:
                    row = check_family(family, impl, onnx_dir)
            except Exception as exc:  # a family's failure is a row of the table, not the end of the run
                message = str(exc).splitlines()[0][:100]
                if "does not support an attention implementation" in message:
                    continue
                row = {"family": family, "attn": impl, "error": f"{type(exc).__name__}: {message}"}
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            if "error" in row:
                print(f"{family:<14} {impl:<6} {'-':>6} {'-':>9} {'-':<16} {'-':>7} {'-':>12} {'-':>10} {'-':>9}  "
                      f"{row['error']}", flush=True)
                continue
            windows = sorted({w for w in row["windows"] if w})
            decode = "-" if row["decode_rel"] is None else f"{row['decode_rel']:.1e}"
            onnx = f"{row['onnx_rel']:.1e}" if "onnx_rel" in row else "-"
            note = "" if row["sites"] == row["layers"] else "sites != layers"
            print(f"{family:<14} {impl:<6} {row['sites']:>3}/{row['layers']:<2} {row['unmatched']:>9} "
                  f"{','.join(row['kinds']):<16} {','.join(map(str, windows)) or '-':>7} "
                  f"{row['softmax_diff']:>12.1e} {decode:>10} {onnx:>9}  {note}", flush=True)
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
