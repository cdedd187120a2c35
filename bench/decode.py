"""Decode tokens/s of SmolLM2-135M at long contexts: the HF original against lincompile, side by side in one run.

Engines (fp32 but int8's linear layers, batch 1, greedy, the same number of threads):
  hf        the Hugging Face model with its KV cache (the default DynamicCache, which grows by concatenation,
            so each step also copies the cache; SDPA attention);
  eager     the linearized model users get (`lincompile.pretrained.linearized(model, method, weights="auto")`:
            the shipped trained weights when there are some; speed does not depend on them), its fx graph run
            by PyTorch eagerly;
  compile   the same stateful decode graph (`LinearizedModel.graph`: tokens + state in, logits + state out)
            under `torch.compile(backend="inductor", dynamic=False)` with Inductor's freezing (weights folded as
            constants, prepacked linears; `lincompile.runtime.timing.compiled_model`);
            `lincompile::attention` stays an extern call of its registered kernel
            (the plain-PyTorch reference on CPU), the code around it is compiled. Binding the op to its reference
            first (as the ONNX export does) was tried: Inductor did not finish compiling that 30-layer graph in
            17 min here. (`torch.compile(model, backend="lincompile")` compiles a full-sequence graph without
            state, so it has no decode step to time.)
  ort       `LinearizedModel.export_onnx` run by `OrtModel` (onnxruntime CPU, IO binding: the state stays in
            ORT buffers between steps);
  int8      `linear.quantize("int8")`: eager with 8-bit linear layers (weights per output row, activations per
            token, integer products). It decodes from the state the float model prefilled (a step's cost does
            not depend on the state's values), so its tokens are timed, not compared: they may part from eager's
            at near-ties (`bench/torch_quantize.py` measures its perplexity and prefill).

For each context (ascending) the prompt (held-out Shakespeare) is extended in chunks of `--prefill-chunk` tokens: HF
through its cache, lincompile once with `lincompile.runtime.prefill` (eager, float); every lincompile engine decodes
from that same state. Then each engine takes `--warmup` steps, and `--rounds` rounds of `--steps` timed steps
follow, the engines interleaved within each round so that load on a shared machine hits all of them alike; the
reported latency is the median step. Before the next context the HF cache is cropped back and the prefill continues
from the saved state, so each context is prefilled once. The lincompile engines decode the same tokens from the same
state; the JSON records whether their greedy tokens agree (int8's are timed only) and the first step's largest logit
difference from eager.

SmolLM2 was trained to 8192 positions; at 16K RoPE runs past that (the timings do not depend on it).
The table's "prefill s" columns time extending the prompt from the previous context to this one (HF through
SDPA with its cache, lincompile with the eager reference), so they add up to the full prefill. HF computes the
last token's logits only (`logits_to_keep=1`); lincompile's graph computes every token's (its LM head is part of
the captured graph), so the lincompile column includes work the HF column leaves out.

Writes bench/results/decode_<machine>.json and bench/results/decode.png; prints the table and the command.
    python bench/decode.py --quick             # one short context, a few minutes (export and compile dominate)
    python bench/decode.py --threads 1         # contexts 512, 2K, 8K, 16K
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

import torch

from lincompile.atomic import atomic_write
from lincompile.cli.args import nonnegative_int, positive_int
from lincompile.runtime.timing import (HFCache, Step, compiled_model, linear_session, machine_tag, open_ort,
                                      time_steps)

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("hf", "eager", "compile", "ort", "int8")
CONTEXTS = (512, 2048, 8192, 16384)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ort_model(linear: object, onnx_dir: Path | None, threads: int) -> object:
    """Export (or reuse `onnx_dir` when it holds an export) and open an onnxruntime CPU session."""
    from lincompile.backends.onnx import META_FILE

    if onnx_dir is None:  # a fresh export (~0.6 GB), removed when the bench exits
        scratch = tempfile.mkdtemp(prefix="lincompile-bench-")
        atexit.register(shutil.rmtree, scratch, True)
        onnx_dir = Path(scratch) / "onnx"
    if not (onnx_dir / META_FILE).is_file():
        start = time.perf_counter()
        linear.export_onnx(str(onnx_dir))
        _log(f"ONNX export took {time.perf_counter() - start:.0f} s ({onnx_dir})")
    return open_ort(onnx_dir, threads)


def first_step_difference(sessions: dict[str, Step]) -> dict[str, float]:
    """max |logits - eager logits| of the first step of fresh sessions of each lincompile engine."""
    reference = sessions["eager"]()
    return {name: float((step() - reference).abs().max()) for name, step in sessions.items() if name != "eager"}


def run(args: argparse.Namespace) -> dict:
    from lincompile.assets import load_model
    from lincompile.pretrained import linearized
    from lincompile.runtime.prefill import prefill
    from lincompile.train.data import heldout_blocks

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    contexts = sorted(args.contexts)
    extra = args.warmup + args.rounds * args.steps
    ids = heldout_blocks(tokenizer, block_size=contexts[-1] + extra, max_blocks=1)
    start = time.perf_counter()
    linear = linearized(model, args.method, weights="auto")
    weights = "untrained" if linear.recipe is None else "trained (shipped weights)"
    _log(f"linearized({args.method}, {weights}) took {time.perf_counter() - start:.0f} s")
    runners: dict[str, object] = {}
    if "eager" in args.engines or "compile" in args.engines:
        runners["eager"] = linear
    if "compile" in args.engines:
        runners["compile"] = compiled_model(linear)
    if "ort" in args.engines:
        runners["ort"] = ort_model(linear, args.onnx_dir, args.threads)
    if "int8" in args.engines:
        runners["int8"] = linear.quantize("int8")
    hf = HFCache(model) if "hf" in args.engines else None
    rows, state, done = [], None, 0
    with torch.no_grad():
        for context in contexts:
            row: dict[str, object] = {"context": context}
            if hf is not None:
                start = time.perf_counter()
                hf.extend(ids[:, hf.length:context], args.prefill_chunk)
                row["prefill_s_hf"] = time.perf_counter() - start
                row["kv_cache_bytes"] = hf.nbytes()
            start = time.perf_counter()
            filled = prefill(linear, ids[:, done:context], past_state=state, chunk_size=args.prefill_chunk)
            row["prefill_s_lincompile"] = time.perf_counter() - start
            row["state_bytes"] = filled.state.nbytes()
            state, done = filled.state, context
            _log(f"context {context}: prefilled; decoding")

            def make(name: str) -> Step:
                return linear_session(runners[name], filled.logits, filled.state, filled.next_position_ids)
            linear_names = [n for n in ENGINES if n in args.engines and n != "hf"]
            if "compile" in linear_names and context == contexts[0]:
                start = time.perf_counter()
                make("compile")()
                row["compile_s"] = time.perf_counter() - start  # the first call compiles
            sessions = {name: make(name) for name in linear_names}
            if hf is not None:
                sessions = {"hf": hf.session(), **sessions}
            timings = time_steps(sessions, args.warmup, args.rounds, args.steps)
            if hf is not None:
                hf.rewind(context)
            for name, rate in timings.tokens_per_s().items():
                row[f"ms_{name}"] = 1e3 / rate
                row[f"tok_s_{name}"] = rate
            if "eager" in linear_names:
                others = [n for n in linear_names if n not in ("eager", "int8")]
                row["greedy_tokens_agree"] = {n: timings.tokens[n] == timings.tokens["eager"] for n in others}
                row["first_step_max_abs_logit_diff_vs_eager"] = first_step_difference(
                    {n: make(n) for n in linear_names})
            rows.append(row)
            _print_row(row, args.engines)
    return {"rows": rows, "state_bytes": rows[-1]["state_bytes"], "weights": weights}


def _ratio(row: dict, a: str, b: str) -> float | None:
    return row[f"tok_s_{a}"] / row[f"tok_s_{b}"] if f"tok_s_{a}" in row and f"tok_s_{b}" in row else None


def _print_row(row: dict, engines: list[str]) -> None:
    _log("  ".join(f"{n} {row[f'ms_{n}']:.1f} ms" for n in engines if f"ms_{n}" in row))


def print_table(rows: list[dict], engines: list[str]) -> None:
    header = ["context"] + [f"{n} tok/s" for n in engines] + [f"{n}/hf" for n in engines if n != "hf"]
    header += ["ort/eager", "KV cache MiB", "state MiB", "prefill s hf", "prefill s lincompile"]
    lines = [header]
    for row in rows:
        cells = [str(row["context"])] + [f"{row[f'tok_s_{n}']:.2f}" if f"tok_s_{n}" in row else "-" for n in engines]
        for name in engines:
            if name != "hf":
                ratio = _ratio(row, name, "hf")
                cells.append("-" if ratio is None else f"{ratio:.2f}x")
        ratio = _ratio(row, "ort", "eager")
        cells.append("-" if ratio is None else f"{ratio:.2f}x")
        cells.append(f"{row['kv_cache_bytes'] / 2**20:.1f}" if "kv_cache_bytes" in row else "-")
        cells.append(f"{row['state_bytes'] / 2**20:.2f}")
        cells.append(f"{row['prefill_s_hf']:.1f}" if "prefill_s_hf" in row else "-")
        cells.append(f"{row['prefill_s_lincompile']:.1f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def plot(rows: list[dict], engines: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [row["context"] for row in rows]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in engines:
        if all(f"tok_s_{name}" in row for row in rows):
            speed.plot(contexts, [row[f"tok_s_{name}"] for row in rows], marker="o", label=name)
    speed.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (median step)", title=title)
    speed.set_xticks(contexts, [str(c) for c in contexts])
    speed.legend()
    if all("kv_cache_bytes" in row for row in rows):
        memory.plot(contexts, [row["kv_cache_bytes"] / 2**20 for row in rows], marker="o", label="HF KV cache")
    memory.plot(contexts, [row["state_bytes"] / 2**20 for row in rows], marker="o", label="lincompile state")
    memory.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB", title="decode memory per sequence")
    memory.set_xticks(contexts, [str(c) for c in contexts])
    memory.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--method", default="augmented")
    parser.add_argument("--steps", type=positive_int, default=4, help="timed steps per engine per round")
    parser.add_argument("--rounds", type=positive_int, default=4,
                        help="interleaved rounds (median over rounds x steps)")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps per engine and context")
    parser.add_argument("--prefill-chunk", type=positive_int, default=256, help="prefill chunk (HF and lincompile)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="torch and onnxruntime intra-op threads")
    parser.add_argument("--onnx-dir", type=Path, default=None,
                        help="reuse this export if it exists, else export into it (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="context 256, 2 rounds of 3 steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.rounds, args.steps, args.warmup = [256], 2, 3, 2
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    result = run(args)
    result.update({"command": command, "machine": machine_tag(), "processor": platform.processor(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "threads": args.threads, "torch": torch.__version__, "method": args.method,
                   "prefill_chunk": args.prefill_chunk,
                   "timed_steps_per_engine": args.rounds * args.steps, "quick": args.quick})
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    json_path = args.out / f"decode_{machine_tag()}{suffix}.json"
    atomic_write(json_path, json.dumps(result, indent=1) + "\n")
    png_path = args.out / f"decode{suffix}.png"
    plot(result["rows"], args.engines, png_path, f"SmolLM2-135M {args.method}, {args.threads} thread(s)")
    print()
    print_table(result["rows"], args.engines)
    print(f"\nwrote {json_path} and {png_path}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
