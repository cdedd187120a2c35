"""Attention kernel timings: lincompile's forms against SDPA, side by side in one run, as ratios.

On CUDA: the generated Triton kernels (prefill forward = the chunk-parallel form, and "(walk)" = chunked_fwd, one
program per head walking the chunks; forward+backward = the prefill then the generated chunked backward, through
the `lincompile::attention` op's autograd, chunk-parallel, and "(walk)" = chunked_fwd then bwd_dq / bwd_dkv
walking; decode = recurrent step from a state) against SDPA (FlashAttention; decode attends one query to a KV
cache of T tokens) and, when installed, flash-linear-attention's chunk_linear_attn / fused_recurrent_linear_attn,
for T in 1K..32K (triton.testing.do_bench medians); first, the decode step's memory bandwidth at `--decode-batch`
rows against a device-to-device copy's.
On CPU: the PyTorch reference forms (parallel = masked quadratic, chunked, each forward and forward+backward;
"chain prefill" = what the op runs for a prefill at inference: chunks of 64 through `chain.run`;
recurrent and `decode.step` per decode token; a 9-token verify call from the state after T tokens, parallel and
`chain.run`) against SDPA (the verify call's 9 queries attend to the T cached keys), so the scaling in T shows
on any machine (medians of --repeats runs after a warm-up).

Writes bench/results/kernels_<device>.json (device, command, rows, rewritten after each T; `complete` says whether
the run finished) and kernels_<device>.png (time against T); `--quick` names them kernels_<device>_quick.
    python bench/attention_kernels.py --quick            # CPU, well under a minute
    python bench/attention_kernels.py --device cuda      # GPU, T = 1K..32K
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lincompile.atomic import atomic_write
from lincompile.cli.args import positive_int, positive_int_list
from lincompile.kernels import registry
from lincompile.kernels.linear_attention import chain, decode, reference
from lincompile.methods.params import random_params
from lincompile.methods.spec import MethodSpec, get_method

RESULTS = Path(__file__).resolve().parent / "results"
DECODE_STEPS = 16
VERIFY_TOKENS = 9  # a verify call of k = 8 drafts and the token before them


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=max(25, repeats * 10), return_mode="median"))


def _inputs(spec: MethodSpec, args: argparse.Namespace, t: int, requires_grad: bool = False,
            batch: int | None = None):
    g = torch.Generator(device=args.device).manual_seed(t)
    batch = batch or args.batch
    dtype = getattr(torch, args.dtype)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=args.device, dtype=dtype).requires_grad_(requires_grad)

    q = rnd(batch, args.heads, t, args.head_dim)
    k = rnd(batch, args.kv_heads, t, args.head_dim)
    v = rnd(batch, args.kv_heads, t, args.head_dim)
    params = [p.to(args.device, dtype) for p in random_params(spec, args.heads, args.kv_heads, args.head_dim,
                                                                args.head_dim)]
    return q, k, v, params


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _fla():
    """flash-linear-attention's (chunk, fused_recurrent) linear attention, or None when not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
    except ImportError:
        return None
    return chunk_linear_attn, fused_recurrent_linear_attn


def _time_or_error(fn: Callable[[], object], repeats: int) -> float | str:
    try:
        return _median_ms(fn, repeats)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"
    except Exception as exc:  # a comparison point that cannot run (e.g. an fla version mismatch) is reported
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def cpu_row(spec: MethodSpec, args: argparse.Namespace, t: int) -> dict[str, float | str]:
    """Reference forms vs SDPA at one T (ms; decode forms per token), timed round-robin so that load on a
    shared machine hits every form alike."""
    scale = 1.0 / math.sqrt(args.head_dim)
    q, k, v, params = _inputs(spec, args, t)
    _, state = reference.chunked(q, k, v, None, None, [], params, spec, scale, True, 64)
    step = [x[:, :, :DECODE_STEPS] for x in (q, k, v)]
    kv = (k.repeat_interleave(args.heads // args.kv_heads, 1), v.repeat_interleave(args.heads // args.kv_heads, 1))
    grads = [x.detach().requires_grad_() for x in (q, k, v)]

    verify = [x[:, :, :VERIFY_TOKENS] for x in (q, k, v)]  # a speculative verify call from the state

    def steps() -> None:  # decode.step token by token (what the op runs for a decode call)
        after = state
        for i in range(DECODE_STEPS):
            _, after = decode.step(*(x[:, :, i:i + 1] for x in step), after, params, spec, scale)

    forms: dict[str, tuple[Callable[[], object], int]] = {
        "sdpa prefill": (lambda: _sdpa(q, k, v), 1),
        "chunked prefill": (lambda: reference.chunked(q, k, v, None, None, [], params, spec, scale, True, 64), 1),
        "chain prefill": (lambda: registry.recurrent_step(q, k, v, None, None, [], params, spec, scale, True), 1),
        "sdpa fwd+bwd": (_backward(lambda: _sdpa(*grads)), 1),
        "chunked fwd+bwd": (_backward(lambda: reference.chunked(*grads, None, None, [], params, spec, scale, True,
                                                                64)[0]), 1),
        "sdpa decode/token": (lambda: _sdpa(q[:, :, -1:], *kv, causal=False), 1),
        "recurrent decode/token": (lambda: reference.recurrent(*step, None, state, params, spec, scale),
                                   DECODE_STEPS),
        "decode.step decode/token": (steps, DECODE_STEPS),
        "sdpa verify/call": (lambda: _sdpa(q[:, :, -VERIFY_TOKENS:], *kv, causal=False), 1),
        "parallel verify/call": (lambda: reference.attention(*verify, None, None, state, params, spec, scale, True),
                                 1),
    }
    if chain.applies(verify[0], None, state, spec, True):  # within one group (not across a boundary)
        forms["chain verify/call"] = (lambda: chain.run(*verify, state, params, spec, scale), 1)
    if t <= args.parallel_max:
        forms["parallel prefill"] = (lambda: reference.attention(q, k, v, None, None, [], params, spec, scale,
                                                                 True), 1)
        forms["parallel fwd+bwd"] = (_backward(lambda: reference.attention(*grads, None, None, [], params, spec,
                                                                           scale, True)[0]), 1)
    times: dict[str, list[float]] = {name: [] for name in forms}
    for fn, _ in forms.values():
        fn()
    for _ in range(args.repeats):
        for name, (fn, per) in forms.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3 / per)
    return {name: statistics.median(values) for name, values in times.items()}


def _backward(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """`forward` then the backward of its output's sum, with autograd on (the CPU rows run under no_grad)."""
    def run() -> None:
        with torch.enable_grad():
            forward().sum().backward()
    return run


def _walking(fn: Callable[[], object]) -> object:
    """fn with every prefill and backward in the kernels that walk the chunks (one program per head), not
    chunk-parallel."""
    from lincompile.kernels.triton import launch

    saved, launch.PARALLEL_MIN_CHUNKS = launch.PARALLEL_MIN_CHUNKS, 10 ** 9
    try:
        return fn()
    finally:
        launch.PARALLEL_MIN_CHUNKS = saved


def cuda_row(spec: MethodSpec, args: argparse.Namespace, t: int) -> dict[str, float | str]:
    """Generated kernels vs SDPA (and fla) at one T (ms)."""
    import lincompile.kernels.ops  # noqa: F401  (registers lincompile::attention)
    from lincompile.kernels.triton import launch

    scale = 1.0 / math.sqrt(args.head_dim)
    q, k, v, params = _inputs(spec, args, t)
    _, state = launch.attention(q, k, v, None, None, [], params, spec, scale, True)
    one = [x[:, :, -1:].contiguous() for x in (q, k, v)]
    kv = (k.repeat_interleave(args.heads // args.kv_heads, 1), v.repeat_interleave(args.heads // args.kv_heads, 1))
    row: dict[str, float | str] = {
        "sdpa prefill": _time_or_error(lambda: _sdpa(q, k, v), args.repeats),
        "triton prefill": _time_or_error(
            lambda: launch.attention(q, k, v, None, None, [], params, spec, scale, True), args.repeats),
        "triton prefill (walk)": _time_or_error(lambda: _walking(
            lambda: launch.attention(q, k, v, None, None, [], params, spec, scale, True)), args.repeats),
        "sdpa decode": _time_or_error(lambda: _sdpa(one[0], *kv, causal=False), args.repeats),
        "triton decode": _time_or_error(
            lambda: launch.attention(*one, None, None, state, params, spec, scale, True), args.repeats),
    }
    qg, kg, vg, pg = _inputs(spec, args, t, requires_grad=True)
    grad = torch.randn_like(qg[..., :args.head_dim])
    row["sdpa fwd+bwd"] = _time_or_error(lambda: _sdpa(qg, kg, vg).backward(grad), args.repeats)
    op = torch.ops.lincompile.attention
    row["lincompile op fwd+bwd"] = _time_or_error(
        lambda: op(qg, kg, vg, None, None, [], pg, spec.to_json(), scale, True)[0].backward(grad), args.repeats)
    row["lincompile op fwd+bwd (walk)"] = _time_or_error(lambda: _walking(
        lambda: op(qg, kg, vg, None, None, [], pg, spec.to_json(), scale, True)[0].backward(grad)), args.repeats)
    fla = _fla()
    if fla is not None and args.kv_heads == args.heads:
        chunk, recurrent = fla
        tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        row["fla chunk prefill"] = _time_or_error(lambda: chunk(q=tq, k=tk, v=tv, scale=scale, normalize=False),
                                                  args.repeats)
        oq, ok, ov = (x.transpose(1, 2).contiguous() for x in one)
        s0 = torch.zeros(args.batch, args.heads, args.head_dim, args.head_dim, device=args.device)  # fp32, as ours
        row["fla recurrent decode"] = _time_or_error(
            lambda: recurrent(q=oq, k=ok, v=ov, scale=scale, initial_state=s0, output_final_state=True,
                              normalize=False), args.repeats)
    return row


def decode_bandwidth(spec: MethodSpec, args: argparse.Namespace) -> dict[str, float]:
    """One decode step of `--decode-batch` rows (after a 100-token prefill) through the generated recurrent kernel:
    the bytes it moves (every floating state part read and its new copy written, q, k, v, the output and the
    parameters) over its median time, beside a device-to-device copy's bandwidth in the same run (the practical
    peak; bytes read + written). The state is fp32 and does not grow with the context."""
    from lincompile.kernels.triton import launch

    scale = 1.0 / math.sqrt(args.head_dim)
    q, k, v, params = _inputs(spec, args, 100, batch=args.decode_batch)
    _, state = launch.attention(q, k, v, None, None, [], params, spec, scale, True)
    one = [x[:, :, -1:].contiguous() for x in (q, k, v)]
    out, new = launch.attention(*one, None, None, state, params, spec, scale, True)

    def size(tensors: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())

    moved = size(state) + size(new) + size([*one, out, *params])
    step_ms = _median_ms(lambda: launch.attention(*one, None, None, state, params, spec, scale, True), args.repeats)
    source = torch.empty(max(moved // 2, 1 << 28), dtype=torch.uint8, device=args.device)
    target = torch.empty_like(source)
    copy_ms = _median_ms(lambda: target.copy_(source), args.repeats)
    decode_gbs, copy_gbs = moved / step_ms / 1e6, 2 * source.numel() / copy_ms / 1e6
    return {"batch": args.decode_batch, "MB moved": moved / 1e6, "step ms": step_ms, "decode GB/s": decode_gbs,
            "copy GB/s": copy_gbs, "decode / copy": decode_gbs / copy_gbs}


def _ratios(row: dict[str, float | str]) -> dict[str, float]:
    """SDPA time / our time for each matching pair (> 1: ours is faster)."""
    pairs = {"prefill": ("sdpa prefill", ("triton prefill", "triton prefill (walk)", "chunked prefill",
                                          "chain prefill", "parallel prefill")),
             "decode": ("sdpa decode", ("triton decode",)),
             "decode/token": ("sdpa decode/token", ("recurrent decode/token", "decode.step decode/token")),
             "verify/call": ("sdpa verify/call", ("parallel verify/call", "chain verify/call")),
             "fwd+bwd": ("sdpa fwd+bwd", ("lincompile op fwd+bwd", "lincompile op fwd+bwd (walk)", "chunked fwd+bwd",
                                          "parallel fwd+bwd"))}
    out = {}
    for name, (base, ours) in pairs.items():
        for key in ours:
            if isinstance(row.get(base), float) and isinstance(row.get(key), float):
                label = " ".join(w for w in key.split() if w not in ("prefill", "decode", "decode/token", "fwd+bwd",
                                                                     "verify/call", "op"))
                out[f"{name} sdpa/{label}"] = row[base] / row[key]
    return out


def _print_table(rows: list[dict]) -> None:
    columns = sorted({key for r in rows for key in r["ms"]})
    ratio_columns = sorted({key for r in rows for key in r["ratios"]})
    print("ms (median)".ljust(8), *(c[:22].rjust(23) for c in columns))
    for r in rows:
        print(f"T={r['T']:<6}", *(f"{r['ms'].get(c, '-'):>23.3f}" if isinstance(r['ms'].get(c), float)
                                  else f"{str(r['ms'].get(c, '-'))[:22]:>23}" for c in columns))
    print("\nratios (sdpa time / ours; > 1 = ours faster)")
    print("".ljust(8), *(c[:30].rjust(31) for c in ratio_columns))
    for r in rows:
        print(f"T={r['T']:<6}", *(f"{r['ratios'][c]:>31.2f}" if c in r["ratios"] else f"{'-':>31}"
                                  for c in ratio_columns))


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for column in sorted({key for r in rows for key in r["ms"]}):
        points = [(r["T"], r["ms"][column]) for r in rows if isinstance(r["ms"].get(column), float)]
        if points:
            ax.plot(*zip(*points), marker="o", label=column)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--lengths", type=positive_int_list, default=None,
                        help="comma-separated T (default: 1K..32K on CUDA, 256..2K on CPU)")
    parser.add_argument("--quick", action="store_true", help="CPU: T in 128, 256, 512 and at most 5 repeats")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=None, help="query heads (default: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="KV heads (default: --heads)")
    parser.add_argument("--head-dim", type=positive_int, default=None, help="default: 128 on CUDA, 64 on CPU")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--decode-batch", type=positive_int, default=64,
                        help="CUDA: rows of the decode-bandwidth measurement (default 64)")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU: torch threads (default 1, steadier on a "
                        "shared machine)")
    parser.add_argument("--parallel-max", type=positive_int, default=2048, help="CPU: largest T for the quadratic form")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA GPU (drop --device for the CPU timings)")
    default_lengths = "1024,2048,4096,8192,16384,32768" if cuda else ("128,256,512" if args.quick else
                                                                       "256,512,1024,2048")
    lengths = args.lengths or [int(x) for x in default_lengths.split(",")]
    args.heads = args.heads or (32 if cuda else 4)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.quick:
        args.repeats = min(args.repeats, 5)
    spec = get_method(args.method)
    if not cuda:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                               f"{torch.get_num_threads()} threads)"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{args.device}" + ("_quick" if args.quick else "")  # a smoke run never replaces a real one
    json_path = args.out / f"{stem}.json"
    result = {"device": device_name, "command": command, "torch": torch.__version__, "method": args.method,
              "shape": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                        "head_dim": args.head_dim, "dtype": args.dtype}, "rows": [], "complete": False}
    with torch.no_grad() if not cuda else torch.enable_grad():
        result["decode_bandwidth"] = decode_bandwidth(spec, args) if cuda else None  # first: it is short
        for t in lengths:  # the JSON is rewritten after each T: a run stopped midway keeps what it measured
            ms = (cuda_row if cuda else cpu_row)(spec, args, t)
            result["rows"].append({"T": t, "ms": ms, "ratios": _ratios(ms)})
            atomic_write(json_path, json.dumps(result, indent=1) + "\n")
            print(f"T={t} done", file=sys.stderr, flush=True)
    result["complete"] = True
    atomic_write(json_path, json.dumps(result, indent=1) + "\n")
    rows = sorted(result["rows"], key=lambda row: row["T"])  # measured in the order of --lengths
    print(f"{args.method}: B={args.batch} H={args.heads} Hkv={args.kv_heads} d={args.head_dim} {args.dtype} on "
          f"{device_name}")
    _print_table(rows)
    if result["decode_bandwidth"]:
        b = result["decode_bandwidth"]
        print(f"\ndecode step, batch {b['batch']}: {b['MB moved']:.1f} MB in {b['step ms']:.3f} ms = "
              f"{b['decode GB/s']:.0f} GB/s; device copy {b['copy GB/s']:.0f} GB/s; ratio {b['decode / copy']:.2f}")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png = args.out / f"{stem}.png"
        _plot(rows, png, f"{args.method} vs SDPA, {device_name}")
        print(f"wrote {png}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
