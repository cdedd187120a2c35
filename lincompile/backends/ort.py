"""`OrtModel`: run an `export_onnx` directory with onnxruntime, the state kept in ORT buffers between calls.

`model(input_ids, attention_mask=None, past_state=None, position_ids=None, logits_to_keep=0)` mirrors
`LinearizedModel.forward`: it returns `.logits`, a CPU `torch.Tensor` [batch, seq or k, vocab] (copied out of
ORT: the one device-to-host copy per call), and `.past_state`, a `RecurrentState` whose tensors are
`onnxruntime.OrtValue`s on the session's device. Feeding that state back binds those same buffers as the
next call's inputs (IO binding, no copy); `state_to_torch` copies one out for inspection. Torch tensors
are accepted as state too (e.g. a `LinearizedModel` state). Position ids default to past length +
arange(seq); `attention_mask` covers the new tokens (or past + new, then the new part is used).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lincompile.backends.onnx import FORMAT, FORMAT_VERSION, META_FILE
from lincompile.jsonconfig import read_json_object
from lincompile.passes.linearize import STATE_INPUT, STATE_OUTPUT
from lincompile.runtime.graphs import LOGITS_INDEX
from lincompile.runtime.prefill import DEFAULT_CHUNK
from lincompile.runtime.state import (RecurrentState, check_attention_mask, check_logits_to_keep, check_position_ids,
                                      check_positions, check_state, check_token_ids, default_positions)

ArrayLike = Any  # torch.Tensor | np.ndarray | OrtValue
#: Prefill tokens per call for an export whose sites take each call in one piece (`python bench/onnx_prefill.py`,
#: SmolLM2 on this CPU: a 2K prompt in calls of 128 tokens 1.35x faster than in calls of 512).
UNCHUNKED_PREFILL = 128


@dataclass
class OrtOutput:
    """`extras`: the graph's other outputs (`draft.*`, `hidden_states`) as CPU torch tensors."""

    logits: torch.Tensor
    past_state: RecurrentState | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, the CPU always last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def _numpy(value: ArrayLike, dtype: np.dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bf16
    return np.ascontiguousarray(np.asarray(value), dtype=dtype)


class OrtModel:
    """An exported model in an onnxruntime session; the JSON beside model.onnx describes its interface."""

    def __init__(self, session: Any, meta: dict[str, Any], directory: Path) -> None:
        self.session = session
        self.meta = meta
        #: each state part's shape per row (a str for a dim that grows), what `check_state` holds a state to
        self._state_shapes = {name: tuple(info["shape"][1:]) for name, info in meta["state"].items()}
        self.directory = directory
        self.input_names: list[str] = [i.name for i in session.get_inputs()]
        self.output_names: list[str] = [o.name for o in session.get_outputs()]
        expected = (meta["input_names"], meta["output_names"])
        if (self.input_names, self.output_names) != expected:
            raise ValueError(f"{directory}: model.onnx interface {self.input_names} -> {self.output_names} does not "
                             f"match {META_FILE} {expected[0]} -> {expected[1]}")
        self.state_names: list[str] = list(meta["state"])
        self.max_positions: int | None = meta.get("max_positions")  # exports before it was recorded: unchecked
        self.position_padding: int | None = meta.get("position_padding")  # see LinearizedModel
        self.positions_from_mask: bool = bool(meta.get("positions_from_mask"))
        self.limit_reason: str | None = meta.get("limit_reason")
        self._dtypes = {v["name"]: np.dtype(v["dtype"]) for v in meta["inputs"]}
        provider = session.get_providers()[0]
        self.device_type = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        options = session.get_provider_options().get(provider, {})
        self.device_id = int(options.get("device_id", 0) or 0)
        self._tokenizer: Any = None
        #: Prompt tokens per call `lincompile.runtime.prefill` (and `generate`) take by default; settable: 512 when
        #: the export runs long calls in chunks itself (`export_onnx(chunk_size=...)`), else `UNCHUNKED_PREFILL`
        #: (each call costs time quadratic in its length there).
        self.prefill_chunk_size: int = DEFAULT_CHUNK if meta.get("chunk_size") else UNCHUNKED_PREFILL

    @classmethod
    def from_dir(cls, directory: str | Path, providers: Sequence[str] | None = None,
                 session_options: Any = None) -> "OrtModel":
        """Load `directory`/model.onnx and lincompile_onnx.json (as written by `export_onnx`)."""
        import onnxruntime as ort

        path = Path(directory)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} has no {META_FILE}, so it is not an export of lincompile's: export a "
                                    "model with `lincompile export` (Python: lincompile.export_onnx)")
        meta = read_json_object(meta_file, "export the model again (`lincompile export`)")
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')} is not readable "
                             f"by this lincompile ({FORMAT} v{FORMAT_VERSION})")
        if not (path / meta["model_file"]).is_file():
            raise FileNotFoundError(f"{path} holds {META_FILE} but no {meta['model_file']}: the export was damaged or "
                                    "copied in part; export it again with lincompile export")
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # errors only: constant-folding notices are not for users
        chosen = list(providers) if providers else default_providers()
        try:
            session = ort.InferenceSession(str(path / meta["model_file"]), sess_options=session_options,
                                           providers=chosen)
        except Exception as exc:
            if meta.get("dtype") != "bfloat16" or "NOT_IMPLEMENTED" not in str(exc):
                raise
            raise ValueError(f"{path}: onnxruntime ({', '.join(chosen)}) has no kernels for this bfloat16 export "
                             f"({str(exc).splitlines()[0]}); export the model in float32 or float16 instead "
                             "(model.float() or model.half() before optimize)") from exc
        return cls(session, meta, path)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved beside the model (None if the export had none)."""
        if self._tokenizer is None and self.meta.get("tokenizer"):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        return self._tokenizer

    def _ortvalue(self, value: ArrayLike, name: str) -> Any:
        import onnxruntime as ort

        if isinstance(value, ort.OrtValue):
            return value
        return ort.OrtValue.ortvalue_from_numpy(_numpy(value, self._dtypes[name]), self.device_type, self.device_id)

    def _token_ids(self, input_ids: ArrayLike) -> np.ndarray:
        """`input_ids` as int64 [batch, tokens], refused where onnxruntime would not say what is wrong (an empty
        call), or would silently compute something (float ids, negative ids: Gather wraps them)."""
        raw = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {raw.dtype}")
        ids = _numpy(raw, np.dtype(np.int64))
        if ids.ndim != 2 or 0 in ids.shape:
            raise ValueError(f"input_ids must be a non-empty [batch, tokens] array, got shape {ids.shape}")
        check_token_ids(torch.from_numpy(ids), self.meta.get("vocab_size"))
        return ids

    def initial_state(self, batch: int) -> RecurrentState:
        """Zeros of the declared state shapes: `batch` rows; any other symbolic dim (a growing cache) is 0."""
        tensors = {}
        for name, info in self.meta["state"].items():
            shape = [batch if d == "batch" else (0 if isinstance(d, str) else d) for d in info["shape"]]
            tensors[name] = self._ortvalue(np.zeros(shape, dtype=np.dtype(info["dtype"])), name)
        return RecurrentState(tensors, 0)

    def __call__(self, input_ids: ArrayLike, attention_mask: ArrayLike | None = None,
                 past_state: RecurrentState | None = None, position_ids: ArrayLike | None = None,
                 logits_to_keep: int = 0) -> OrtOutput:
        ids = self._token_ids(input_ids)
        batch, tokens = ids.shape
        check_logits_to_keep(logits_to_keep)
        if past_state is not None and not self.meta.get("supports_state", True):
            raise ValueError("this model has attention sites without a recurrent state; call it without past_state")
        if past_state is not None:
            check_state(past_state, self.state_names, batch, self._state_shapes)
        state = past_state if past_state is not None else self.initial_state(batch)
        check_positions(self, state.length + tokens)
        # nonzero keeps a token, as in torch (a cast to int64 would drop one marked 0.5)
        mask = None
        if attention_mask is not None:
            mask = _numpy(attention_mask, np.dtype(np.float64))
            check_attention_mask(mask)
            mask = (mask != 0).astype(np.int64)
        counted = torch.from_numpy(mask) if mask is not None and self.positions_from_mask else None
        if mask is not None and state.length and mask.shape[1:] == (state.length + tokens,):
            mask = mask[:, state.length:]
        if mask is None:
            mask = np.ones((batch, tokens), dtype=np.int64)
        if mask.shape != (batch, tokens):
            raise ValueError(f"attention_mask must be [batch, tokens] = {(batch, tokens)} (or cover past + new "
                             f"tokens), got {mask.shape}")
        if position_ids is None:
            position_ids = default_positions(torch.from_numpy(ids), state.length, self.position_padding,
                                             counted).numpy()
        else:
            check_position_ids(position_ids, batch, tokens, mask)
            position_ids = np.where(mask != 0, _numpy(position_ids, np.dtype(np.int64)), 0)  # as torch: see there
        values = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, **state.tensors}
        keep = logits_to_keep if 0 < logits_to_keep < tokens else tokens
        if LOGITS_INDEX in self.input_names:  # the LM head scores only these tokens
            values[LOGITS_INDEX] = np.arange(tokens - keep, tokens, dtype=np.int64)
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise ValueError(f"missing inputs {missing}; this model takes {self.input_names}")
        binding = self.session.io_binding()
        bound = [self._ortvalue(values[name], name) for name in self.input_names]  # alive until run returns
        for name, value in zip(self.input_names, bound):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.output_names, binding.get_outputs()))
        logits = torch.from_numpy(outputs.pop(self.output_names[0]).numpy())[:, -keep:]  # older exports: all
        present = {name: outputs.pop(name) for name in list(outputs) if name.startswith(STATE_OUTPUT + ".")}
        new_state = RecurrentState(
            {name.replace(STATE_OUTPUT, STATE_INPUT, 1): value for name, value in present.items()},
            state.length + tokens)
        extras = {name: torch.from_numpy(value.numpy()) for name, value in outputs.items()}
        return OrtOutput(logits, new_state if self.meta.get("supports_state", True) else None, extras)

    def generate(self, input_ids: ArrayLike, max_new_tokens: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Autoregressive generation with the torch path's arguments (`lincompile.runtime.generate`):
        chunked prefill, then one token per call, the state staying in ORT buffers throughout; stops at the
        exported model's `eos_token_id` unless given another (None: never)."""
        from lincompile.runtime.generate import generate, with_model_ids

        kwargs = with_model_ids(kwargs, self.meta.get("eos_token_id"), self.meta.get("pad_token_id"))
        return generate(self, torch.as_tensor(self._token_ids(input_ids)), max_new_tokens, **kwargs)

    @staticmethod
    def state_to_torch(state: RecurrentState) -> RecurrentState:
        """A copy of `state` with every OrtValue turned into a CPU torch tensor."""
        tensors = {name: value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value.numpy()))
                   for name, value in state.tensors.items()}
        return RecurrentState(tensors, state.length)
