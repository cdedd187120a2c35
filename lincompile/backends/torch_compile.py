"""`torch.compile(model, backend="lincompile", options={"method": "augmented", "layers": None})`; the options are
`LinearizeConfig`'s (its defaults where left out) plus `compiler` ("inductor" or "eager").

What the backend guarantees, for every graph dynamo hands it:

- the graph is lowered to the same ATen IR `lincompile.capture` gets from `torch.export` (pre-dispatch,
  traced under dynamo's own fake mode and shape environment, so dynamic dims and guards stay dynamo's),
  and the unchanged lincompile passes (normalize, detect_attention, linearize, cleanup) run over it;
- every attention the detector finds becomes one `torch.ops.lincompile.attention` node started from the
  initial (empty) recurrent state, new state unused: a full-sequence forward. Before Inductor this is
  the graph `lincompile.optimize(model, method, layers=...)` builds, called on the whole sequence
  (bit-identical logits with `compiler="eager"`); sites outside `layers` stay exact softmax; per-site
  parameters are created as `optimize` creates them (same `seed`), on the site's device;
- the rewritten graph goes to Inductor (`compile_fx`): the lincompile ops stay extern calls to their
  registered kernels and the code around them is fused as usual (so only Inductor's fp32 reordering
  separates the result from `optimize`'s). `compiler="eager"` runs the rewritten graph unfused;
- no guard is added by the rewrite: dynamic dims stay dynamic (one recompile, as with plain Inductor);
- a graph without attention is compiled unchanged; an attention-like softmax no pattern matched is
  left as it is, with a warning (or `UnrecognizedAttentionError` with `strict=True`).

The mask kind of a site is read from the example inputs of the first compile (as `optimize` reads it
from its capture inputs); the key padding mask stays a runtime input of the op, so later calls with
other masks are exact. Grad-enabled calls differentiate through the op's autograd. Each compile
appends a `BackendReport` to `reports()` (the last `MAX_REPORTS`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.backends.registry import register_backend
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

try:
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
except ImportError:  # torch 2.11, the GPU image's (bench/gpu_session.sh runs the checkout on it): a node's hint
    def guarding_hint_or_throw(value: Any) -> Any:
        return value.node.require_hint()

from lincompile.capture.check import attention_op
from lincompile.capture.export import CapturedGraph
from lincompile.config import LinearizeConfig
from lincompile.diagnostics import warn
from lincompile.passes.base import Pass, PassContext, PassManager, PassResult
from lincompile.passes.detect_attention import AttentionSite
from lincompile.passes.linearize import Linearize, warn_rewrite_notes
from lincompile.passes.pipeline import DEFAULT_PIPELINE, build_pipeline

BACKEND_NAME = "lincompile"
#: Options: the `LinearizeConfig` fields (method, layers, fuel, strict, seed) and the downstream compiler.
OPTIONS = tuple(f.name for f in dataclasses.fields(LinearizeConfig) if f.name != "version") + ("compiler",)
COMPILERS = ("inductor", "eager")
MAX_REPORTS = 32


@dataclass
class BackendReport:
    """What one backend call did: the sites found, the ops in the graph handed on, the pass log."""

    method: str
    compiler: str
    sites: list[AttentionSite]
    attention_ops: int
    passes: list[PassResult] = field(default_factory=list)
    code: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "compiler": self.compiler, "sites": [s.to_dict() for s in self.sites],
                "attention_ops": self.attention_ops, "passes": [p.to_dict() for p in self.passes]}


_REPORTS: deque[BackendReport] = deque(maxlen=MAX_REPORTS)


def reports() -> list[BackendReport]:
    """Reports of the most recent compiles, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()


def parse_options(options: dict[str, Any] | None) -> tuple[LinearizeConfig, str]:
    """`torch.compile(..., options=...)` as a `LinearizeConfig` plus the downstream compiler name."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown lincompile backend options {unknown}; known: {list(OPTIONS)}")
    compiler = options.pop("compiler", "inductor")
    if compiler not in COMPILERS:
        raise ValueError(f"compiler={compiler!r}; expected one of {COMPILERS}")
    return LinearizeConfig(**options), compiler  # without a method, optimize's default (augmented)


def _passes(config: LinearizeConfig) -> list[Pass]:
    passes = build_pipeline(config, DEFAULT_PIPELINE)
    for p in passes:
        if isinstance(p, Linearize):
            p.stateful = False  # a full-sequence forward: every site starts from the initial state
    return passes


def _place_parameters(gm: fx.GraphModule) -> None:
    """Put the parameters linearize adds (created on the CPU) on the device of their site's q."""
    op = attention_op()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is op:
            device = node.args[0].meta["val"].device
            for param in node.args[6]:
                gm.get_submodule(param.target.rsplit(".", 1)[0]).to(device)


_ROOT = re.compile(r"^L\['[^']*'\](\[\d+\])?\.?")


def _fake_inputs(gm: fx.GraphModule) -> tuple[list[Any], FakeTensorMode]:
    """Dynamo's fake example values of the graph inputs, and the fake mode they belong to."""
    values = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    mode = next(iter(modes.values())) if len(modes) == 1 else detect_fake_mode() if not modes else None
    if mode is None:
        raise RuntimeError(f"lincompile backend: the graph inputs belong to {len(modes)} fake modes, expected one")
    return values, mode


def lower_to_aten(gm: fx.GraphModule) -> tuple[fx.GraphModule, FakeTensorMode]:
    """Dynamo's torch-level graph as the pre-dispatch ATen graph `torch.export` produces.

    Traced with dynamo's fake inputs (symbolic where dynamo made a dim dynamic), keeping node metadata
    (module paths for reports); placeholders keep dynamo's names (`l_kwargs_attention_mask_`, ...).
    """
    values, mode = _fake_inputs(gm)
    with mode, enable_python_dispatcher(), fx_traceback.preserve_node_meta():
        aten_gm = make_fx(fx.Interpreter(gm).run, pre_dispatch=True, record_module_stack=True)(*values)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip([n for n in aten_gm.graph.nodes if n.op == "placeholder"], names):
        node.target = name
        node._rename(name)
    for node in aten_gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (_ROOT.sub("", str(p)), c) for k, (p, c) in stack.items()}
    aten_gm.recompile()
    return aten_gm, mode


def _concrete(value: Any) -> Any:
    """A size dynamo passes as a SymInt, as the int it has for these inputs (no guard added)."""
    return guarding_hint_or_throw(value) if isinstance(value, (torch.SymInt, torch.SymBool)) else value


def rewrite(gm: fx.GraphModule, example_inputs: Sequence[Any],
            config: LinearizeConfig) -> tuple[fx.GraphModule, list[AttentionSite], list[PassResult]]:
    """Lower dynamo's graph to ATen and run the lincompile passes; the result takes dynamo's inputs."""
    from lincompile.api import UnrecognizedAttentionError

    aten_gm, mode = lower_to_aten(gm)
    names = [n.target for n in aten_gm.graph.nodes if n.op == "placeholder"]
    outputs = next(n for n in aten_gm.graph.nodes if n.op == "output").args[0]
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    captured = CapturedGraph(aten_gm, list(names), [f"output_{i}" for i in range(count)],
                             {n: _concrete(v) for n, v in zip(names, example_inputs)})
    ctx = PassContext(captured)
    # The passes read sizes as ints (detection works on the concrete example); on dynamo's shape
    # environment that would add guards and specialise dynamic dims, so they are suppressed.
    with mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext():
        results = PassManager(_passes(config)).run(ctx)
    _place_parameters(ctx.gm)
    if captured.input_names != names:
        raise RuntimeError(f"lincompile backend: the passes changed the graph inputs to {captured.input_names}")
    if ctx.unmatched:
        message = "attention-like softmax not recognized:\n  " + "\n  ".join(str(u) for u in ctx.unmatched)
        if config.strict:
            raise UnrecognizedAttentionError(message)
        warn(message + "\nthese nodes were left unchanged")
    warn_rewrite_notes(results)
    return ctx.gm, ctx.sites, results


def count_attention_ops(gm: fx.GraphModule) -> int:
    op = attention_op()
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is op)


def lincompile_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                       mode: str | None = None) -> Callable[..., Any]:
    """The dynamo backend: rewrite attention to `lincompile.attention`, then compile with Inductor."""
    config, compiler = parse_options(options)
    if mode not in (None, "default") and compiler == "eager":
        raise ValueError(f"mode={mode!r} applies to Inductor only")
    rewritten, sites, results = rewrite(gm, example_inputs, config)
    _REPORTS.append(BackendReport(config.spec.name, compiler, sites, count_attention_ops(rewritten), results,
                                  rewritten.code))
    if compiler == "eager":
        return rewritten
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = None if mode in (None, "default") else list_mode_options(mode)
    return compile_fx(rewritten, example_inputs, config_patches=patches)


def _register() -> None:
    """Register under "lincompile" unless dynamo is about to do so from the entry point.

    Dynamo loads an entry-point backend by importing this module and then registering the loaded
    function itself; registering here as well would make it raise "duplicate name".
    """
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get(BACKEND_NAME), EntryPoint):
        return
    register_backend(lincompile_backend, name=BACKEND_NAME)


_register()
