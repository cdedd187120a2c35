"""Decode-speed measurement shared by `lincompile demo` and `bench/decode.py`: one greedy decode step per call.

A *session* is a closure that runs one greedy decode step (feed the previous step's argmax token, keep the
cache or state) and returns that step's logits [batch, vocab]. Sessions exist for the Hugging Face original
with its KV cache (`HFCache.session`) and for every lincompile runner (`linear_session`: a `LinearizedModel`,
its `compiled_model` twin, an `OrtModel` from `open_ort`). `time_steps` times several sessions interleaved,
so that load on a shared machine hits all of them alike.

Invariants: sessions that start from the same logits and state take the same greedy tokens (up to fp
reordering between engines); a session never rewinds, so each call extends its context by one token; the
decode cost of softmax attention depends on the cache's length, not on what the cache holds, which is what
`HFCache.fill_random` relies on to time long contexts without a long prefill.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lincompile.runtime.state import RecurrentState, hf_cache_keyword

Step = Callable[[], torch.Tensor]  # one decode step; returns the step's logits [batch, vocab]


@dataclass
class Timings:
    """Per-session step latencies (s) and the greedy tokens each session produced (warm-up steps included)."""

    steps: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)

    def agreement(self, a: str, b: str) -> dict[str, int | None]:
        """How sessions `a` and `b`'s greedy tokens compare: `same` steps gave the same token (after the first
        difference the contexts differ, so later matches are partly chance), `same_until` the first step that
        differs (None: none did), of `steps`."""
        pairs = list(zip(self.tokens[a], self.tokens[b]))
        return {"same": sum(x == y for x, y in pairs), "steps": len(pairs),
                "same_until": next((i for i, (x, y) in enumerate(pairs) if x != y), None)}

    def tokens_per_s(self) -> dict[str, float]:
        """1 / median step latency, per session (the median resists the odd step delayed by other load)."""
        return {name: 1.0 / statistics.median(values) for name, values in self.steps.items()}


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_bytes(config: Any, context: int, bytes_per_value: int = 4) -> int:
    """Bytes of a full-attention KV cache for one sequence of `context` tokens (keys and values, every layer):
    what `HFCache.nbytes` reports for a decoder without sliding-window layers, in fp32 by default."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * _head_dim(config) * context * bytes_per_value


class HFCache:
    """A Hugging Face causal LM and its growing `DynamicCache` (batch 1).

    `extend` runs a prompt through the model (a real prefill), `fill_random` replaces the cache by random keys
    and values of a given length (no forward pass), `session` decodes greedily from there, `rewind` crops the
    cache back. `length` is always the cache's length in tokens; `next_token` [1, 1] is the token the next
    decode step feeds (the argmax after the last prefilled token).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.cache_utils import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self._cache_keyword = hf_cache_keyword(model)
        self.length = 0
        self.next_token: torch.Tensor | None = None

    def _call(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, use_cache=True, logits_to_keep=1, **{self._cache_keyword: self.cache})
        self.length += ids.shape[1]
        return out.logits[:, -1]

    def extend(self, ids: torch.Tensor, chunk: int) -> None:
        """Prefill `ids` [1, T] after what the cache holds, `chunk` tokens per call."""
        for start in range(0, ids.shape[1], chunk):
            self.next_token = self._call(ids[:, start:start + chunk]).argmax(-1, keepdim=True)

    def fill_random(self, length: int, next_token: torch.Tensor, seed: int = 0) -> None:
        """Make the cache `length` tokens of standard-normal keys and values in every layer, without running the
        model, and decode `next_token` [1, 1] next. Decode steps from it cost what they cost after a real prefill
        of `length` tokens (attention reads every cached key and value whatever their values), so long contexts
        can be timed without the minutes a long HF prefill takes on a CPU; their tokens are meaningless."""
        from transformers.cache_utils import DynamicCache

        config = self.model.config
        param = next(self.model.parameters())
        generator = torch.Generator().manual_seed(seed)
        shape = (1, config.num_key_value_heads, length, _head_dim(config))
        self.cache = DynamicCache(config=config)
        for layer in range(config.num_hidden_layers):
            keys, values = (torch.randn(shape, generator=generator).to(param) for _ in range(2))
            self.cache.update(keys, values, layer)
        self.length = length
        self.next_token = next_token

    def session(self) -> Step:
        """Greedy decode steps from `next_token`; each step grows the cache by one token."""
        if self.next_token is None:
            raise ValueError("nothing to decode from: call extend or fill_random first")
        token = self.next_token

        def step() -> torch.Tensor:
            nonlocal token
            logits = self._call(token)
            token = logits.argmax(-1, keepdim=True)
            return logits
        return step

    def rewind(self, length: int) -> None:
        """Crop the cache back to its first `length` tokens."""
        if length != self.length:  # crop(-n) removes n tokens; crop(0) emptied the cache in transformers 5.0
            self.cache.crop(length - self.length)
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


def linear_session(model: Callable, logits: torch.Tensor, state: RecurrentState, position: torch.Tensor) -> Step:
    """Greedy steps of a lincompile runner (`LinearizedModel`, `compiled_model`, `OrtModel`) from a prefill:
    `logits` [1, V] of the last prompt token, the `state` after the prompt and the `position` [1, 1] of the
    token that follows (`lincompile.runtime.prefill.prefill` returns all three). The state passed in is not
    modified, so several sessions can start from the same prefill."""
    token = logits.argmax(-1, keepdim=True)
    ones = torch.ones_like(token)

    def step() -> torch.Tensor:
        nonlocal token, state, position
        out = model(token, attention_mask=ones, past_state=state, position_ids=position)
        state, position = out.past_state, position + 1
        last = out.logits[:, -1]
        token = last.argmax(-1, keepdim=True)
        return last
    return step


def compiled_model(linear: Any) -> Any:
    """A `LinearizedModel` whose stateful decode graph (`linear.graph`: tokens + state in, logits + state out)
    runs under `torch.compile(backend="inductor", dynamic=False)` with Inductor's freezing (weights folded as
    constants, linears prepacked; only valid while the weights do not change). Compilation happens at the
    first call and again for each new input shape; `lincompile::attention` stays an extern call of its
    registered kernel. Shares `linear`'s weights and interface."""
    compiled = torch.compile(linear.graph, backend="inductor", dynamic=False, options={"freezing": True})
    return linear.with_graph(compiled)


def open_ort(onnx_dir: Path, threads: int, cpu_only: bool = True) -> Any:
    """An `OrtModel` for the export in `onnx_dir` with `threads` intra-op threads (the same count torch uses
    makes the engines comparable; onnxruntime's own default ignores CPU pinning and can oversubscribe a core),
    one inter-op thread, errors-only logging; on the CPU provider, or with `cpu_only=False` on the default
    providers (CUDA first when available)."""
    import onnxruntime as ort

    from lincompile.backends.ort import OrtModel

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return OrtModel.from_dir(onnx_dir, providers=["CPUExecutionProvider"] if cpu_only else None,
                             session_options=options)


def time_steps(sessions: dict[str, Step], warmup: int, rounds: int, steps: int) -> Timings:
    """Run `warmup` untimed steps per session, then `rounds` rounds of `steps` timed steps per session, the
    sessions interleaved within each round, the order rotated by one each round (`alternate`): taking turns in a
    fixed order, the same onnxruntime export measured about 2% slower in the first place than in the second on
    this CPU (a one-off check), so each session takes each place equally often (over a multiple of the sessions'
    count of rounds), and none runs twice in a row across rounds. Each session takes warmup + rounds * steps
    steps in all."""
    timings = Timings({name: [] for name in sessions}, {name: [] for name in sessions})
    for name, step in sessions.items():
        for _ in range(warmup):
            timings.tokens[name].append(int(step().argmax()))
    for turn in range(rounds):
        for name, step in alternate(sessions, turn):
            for _ in range(steps):
                start = time.perf_counter()
                logits = step()
                timings.steps[name].append(time.perf_counter() - start)
                timings.tokens[name].append(int(logits.argmax()))
    return timings


def first_difference(same_until: int | None) -> str:
    """`Timings.agreement`'s `same_until` in words."""
    return "every step the same" if same_until is None else f"the first difference at step {same_until}, from 0"


def alternate(items: dict[Any, Any], turn: int) -> list[tuple[Any, Any]]:
    """`items`' pairs rotated left by `turn` (`time_steps`); for two, in order on even turns and reversed on odd
    ones. (Reversing three or more would keep the middle one in the middle and run the last twice in a row.)"""
    pairs = list(items.items())
    shift = turn % max(len(pairs), 1)
    return pairs[shift:] + pairs[:shift]


def best_time(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(the fastest wall time in s of `repeats` calls of `call`, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine_tag() -> str:
    """`<arch>-<cores>cpu-<vector ISA torch uses>` (e.g. x86_64-2cpu-avx2): the suffix benchmark result files carry.
    Files from before session 31 lack the ISA (session 30's machine had AVX512)."""
    import os
    import platform

    return f"{platform.machine()}-{os.cpu_count()}cpu-{torch.backends.cpu.get_cpu_capability().lower()}"


def write_bench_result(result: dict[str, Any], out_dir: Path, stem: str, threads: int, argv: list[str]) -> Path:
    """Add where and how a benchmark ran (its command, machine, thread count, torch and onnxruntime versions)
    to `result` and write it atomically to `out_dir`/`stem`_<machine>.json; returns the path."""
    import json
    import platform
    import shlex

    import onnxruntime

    from lincompile.atomic import atomic_write

    machine = machine_tag()
    result.update({"command": "python " + " ".join(shlex.quote(a) for a in argv), "machine": machine,
                   "processor": platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "threads": threads, "torch": torch.__version__,
                   "onnxruntime": onnxruntime.__version__})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}_{machine}.json"
    atomic_write(path, json.dumps(result, indent=1) + "\n")
    return path


def report_bench(result: dict[str, Any], out_dir: Path, stem: str, threads: int, argv: list[str] | None,
                 table: Callable[[dict[str, Any]], None]) -> int:
    """Write `result` (`write_bench_result`; `argv` None: this process's own) and print its `table`, where it went
    and the command that reproduces it; returns the exit status 0."""
    path = write_bench_result(result, out_dir, stem, threads, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print()
    table(result)
    print(f"\nwrote {path}")
    print(f"reproduce: {result['command']}")
    return 0
