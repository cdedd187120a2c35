"""Public entry points: `inspect`, `optimize`, `save`/`load` of linearized models."""
from __future__ import annotations

import inspect as pyinspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import fx

from lincompile.atomic import atomic_directory
from lincompile.backends.eager import LinearizedModel
from lincompile.capture.export import CapturedGraph, capture
from lincompile.config import LinearizeConfig, site_indices
from lincompile.diagnostics import warn
from lincompile.jsonconfig import read_json_object
from lincompile.methods.spec import MethodSpec, get_method
from lincompile.passes.base import PassContext, PassManager, PassResult, Verifier
from lincompile.passes.detect_attention import WINDOW_PROBE, AttentionSite, UnmatchedSoftmax
from lincompile.passes.linearize import warn_rewrite_notes
from lincompile.passes.pipeline import DEFAULT_PIPELINE, build_pipeline
from lincompile.pretrained import with_global_cap
from lincompile.runtime.state import numbered_from_mask, position_padding, position_tables

SAVE_FORMAT = "lincompile-linearized"
#: The file every saved linearized model directory holds (its format, LinearizeConfig, source class, dtype).
SAVE_FILE = "lincompile.json"


class UnrecognizedAttentionError(RuntimeError):
    """strict=True and a softmax that looks like attention matched no pattern."""


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, object]:
    """Capture inputs for an HF model: random ids, a left-padded last row, explicit position ids.

    Sizes >= 2 keep batch and sequence dynamic; the padded row lets detection read the mask kind.
    """
    params = pyinspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, : max(1, seq // 4)] = 0
    inputs: dict[str, object] = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in params and not getattr(config, "is_encoder_decoder", False):
        inputs["position_ids"] = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    if getattr(config, "is_encoder_decoder", False):
        dec = max(2, seq // 2 + 1)
        inputs["decoder_input_ids"] = torch.randint(min(3, vocab - 1), vocab, (batch, dec), generator=gen)
        inputs["decoder_attention_mask"] = torch.ones(batch, dec, dtype=torch.long)
    if "use_cache" in params:
        inputs["use_cache"] = False
    device = next(model.parameters(), torch.empty(0)).device  # the graph is captured where the model lives
    return {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in inputs.items()}


@dataclass
class CompileReport:
    """What one run of the pipeline found and did."""

    sites: list[AttentionSite]
    unmatched: list[UnmatchedSoftmax]
    passes: list[PassResult]

    def to_dict(self) -> dict[str, object]:
        return {"sites_found": len(self.sites), "unmatched": [str(u) for u in self.unmatched],
                "passes": [p.to_dict() for p in self.passes]}


def capture_model(model: torch.nn.Module, inputs: dict[str, object] | None = None) -> CapturedGraph:
    """Capture once, then pass `captured=` to `optimize` for several methods (each works on a fork)."""
    return capture(model, inputs if inputs is not None else example_inputs(model))


def _capture(model: torch.nn.Module, inputs: dict[str, object] | None,
             captured: CapturedGraph | None = None) -> CapturedGraph:
    if captured is None:
        return capture_model(model, inputs)
    if inputs is not None:
        raise ValueError("captured= was traced with the inputs given to capture_model, so inputs= would be ignored: "
                         "pass inputs= to capture_model, or leave captured= out")
    own = {p.data_ptr() for p in model.parameters()}
    if not {p.data_ptr() for p in captured.gm.parameters()} <= own:
        raise ValueError("captured= holds another model's weights: capture this model with "
                         "lincompile.api.capture_model(model)")
    where = {t.device for t in captured.example_inputs.values() if isinstance(t, torch.Tensor)}
    device = next(model.parameters()).device
    if where and where != {device}:
        raise ValueError(f"captured= was captured on {sorted(map(str, where))}, the model is now on {device}: "
                         "capture it again where it runs")
    dtypes = tuple(p.dtype for p in model.parameters())
    if captured.dtypes is not None and dtypes != captured.dtypes:
        then, now = (sorted({str(d).removeprefix("torch.") for d in ds}) for ds in (captured.dtypes, dtypes))
        raise ValueError(f"captured= was traced with {'/'.join(then)} weights, the model's are now {'/'.join(now)}: "
                         "its graph keeps the casts it was traced with; capture the model again in this dtype")
    return captured.fork()


def inspect(model: torch.nn.Module, inputs: dict[str, object] | None = None) -> list[AttentionSite]:
    """Every attention site in `model`, as the detector sees it."""
    ctx = PassContext(_capture(model, inputs))
    PassManager(build_pipeline(LinearizeConfig(method="softmax"), ("normalize", "detect_attention"))).run(ctx)
    return ctx.sites


def run_pipeline(model: torch.nn.Module, config: LinearizeConfig, *, inputs: dict[str, object] | None = None,
                 names: tuple[str, ...] = DEFAULT_PIPELINE, disabled: frozenset[str] = frozenset(),
                 stop_after: str | None = None, dump_dir: Path | None = None,
                 verifier_factory: Callable[[CapturedGraph], Verifier | None] | None = None,
                 on_result: Callable[[PassResult], None] | None = None,
                 captured: CapturedGraph | None = None) -> tuple[PassContext, CompileReport]:
    """Capture `model` and run the pass pipeline over it; the debugging CLI drives this directly.

    `verifier_factory` sees the captured graph before any pass and may return None (no verification).
    """
    ctx = PassContext(_capture(model, inputs, captured))
    verifier = verifier_factory(ctx.captured) if verifier_factory is not None else None
    manager = PassManager(build_pipeline(config, names), disabled, stop_after, dump_dir, verifier, on_result)
    results = manager.run(ctx)
    return ctx, CompileReport(ctx.sites, ctx.unmatched, results)


def _check_agrees(config: LinearizeConfig, method: str | MethodSpec | None, layers: object, strict: bool) -> None:
    """`config=` decides method, layers and strictness: also passing one of them that differs is an error."""
    clashes = []
    if method is not None and get_method(method) != config.spec:
        clashes.append(f"method={get_method(method).name!r} (config: {config.spec.name!r})")
    if layers is not None and (config.layers is None or sorted(site_indices(layers)) != sorted(config.layers)):
        clashes.append(f"layers={site_indices(layers)} (config: {config.layers})")
    if strict and not config.strict:
        clashes.append("strict=True (config: strict=False)")
    if clashes:
        raise ValueError(f"optimize got config= and {', '.join(clashes)}; pass the settings in the config alone")


def optimize(model: torch.nn.Module, method: str | MethodSpec | None = None, *, layers: list[int] | None = None,
             strict: bool = False, config: LinearizeConfig | None = None,
             inputs: dict[str, object] | None = None, captured: CapturedGraph | None = None) -> LinearizedModel:
    """Linearize every attention in `model` (or the sites in `layers`; the rest stay exact softmax).

    The model's weights are shared, not copied. `captured` (from `capture_model`) skips the
    torch.export capture, which dominates the time on real models. With strict=True an attention-like softmax that no
    pattern matched raises `UnrecognizedAttentionError`; otherwise it is reported as a warning.
    """
    if config is None:
        config = LinearizeConfig(**({"method": method} if method is not None else {}),
                                 layers=None if layers is None else site_indices(layers), strict=strict)
    else:
        _check_agrees(config, method, layers, strict)
    ctx, report = run_pipeline(model, config, inputs=inputs, captured=captured)
    if report.unmatched:
        message = "attention-like softmax not recognized:\n  " + "\n  ".join(str(u) for u in report.unmatched)
        if config.strict:
            raise UnrecognizedAttentionError(message)
        warn(message + "\nthese nodes were left unchanged")
    _warn_unprobed_window(model, ctx)
    warn_rewrite_notes(report.passes)
    limit, reason = position_tables(model) or (None, None)
    linearized = LinearizedModel(ctx.gm, ctx.captured.input_names, ctx.captured.output_names, ctx.sites,
                                 ctx.rewritten, config, getattr(model, "config", None), limit,
                                 position_padding(model), reason, numbered_from_mask(model))
    linearized.report = report
    linearized.source_class = type(model).__name__  # what `load` rebuilds (a BertModel is no causal LM)
    return linearized


def _warn_unprobed_window(model: torch.nn.Module, ctx: PassContext) -> None:
    """Warn when the config declares a sliding window that detection did not find (longer than its probe, or no
    site got one) and a causal site stays exact softmax (which would attend past that window)."""
    declared = getattr(getattr(model, "config", None), "sliding_window", None)
    exact = [r for r in ctx.rewritten if r.spec.kind == "softmax"
             and ctx.sites[r.index].causal and ctx.sites[r.index].window is None]
    found = any(site.window for site in ctx.sites)
    if isinstance(declared, int) and exact and (declared >= WINDOW_PROBE or not found):
        why = (f"longer than lincompile's mask probe ({WINDOW_PROBE - 1} keys)" if declared >= WINDOW_PROBE
               else "but detection found no window in the masks")
        warn(f"the model's config declares sliding_window={declared}, {why}; {len(exact)} causal sites "
             "kept exact softmax attend to every past token, so past that many tokens they may differ "
             "from the original")


def save(model: LinearizedModel, directory: str | Path, tokenizer: object | None = None) -> Path:
    """Write config, HF config, weights (safetensors) and tokenizer atomically to `directory`."""
    from safetensors.torch import save_file

    if model.hf_config is None:
        raise ValueError("this model has no Hugging Face config to rebuild its architecture from")
    if not isinstance(model.graph, fx.GraphModule):
        raise TypeError(f"this model runs a {type(model.graph).__name__} (torch.compile's wrapper, say), whose weight "
                        "names load cannot map back: save the model it was made from")
    model.require_float("save", "save the float model, and quantize it again after loading (the same numbers)")
    from lincompile.train.lora import LORA_MODULE

    if any(name.startswith(LORA_MODULE + ".") for name, _ in model.graph.named_parameters()):
        raise ValueError("this model holds unmerged LoRA adapters (training leaves them in the graph), which load "
                         "cannot rebuild: fold them in first with lincompile.train.lora.merge_lora(model.graph), "
                         "as `lincompile train` does before it saves")
    target = Path(directory)
    with atomic_directory(target, SAVE_FILE) as tmp:
        model.hf_config.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.graph.state_dict().items()}
        save_file(_untie(state), tmp / "model.safetensors")
        kept = {name: str(p.dtype).removeprefix("torch.") for name, p in model.graph.named_parameters()
                if p.dtype != model.captured_dtype}  # modules a model keeps in another dtype (T5's `wo` in fp32)
        meta = {"format": SAVE_FORMAT, "linearize": model.config.to_dict(), "source_class": model.source_class,
                "dtype": str(model.captured_dtype).removeprefix("torch."), "source_model": model.source_model,
                "kept_dtypes": kept}
        (tmp / SAVE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store each shared tensor once per name."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.setdefault(ptr, name)
    return out


def _rebuild(hf_config: object, name: str | None, meta_file: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """The saved model's class from its config, built in `dtype` as Hugging Face builds it (buffers it keeps in
    float32, a rotary table's, stay so; None: torch's default dtype): the recorded transformers class, else (an
    older save, or a class transformers lacks) the Auto class for causal LMs, then the base one."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    built = {"dtype": dtype or torch.get_default_dtype()}
    cls = getattr(transformers, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls._from_config(hf_config, **built)
    if name:
        warn(f"{meta_file}: saved from {name}, which transformers does not provide; rebuilding it with "
             "its Auto class")
    try:
        return AutoModelForCausalLM.from_config(hf_config, **built)
    except ValueError:
        return AutoModel.from_config(hf_config, **built)


def load(directory: str | Path, *, dtype: torch.dtype | None = None, global_cap: int | None = None) -> LinearizedModel:
    """Load what `save` wrote: rebuild the architecture offline, re-run the pipeline, load the weights.

    `dtype`: capture and run in this dtype (None: the one it was saved in); the saved weights are cast to it
    (bfloat16 -> float32 is exact). `global_cap`: the grouped global branch's `MethodSpec.global_cap` (a scale on a
    sum, no tensor of its own; None: the saved one)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(directory)
    meta_file = path / SAVE_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not an existing directory: pass one written by "
                                "LinearizedModel.save_pretrained(dir)")
    if not meta_file.is_file():
        from lincompile.backends.onnx import META_FILE

        what = (f"an ONNX export: run it with lincompile.OrtModel.from_dir({str(path)!r})"
                if (path / META_FILE).is_file() else
                "a Hugging Face model: load it with lincompile.load_model, then lincompile.optimize"
                if (path / "config.json").is_file() else "")
        raise FileNotFoundError(f"{path} is not a saved lincompile model (no {SAVE_FILE}); "
                                + (what or "save one with LinearizedModel.save_pretrained(dir)"))
    meta = read_json_object(meta_file, "save the model again with save_pretrained", ("linearize",))
    if meta.get("format") != SAVE_FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r}")
    lost = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if lost:
        raise FileNotFoundError(f"{path} is a saved lincompile model without {' and '.join(lost)}: it was "
                                "damaged or copied in part; save it again with save_pretrained")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    config = with_global_cap(LinearizeConfig.from_dict(meta["linearize"]), global_cap)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    saved = getattr(torch, meta["dtype"]) if "dtype" in meta else None  # older saves: torch's default dtype
    source = _rebuild(hf_config, meta.get("source_class"), meta_file, dtype or saved)
    own = dict(source.named_parameters())
    for name, kept in meta.get("kept_dtypes", {}).items():  # as Hugging Face keeps them, whatever `dtype`
        if name in own:
            own[name].data = own[name].data.to(getattr(torch, kept))
    model = optimize(source.eval(), config=config)
    missing, unexpected = model.graph.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    if unexpected or missing:
        raise ValueError(f"{path}: weights do not match the rebuilt graph (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.source_model = meta.get("source_model")
    return model
