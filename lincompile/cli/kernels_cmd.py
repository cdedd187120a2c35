"""`lincompile kernels`: which methods have generated Triton kernels, and their source.

Without options: one row per registered method, its generated forms or why the reference serves it.
`--print-source METHOD --form FORM` prints the generated kernel of that form with the helpers it calls (the
module constants first), for one shape class (`--head-dim`, `--v-head-dim`, `--dtype`). Generating source needs
no GPU and no Triton. Errors raise; `lincompile.cli.main` turns them into one line.
"""
from __future__ import annotations

import argparse
import ast
import json
from typing import Any

from lincompile.cli.args import given_flags, positive_int
from lincompile.kernels.triton.codegen import generate
from lincompile.kernels.triton.codegen_bwd import generate_backward
from lincompile.kernels.triton.plan import DTYPES, Plan, block, unsupported_reason
from lincompile.methods.spec import get_method, methods

PROG = "lincompile"
#: CLI form name -> the kernel functions it prints from the generated forward or backward module.
KERNELS = {"chunked_fwd": ("chunked_fwd",), "parallel_fwd": ("chunk_sums", "chunk_outputs"),
           "recurrent": ("recurrent",), "verify": ("verify_fwd",), "chunked_bwd": ("bwd_dq", "bwd_dkv"),
           "parallel_bwd": ("bwd_dq_chunks", "bwd_dkv_chunks")}
BACKWARD_FORMS = ("chunked_bwd", "parallel_bwd")
#: The chunk-parallel forms, which decay (a decayed scan) does not have: it walks the chunks.
PARALLEL_FORMS = ("parallel_fwd", "parallel_bwd")
#: Which calls the generated forms leave to the reference, for methods the generator covers.
PARTIAL = ("bidirectional calls, interior padding, fp64; backward of calls that start from a state or carry a "
           "key mask (recomputed through the reference)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `kernels` on the main parser's subparsers."""
    summary = "list the generated Triton kernels per method, or print one's source"
    parser = subparsers.add_parser(
        "kernels", help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{summary}\n\nKernels are generated from each method's MethodSpec (feature map, normalizer,\n"
                    "local and global branches, causal conv fused) per head dims and dtype; methods the generator\n"
                    "cannot express run on the PyTorch reference.",
        epilog=f"example:\n  {PROG} kernels --print-source augmented --form chunked_fwd --head-dim 128")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on error")
    parser.add_argument("--print-source", metavar="METHOD", default=None, help="print a generated kernel's source")
    parser.add_argument("--form", choices=tuple(KERNELS), default=None,
                        help="which kernels to print (parallel_*: the chunk-parallel forms; *_bwd: the backward; "
                             "default chunked_fwd)")
    parser.add_argument("--head-dim", type=positive_int, default=None,
                        help="q/k head dim of the shape class (default 64)")
    parser.add_argument("--v-head-dim", type=positive_int, default=None, help="v head dim (default: --head-dim)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="input dtype of the shape class (default float32)")
    parser.add_argument("--json", action="store_true",
                        help="print the listing as one JSON list (with --print-source: one object with the source)")
    parser.set_defaults(func=run)
    return parser


def listing() -> list[dict[str, Any]]:
    """One entry per registered method: its generated forms, or the reason the reference serves it."""
    rows = []
    for name in methods():
        reason = unsupported_reason(get_method(name))
        forms = [] if reason else [f for f in KERNELS if not (get_method(name).decay and f in PARALLEL_FORMS)]
        rows.append({"method": name, "generated": forms, "reference": reason or PARTIAL})
    return rows


def kernel_source(method: str, form: str, head_dim: int = 64, v_head_dim: int | None = None,
                  dtype: str = "float32") -> str:
    """The module constants and the `form` kernels with every generated helper they call, in module order."""
    spec = get_method(method)
    if form not in KERNELS:
        raise ValueError(f"unknown form {form!r}: choose from {', '.join(KERNELS)}")
    if spec.decay and form in PARALLEL_FORMS:
        raise ValueError(f"{method} decays its state, so it has no {form} kernels (its prefill and backward walk "
                         "the chunks): choose chunked_fwd or chunked_bwd")
    dv = v_head_dim or head_dim
    full = block(dv)
    if form in BACKWARD_FORMS:
        source = generate_backward(Plan(spec, head_dim, dv, dtype, full))
    else:
        source = generate(Plan(spec, head_dim, dv, dtype, min(64, full)))
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    needed, todo = set(), list(KERNELS[form])
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
    lines = source.splitlines()
    header: list[str] = []
    blocks: list[str] = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            header += lines[node.lineno - 1:node.end_lineno]
        elif node.name in needed:
            blocks.append("\n".join(lines[node.decorator_list[0].lineno - 1:node.end_lineno]))
    return "\n\n\n".join(["\n".join(header)] + blocks) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the listing or one kernel's source; 0 on success. The shape options choose the printed kernel, so
    without --print-source they are refused rather than ignored."""
    given = given_flags({"--form": args.form, "--head-dim": args.head_dim, "--v-head-dim": args.v_head_dim,
                         "--dtype": args.dtype})
    if not args.print_source and given:
        raise ValueError(f"{given} choose the kernel --print-source prints: add --print-source METHOD, or drop "
                         "them to list the methods")
    if args.print_source:
        form, head_dim, dtype = args.form or "chunked_fwd", args.head_dim or 64, args.dtype or "float32"
        source = kernel_source(args.print_source, form, head_dim, args.v_head_dim, dtype)
        if args.json:
            print(json.dumps({"method": args.print_source, "form": form, "head_dim": head_dim,
                              "v_head_dim": args.v_head_dim or head_dim, "dtype": dtype, "source": source}))
        else:
            print(source, end="")
        return 0
    rows = listing()
    if args.json:
        print(json.dumps(rows))
        return 0
    width = max(len(row["method"]) for row in rows)
    statuses = [", ".join(row["generated"]) or "-" for row in rows]
    column = max(len(status) for status in statuses)
    for row, status in zip(rows, statuses):
        print(f"{row['method']:<{width}}  generated: {status:<{column}}  reference: {row['reference']}")
    return 0
