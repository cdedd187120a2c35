"""`lincompile demo`: the main job on the embedded default, end to end, in a few CPU minutes.

Load SmolLM2-135M, inspect it, linearize it with the paper's `augmented` method, export it to ONNX
and run it in onnxruntime, then print one table: held-out perplexity, decode tokens/s, and the
memory of the recurrent state against the KV cache. A plot of memory against context is saved.
Every number is measured in this run; nothing is hard-coded.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lincompile.api import capture_model, optimize
from lincompile.assets import load_model
from lincompile.backends.onnx import export_onnx
from lincompile.backends.ort import OrtModel
from lincompile.train.data import heldout_blocks
from lincompile.train.eval import perplexity


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _decode_tokens_per_second(model: object, ids: torch.Tensor, steps: int) -> float:
    """Prefill `ids`, then time `steps` greedy single-token steps through the state."""
    out = model(ids)
    state, token = out.past_state, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_state=state)
        state, token = out.past_state, out.logits[:, -1].argmax(-1, keepdim=True)
    return steps / (time.perf_counter() - start)


def _hf_decode_tokens_per_second(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    out = model(ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return steps / (time.perf_counter() - start)


def _kv_cache_bytes(model: torch.nn.Module, context: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * 4


def _plot(path: Path, contexts: list[int], kv: list[int], state: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(contexts, [b / 2**20 for b in kv], marker="o", label="softmax KV cache (fp32)")
    ax.plot(contexts, [state / 2**20] * len(contexts), marker="s", label="augmented recurrent state")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MiB per sequence")
    ax.set_title("SmolLM2-135M: decode memory against context")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _speculative(model: object, prompt: torch.Tensor, draft: str, k: int, new_tokens: int) -> dict[str, object]:
    """Speculative and plain greedy decoding of the same prompt: acceptance, speed, and whether they agree."""
    from lincompile.runtime.generate import generate
    from lincompile.runtime.speculative import speculative_generate

    start = time.perf_counter()
    plain = generate(model, prompt, new_tokens)
    plain_rate = new_tokens / (time.perf_counter() - start)
    out, stats = speculative_generate(model, prompt, new_tokens, draft, k)
    return {"speculative_draft": draft, "speculative_k": k, "accepted_per_call": stats.mean_accepted,
            "speculative_tokens_per_s": stats.new_tokens / stats.seconds, "plain_tokens_per_s": plain_rate,
            "speculative_identical_to_greedy": bool(torch.equal(out, plain))}


@torch.no_grad()
def run_demo(out_dir: Path, method: str = "augmented", context: int = 512, steps: int = 16,
             eval_blocks: int = 4, draft: str = "prompt-lookup", num_draft_tokens: int = 4) -> dict[str, object]:
    """Run every step and return the table's numbers."""
    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    _log("loading smollm2-135m (first run: download + dequantize, ~1 min)")
    model, tokenizer = load_model("smollm2-135m")
    _log("capturing with torch.export and detecting attention")
    captured = capture_model(model)
    linear = optimize(model, method, captured=captured, strict=True)
    _log(f"{len(linear.sites)} attention sites -> {method}")
    blocks = heldout_blocks(tokenizer, 128, eval_blocks)
    ppl_original = perplexity(model, blocks, desc="original").ppl
    ppl_linear = perplexity(linear, blocks, desc=method).ppl
    ids = heldout_blocks(tokenizer, context, 1)
    _log(f"decode speed after a {context}-token prompt ({steps} steps each)")
    tps_hf = _hf_decode_tokens_per_second(model, ids, steps)
    tps_torch = _decode_tokens_per_second(linear, ids, steps)
    _log("exporting to ONNX and decoding in onnxruntime")
    onnx_dir = export_onnx(linear, out_dir / "onnx", tokenizer=tokenizer)
    tps_ort = _decode_tokens_per_second(OrtModel.from_dir(onnx_dir), ids, steps)
    _log(f"speculative decoding ({draft}, k={num_draft_tokens}) against plain greedy decoding")
    spec = _speculative(linear, heldout_blocks(tokenizer, 64, 1), draft, num_draft_tokens, new_tokens=24)
    state_bytes = linear.initial_state(1).nbytes()
    contexts = [512, 2048, 8192, 32768]
    kv = [_kv_cache_bytes(model, c) for c in contexts]
    _plot(out_dir / "memory.png", contexts, kv, state_bytes)
    result = {
        "method": method, "sites": len(linear.sites), "heldout_tokens": int(blocks[:, 1:].numel()),
        "ppl_original": ppl_original, "ppl_linearized_untrained": ppl_linear,
        "decode_context": context, "tokens_per_s_hf_kv_cache": tps_hf, "tokens_per_s_lincompile_torch": tps_torch,
        "tokens_per_s_lincompile_onnxruntime": tps_ort, "state_bytes": state_bytes,
        "kv_cache_bytes_8k": _kv_cache_bytes(model, 8192), "plot": str(out_dir / "memory.png"), **spec,
    }
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    r = run_demo(Path(args.out), args.method, args.context, args.steps, args.eval_blocks, args.draft,
                 args.num_draft_tokens)
    rows = [
        ("attention sites linearized", f"{r['sites']} -> {r['method']}"),
        (f"held-out perplexity, original ({r['heldout_tokens']} tokens)", f"{r['ppl_original']:.1f}"),
        (f"held-out perplexity, {r['method']} (untrained)", f"{r['ppl_linearized_untrained']:.1f}"),
        (f"decode tok/s @ {r['decode_context']}: HF + KV cache", f"{r['tokens_per_s_hf_kv_cache']:.1f}"),
        (f"decode tok/s @ {r['decode_context']}: lincompile (torch)", f"{r['tokens_per_s_lincompile_torch']:.1f}"),
        (f"decode tok/s @ {r['decode_context']}: lincompile (onnxruntime)",
         f"{r['tokens_per_s_lincompile_onnxruntime']:.1f}"),
        (f"speculative ({r['speculative_draft']}, k={r['speculative_k']}): accepted drafts per call",
         f"{r['accepted_per_call']:.2f}"),
        ("speculative tok/s vs plain greedy (same output?)",
         f"{r['speculative_tokens_per_s']:.1f} vs {r['plain_tokens_per_s']:.1f} "
         f"({'identical' if r['speculative_identical_to_greedy'] else 'DIFFERENT'})"),
        ("recurrent state per sequence (any context)", f"{r['state_bytes'] / 2**20:.2f} MiB"),
        ("softmax KV cache per sequence @ 8K (fp32)", f"{r['kv_cache_bytes_8k'] / 2**20:.2f} MiB"),
        ("memory plot", r["plot"]),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("\nThe linearization is untrained (alpha = 0, conv taps = 0): `lincompile train` recovers quality.")
    print(f"reproduce: lincompile demo --out {args.out} --context {args.context} --steps {args.steps}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="where the ONNX model, demo.json and the plot go")
    parser.add_argument("--method", default="augmented", help="linear-attention method (default: augmented)")
    parser.add_argument("--context", type=int, default=512, help="prompt length before timing decode")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per engine")
    parser.add_argument("--eval-blocks", type=int, default=4, help="held-out blocks of 128 tokens for perplexity")
    parser.add_argument("--draft", default="prompt-lookup", help="speculative draft (default: prompt-lookup)")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="drafted tokens per target call")
