"""`lincompile demo`: the main job on the embedded default, end to end, on a CPU.

Load SmolLM2-135M; inspect it (capture with torch.export, detect its attention sites); linearize it with
`augmented` and the shipped trained weights (`lincompile.pretrained.linearized`; with `--weights auto`, the
untrained linearization when none are shipped: the table says which); compile its stateful decode graph with
torch.compile; export it to ONNX and run it in onnxruntime; generate a continuation of a short held-out prompt
with speculative decoding (and plain greedy decoding, to show both give the same text). One table then
reports held-out perplexity of the original and the linearized model, decode tokens/s after `--context` and
`--long-context` tokens for every engine, accepted tokens per speculative call, and decode memory at the long
context. A plot (decode tok/s and memory against context) and demo.json (every number, and the seconds each
stage took) go to `--out`. Every number is measured in this run; nothing is hard-coded. Most of the time goes
to the ONNX export and to Inductor compiling the decode graph.

Decode speed is the median step of interleaved rounds (`lincompile.runtime.timing`). At `--context` both
models prefill the same held-out tokens for real. At `--long-context`, lincompile prefills that many held-out
tokens for real (chunked, its state constant-size) and every lincompile engine decodes from that state; a
real Hugging Face prefill that long takes minutes on a CPU, so the original decodes from a KV cache of
`--long-context` random keys and values per layer (`HFCache.fill_random`): a decode step's cost depends only
on the cache's length, so its speed is what a real prefill would give (its tokens are meaningless).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shlex
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lincompile.atomic import atomic_write, check_replaceable
from lincompile.cli.args import draft_tokens, positive_int

MODEL = "smollm2-135m"
EVAL_BLOCK = 256  # tokens per perplexity block, as `lincompile eval` scores by default
PROMPT_TOKENS = 48  # the held-out prompt the linearized model continues
DEMO_FILE = "demo.json"
PREFILL_CHUNK = 512
ENGINES = {"hf": "original (HF)", "eager": "PyTorch eager", "compile": "torch.compile", "ort": "onnxruntime"}


@dataclass(frozen=True)
class DemoOptions:
    """What `lincompile demo` runs; the command-line options one to one."""

    out: Path = Path("out/demo")
    method: str = "augmented"
    weights: str = "auto"
    context: int = 512
    long_context: int = 8192
    steps: int = 16
    eval_blocks: int = 4
    draft: str = "prompt-lookup"
    num_draft_tokens: int | None = None  # None: the draft's own default
    new_tokens: int = 32

    def command(self) -> str:
        """The `lincompile demo` command line that runs these options."""
        q = shlex.quote
        return (f"lincompile demo --out {q(str(self.out))} --method {q(self.method)} --weights {q(self.weights)} "
                f"--context {self.context} --long-context {self.long_context} --steps {self.steps} "
                f"--eval-blocks {self.eval_blocks} --draft {q(self.draft)} "
                + (f"--num-draft-tokens {self.num_draft_tokens} " if self.num_draft_tokens else "")
                + f"--new-tokens {self.new_tokens}")


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


class _Stopwatch:
    """Seconds per named stage, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._start
        self._start = now


def _weights_label(weights: str, recipe: dict[str, Any] | None) -> str:
    if recipe is None:
        return "untrained"
    return "trained: shipped weights" if weights in ("auto", "default") else f"trained: {weights}"


def _inspect(model: torch.nn.Module, captured: Any) -> dict[str, Any]:
    """What the detector finds in the captured graph (as `lincompile inspect` lists it), summarised."""
    from lincompile.api import run_pipeline
    from lincompile.config import LinearizeConfig

    _, report = run_pipeline(model, LinearizeConfig(method="softmax"), names=("normalize", "detect_attention"),
                             captured=captured)
    sites = report.sites
    return {"sites": len(sites), "unmatched": len(report.unmatched),
            "forms": dict(Counter(s.form for s in sites)), "masks": dict(Counter(s.mask_kind for s in sites)),
            "heads": sorted({s.heads for s in sites}), "kv_heads": sorted({s.kv_heads for s in sites}),
            "head_dim": sorted({s.head_dim for s in sites})}


def _sites_summary(inspected: dict[str, Any]) -> str:
    return f"{inspected['sites']} ({', '.join(inspected['forms'])}; {', '.join(inspected['masks'])})"


def _decode(hf: Any, engines: dict[str, Any], start: Any, steps: int) -> tuple[dict[str, float], bool]:
    """tok/s of the HF cache's session and of each lincompile engine from the prefill `start` (one warm-up step,
    then two interleaved rounds), and whether the lincompile engines took the same greedy tokens."""
    from lincompile.runtime.timing import linear_session, time_steps

    sessions = {"hf": hf.session(), **{name: linear_session(engine, *start) for name, engine in engines.items()}}
    timings = time_steps(sessions, warmup=1, rounds=2, steps=math.ceil(steps / 2))
    linear = [tokens for name, tokens in timings.tokens.items() if name != "hf"]
    return timings.tokens_per_s(), all(tokens == linear[0] for tokens in linear)


def _mark_incomplete(opts: DemoOptions) -> None:
    """Write DEMO_FILE before any work, so a run that fails or is stopped leaves a directory the next run takes:
    an earlier run's results flagged `"complete": false` (its outputs may be replaced in part), else this run's
    command alone."""
    path = opts.out / DEMO_FILE
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        earlier = None
    record = earlier if isinstance(earlier, dict) else {"command": opts.command()}
    atomic_write(path, json.dumps({**record, "complete": False}, indent=2) + "\n")


def _draft(opts: DemoOptions) -> Any:
    """The draft `--draft` names, loaded before any long work (a bad one fails now, not after the export)."""
    from lincompile.cli.serve_cmd import draft_kind, parse_draft
    from lincompile.runtime.speculative import check_num_draft_tokens

    if draft_kind(opts.draft)[0] in ("none", "medusa"):
        raise ValueError(f"--draft {opts.draft}: the demo times speculative decoding against plain decoding of a "
                         "fresh linearization; use prompt-lookup, ngram:DIR or model:DIR")
    if opts.num_draft_tokens is not None:
        check_num_draft_tokens(opts.num_draft_tokens)
    return parse_draft(opts.draft, None, "torch")


def _generate(linear: Any, tokenizer: Any, prompt: torch.Tensor, opts: DemoOptions, draft: Any) -> dict[str, Any]:
    """Continue `prompt` greedily, speculatively and plainly: acceptance, speeds, the text, and whether the two
    outputs agree (they must: greedy speculative decoding emits the plain greedy tokens)."""
    from lincompile.runtime.generate import generate
    from lincompile.runtime.speculative import speculative_generate

    start = time.perf_counter()
    plain = generate(linear, prompt, opts.new_tokens)
    plain_rate = opts.new_tokens / (time.perf_counter() - start)
    out, stats = speculative_generate(linear, prompt, opts.new_tokens, draft, opts.num_draft_tokens)
    return {"prompt": tokenizer.decode(prompt[0]), "continuation": tokenizer.decode(out[0, prompt.shape[1]:]),
            "num_draft_tokens": stats.num_draft_tokens, "accepted_drafts_per_call": stats.mean_accepted,
            "tokens_per_call": stats.tokens_per_call,
            "speculative_tokens_per_s": stats.new_tokens / stats.seconds, "plain_tokens_per_s": plain_rate,
            "speculative_identical_to_greedy": bool(torch.equal(out, plain))}


def _plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    contexts = [result["context"], result["long_context"]]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label in ENGINES.items():
        if name not in result["tokens_per_s"][str(contexts[0])]:
            continue
        speed.plot(contexts, [result["tokens_per_s"][str(c)][name] for c in contexts], marker="o",
                   label=f"{label}, KV cache (random at {contexts[1]})" if name == "hf" else f"lincompile, {label}")
    speed.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (median step)",
              title=f"SmolLM2-135M decode, {result['threads']} thread(s)")
    speed.set_ylim(bottom=0)
    kv, state = [result["kv_cache_bytes"][str(c)] / 2**20 for c in contexts], [result["state_bytes"] / 2**20] * 2
    memory.plot(contexts, kv, marker="o", label="original: KV cache")
    memory.plot(contexts, state, marker="s", label=f"lincompile {result['method']}: state")
    for x, y in [*zip(contexts, kv), *zip(contexts, state)]:
        memory.annotate(f"{y:.1f} MiB", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    memory.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB per sequence (fp32)",
               title="decode memory")
    for ax in (speed, memory):
        ax.xaxis.set_minor_locator(NullLocator())
        ax.margins(x=0.12, y=0.15)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.legend()
    fig.tight_layout()
    picture = io.BytesIO()
    fig.savefig(picture, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, picture.getvalue())


@torch.no_grad()
def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run every step; return the numbers demo.json holds (also written to `opts.out`)."""
    from torch._dynamo.exc import BackendCompilerFailed

    from lincompile.api import capture_model
    from lincompile.assets import load_model
    from lincompile.backends.onnx import export_onnx
    from lincompile.pretrained import linearized
    from lincompile.runtime.prefill import prefill
    from lincompile.runtime.timing import HFCache, compiled_model, linear_session, open_ort
    from lincompile.runtime.drafts import make_draft, vocab_size
    from lincompile.runtime.speculative import check_draft_vocab
    from lincompile.train.data import ShortCorpusError, heldout_blocks
    from lincompile.train.eval import perplexity

    if not 0 < opts.context < opts.long_context:
        raise ValueError(f"need 0 < --context < --long-context, got {opts.context} and {opts.long_context}")
    draft = _draft(opts)
    check_replaceable(opts.out, DEMO_FILE, replaced=False)  # a directory of the user's own files is not written into
    opts.out.mkdir(parents=True, exist_ok=True)
    _mark_incomplete(opts)
    threads = torch.get_num_threads()
    clock = _Stopwatch()
    _log(f"loading {MODEL} (first run: download + dequantize, ~1 min)")
    model, tokenizer = load_model(MODEL)
    check_draft_vocab(make_draft(draft, model), vocab_size(model))
    try:  # the held-out text every later step reads, checked before the long work
        ids = heldout_blocks(tokenizer, opts.long_context, 1)
        blocks = heldout_blocks(tokenizer, EVAL_BLOCK, opts.eval_blocks)
    except ShortCorpusError as exc:
        raise ShortCorpusError(f"{exc} (the demo reads one block of --long-context {opts.long_context} tokens and "
                               f"--eval-blocks {opts.eval_blocks} of {EVAL_BLOCK}: lower them)") from None
    clock.lap("load")
    _log("inspecting: capture with torch.export, detect the attention sites")
    captured = capture_model(model)
    inspected = _inspect(model, captured)
    clock.lap("inspect")
    _log(f"attention sites: {_sites_summary(inspected)}; linearizing them with {opts.method}, weights {opts.weights}")
    linear = linearized(model, opts.method, opts.weights, MODEL, captured=captured, strict=True)
    weights_label = _weights_label(opts.weights, linear.recipe)
    clock.lap("linearize")
    ppl_original = perplexity(model, blocks, desc="original").ppl
    ppl_linear = perplexity(linear, blocks, desc=opts.method).ppl
    clock.lap("perplexity")
    _log("exporting to ONNX")
    onnx_dir = export_onnx(linear, opts.out / "onnx", tokenizer=tokenizer)
    clock.lap("onnx_export")
    engines = {"eager": linear, "compile": compiled_model(linear), "ort": open_ort(onnx_dir, threads)}

    _log(f"prefilling {opts.context} held-out tokens (both models)")
    hf = HFCache(model)
    hf.extend(ids[:, :opts.context], PREFILL_CHUNK)
    short = prefill(linear, ids[:, :opts.context], chunk_size=PREFILL_CHUNK)
    clock.lap("prefill_short")
    _log("torch.compile of the decode graph (Inductor, freezing): the first call compiles")
    compile_error = None
    try:
        linear_session(engines["compile"], *short)()
    except BackendCompilerFailed as error:  # Inductor on a CPU needs a C++ compiler, which a fresh machine may lack
        compile_error = f"{type(error.inner_exception).__name__}: {error.inner_exception}".splitlines()[0]
        _log(f"torch.compile failed, going on without it: {compile_error}")
        del engines["compile"]
    clock.lap("compile")
    _log(f"timing {opts.steps} decode steps per engine at {opts.context}")
    kv_short = hf.nbytes()
    speed_short, agree_short = _decode(hf, engines, short, opts.steps)
    del hf
    clock.lap("decode_short")

    _log(f"lincompile: prefilling held-out tokens {opts.context}..{opts.long_context} (chunks of {PREFILL_CHUNK})")
    long = prefill(linear, ids[:, opts.context:], past_state=short.state, chunk_size=PREFILL_CHUNK)
    clock.lap("prefill_long")
    _log(f"timing {opts.steps} decode steps per engine at {opts.long_context} (HF: random KV cache)")
    hf = HFCache(model)
    hf.fill_random(opts.long_context, long.logits.argmax(-1, keepdim=True))
    kv_long = hf.nbytes()
    speed_long, agree_long = _decode(hf, engines, long, opts.steps)
    del hf
    clock.lap("decode_long")

    k = f"k={opts.num_draft_tokens}" if opts.num_draft_tokens else "its default k"
    _log(f"generating {opts.new_tokens} tokens: speculative ({opts.draft}, {k}) and plain")
    generation = _generate(linear, tokenizer, heldout_blocks(tokenizer, PROMPT_TOKENS, 1), opts, draft)
    clock.lap("generate")
    result: dict[str, Any] = {
        "complete": True, "model": MODEL, "method": opts.method, "weights": opts.weights,
        "weights_label": weights_label,
        "trained": linear.recipe is not None, "inspect": inspected, "linearized_sites": len(linear.sites),
        "heldout_tokens": int(blocks[:, 1:].numel()), "ppl_original": ppl_original, "ppl_linearized": ppl_linear,
        "threads": threads, "context": opts.context, "long_context": opts.long_context,
        "timed_steps_per_engine": 2 * math.ceil(opts.steps / 2),
        "tokens_per_s": {str(opts.context): speed_short, str(opts.long_context): speed_long},
        "lincompile_engines_agree": {str(opts.context): agree_short, str(opts.long_context): agree_long},
        "compile_error": compile_error, "hf_long_context_cache": "random keys/values", "draft": opts.draft,
        "state_bytes": long.state.nbytes(),
        "kv_cache_bytes": {str(opts.context): kv_short, str(opts.long_context): kv_long},
        **generation, "seconds": clock.seconds, "options": {k: str(v) for k, v in asdict(opts).items()},
        "command": opts.command(), "plot": str(opts.out / "decode.png"),
    }
    result["seconds"]["total"] = sum(clock.seconds.values())
    _plot(opts.out / "decode.png", result)
    atomic_write(opts.out / DEMO_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _table(r: dict[str, Any]) -> list[str]:
    """The one table: a row per measurement, the original and the linearized model side by side."""
    short, long = str(r["context"]), str(r["long_context"])
    mib = 2**20
    rows = [
        ("", "original (HF + KV cache)", f"lincompile {r['method']} ({r['weights_label']})"),
        ("attention sites", _sites_summary(r["inspect"]), f"{r['linearized_sites']} linearized"),
        (f"held-out perplexity ({r['heldout_tokens']} tokens)", f"{r['ppl_original']:.2f}",
         f"{r['ppl_linearized']:.2f}"),
    ]
    for context in (short, long):
        speed = r["tokens_per_s"][context]
        hf = f"{speed['hf']:.2f}" + (" *" if context == long else "")
        rows += [(f"decode tok/s @ {context}: PyTorch eager", hf, f"{speed['eager']:.2f}"),
                 (f"decode tok/s @ {context}: torch.compile", "-",
                  f"{speed['compile']:.2f}" if "compile" in speed else "failed (see below)"),
                 (f"decode tok/s @ {context}: onnxruntime", "-", f"{speed['ort']:.2f}")]
    rows += [
        (f"decode memory per sequence @ {long} (fp32)", f"{r['kv_cache_bytes'][long] / mib:.1f} MiB KV cache",
         f"{r['state_bytes'] / mib:.2f} MiB state"),
        (f"speculative ({r['draft']}, k={r['num_draft_tokens']}): tokens per call", "-",
         f"{r['tokens_per_call']:.2f} ({r['accepted_drafts_per_call']:.2f} drafts accepted)"),
        ("generation tok/s: speculative vs plain greedy", "-",
         f"{r['speculative_tokens_per_s']:.2f} vs {r['plain_tokens_per_s']:.2f} "
         f"({'same tokens' if r['speculative_identical_to_greedy'] else 'DIFFERENT tokens'})"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(Path(args.out), args.method, args.weights, args.context, args.long_context, args.steps,
                       args.eval_blocks, args.draft, args.num_draft_tokens, args.new_tokens)


def cmd_demo(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    r = run_demo(opts)
    seconds = r["seconds"]
    agree = all(r["lincompile_engines_agree"].values())
    print(f"\nheld-out prompt:\n{r['prompt']}\n\n{r['method']} ({r['weights_label']}) continues "
          f"(greedy, {opts.new_tokens} tokens):\n{r['continuation']}\n")
    print("\n".join(_table(r)))
    print(f"\n* the original decodes from a KV cache of {opts.long_context} random keys and values per layer (a step "
          "costs the same whatever the cache holds);\n  lincompile from its state after a real prefill of "
          f"{opts.long_context} held-out tokens ({seconds['prefill_short'] + seconds['prefill_long']:.0f} s, "
          f"chunks of {PREFILL_CHUNK}).")
    compiled = (f"torch.compile failed: {r['compile_error']}" if r["compile_error"] else
                f"torch.compile took {seconds['compile']:.0f} s to compile")
    print(f"{compiled}, the ONNX export {seconds['onnx_export']:.0f} s; "
          f"{r['threads']} thread(s); {r['timed_steps_per_engine']} timed steps per engine and context; the "
          f"lincompile engines took {'the same' if agree else 'DIFFERENT'} greedy tokens.")
    if not r["trained"]:
        print("The linearization is untrained (alpha = 0, conv taps = 0): `lincompile train` recovers quality.")
    print(f"demo: {seconds['total']:.0f} s; wrote {opts.out / 'demo.json'}, {r['plot']} and {opts.out / 'onnx'}")
    print(f"reproduce: {opts.command()}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoOptions()
    parser.add_argument("--out", default=str(defaults.out),
                        help=f"where the ONNX model, demo.json and the plot go (default {defaults.out})")
    parser.add_argument("--method", default=defaults.method, help="linear-attention method (default: augmented)")
    parser.add_argument("--weights", default=defaults.weights,
                        help="'auto' (the shipped trained linearization when there is one, else untrained; default), "
                             "'default' (shipped, required), 'none' (untrained), a directory written by "
                             "lincompile.pretrained.ship, or a training checkpoint OUT/checkpoints/step-N")
    parser.add_argument("--context", type=positive_int, default=defaults.context,
                        help="prompt length of the first decode timing (default 512)")
    parser.add_argument("--long-context", type=positive_int, default=defaults.long_context,
                        help="prompt length of the second decode timing (default 8192)")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps,
                        help="decode steps timed per engine and context, in two equal rounds (an odd count rounds up; "
                             "default 16)")
    parser.add_argument("--eval-blocks", type=positive_int, default=defaults.eval_blocks,
                        help=f"held-out blocks of {EVAL_BLOCK} tokens for perplexity (default 4)")
    parser.add_argument("--draft", default=defaults.draft,
                        help="speculative draft: prompt-lookup (default), ngram:DIR (lincompile build-ngram) or "
                             "model:DIR (lincompile make-draft)")
    parser.add_argument("--num-draft-tokens", type=draft_tokens, default=defaults.num_draft_tokens,
                        help="drafted tokens per target call (default: the draft's, 8 for prompt-lookup and ngram, "
                             "4 for model)")
    parser.add_argument("--new-tokens", type=positive_int, default=defaults.new_tokens,
                        help="tokens generated after the held-out prompt (default 32)")
