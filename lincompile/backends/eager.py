"""`LinearizedModel`: the rewritten graph behind the Hugging Face calling convention.

`model(input_ids, attention_mask=None, past_state=None, use_cache=True)` returns `.logits` and
`.past_state` (a `RecurrentState`). Prefill of n tokens followed by single-token steps through
`past_state` computes what one forward over all tokens computes.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace

from typing import Any

import torch
from torch import fx

from lincompile.config import LinearizeConfig
from lincompile.diagnostics import warn
from lincompile.kernels.linear_attention.reference import init_state
from lincompile.passes.detect_attention import AttentionSite
from lincompile.passes.linearize import STATE_INPUT, STATE_OUTPUT, RewrittenSite
from lincompile.runtime import graphs
from lincompile.runtime.graphs import LOGITS_INDEX
from lincompile.runtime.state import (COSFORMER_HORIZON, SLIDING_WINDOW, RecurrentState, check_attention_mask,
                                      check_logits_to_keep, check_position_ids, check_positions, check_state,
                                      check_token_ids, default_positions)


def _rebound(rewritten: list[RewrittenSite], graph: torch.nn.Module) -> list[RewrittenSite]:
    """`rewritten` with each site's attention call looked up in `graph` by name (a copied or rewritten fx graph:
    its own node, so that what reads the call reads `graph`); as it was where `graph` has no such call (a compiled
    module, or a call given another target, as the tree verifier's)."""
    if not isinstance(graph, fx.GraphModule):
        return list(rewritten)
    nodes = {node.name: node for node in graph.graph.nodes}
    rebound = []
    for r in rewritten:
        node = None if r.node is None else nodes.get(r.node.name)
        found = node is not None and node.target == r.node.target
        rebound.append(replace(r, node=node) if found and node is not r.node else r)
    return rebound


@dataclass
class LinearizedOutput:
    """`extras`: the graph's other outputs (`draft.{i}.keys|values`, `hidden_states`; see passes.linearize)."""

    logits: torch.Tensor
    past_state: RecurrentState | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class LinearizedModel(torch.nn.Module):
    """A linearized model: `graph` (an fx.GraphModule holding all weights) plus its interface. `max_positions`: the
    most tokens a sequence may have (the source's position table, `limit_reason` saying which kind; None: no such
    table), or fewer: the sliding window of a site rewritten to exact softmax, whose op has no window.
    `position_padding`: the padding id a RoBERTa-style source numbers positions after (None: from 0);
    `positions_from_mask`: the source numbers the real tokens of its attention mask (OPT). Calls without
    `position_ids` get the source's own numbering either way."""

    def __init__(self, graph: fx.GraphModule, input_names: list[str], output_names: list[str],
                 sites: list[AttentionSite], rewritten: list[RewrittenSite], config: LinearizeConfig,
                 hf_config: object | None = None, max_positions: int | None = None,
                 position_padding: int | None = None, limit_reason: str | None = None,
                 positions_from_mask: bool = False) -> None:
        super().__init__()
        self.graph = graph
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.sites = sites
        self.rewritten = rewritten
        self.config = config
        self.hf_config = hf_config
        self._site_by_index = {s.index: s for s in sites}
        self.state_inputs = [name for r in rewritten for name in r.state_inputs]
        self._shapes: dict[str, tuple[int | str, ...]] | None = None  # `_state_shapes`, once asked for
        self.source_class: str | None = None  # the model class `optimize` linearized (what `load` rebuilds)
        #: the model (name or directory) whose weights training started from, when they have changed since (set by
        #: `lincompile train`, saved and loaded with the model): `lincompile eval` compares against it
        self.source_model: str | None = None
        self.captured_dtype = self._param_dtype()  # the graph's casts were traced for it
        self.max_positions = max_positions  # the source's position table's limit (None: none)
        self.limit_reason = limit_reason  # None: learned positions
        windows = [site.window for r in rewritten for site in [self._site_by_index[r.index]]
                   if r.spec.kind == "softmax" and site.window and r.state_inputs
                   and site.mask_kind != "custom"]  # a custom mask (and the window in it) is kept as a bias
        if windows and (max_positions is None or min(windows) <= max_positions):
            self.max_positions, self.limit_reason = min(windows), SLIDING_WINDOW
        horizons = [r.spec.horizon for r in rewritten if r.spec.feature_map == "cosformer"]
        if horizons and (self.max_positions is None or min(horizons) < self.max_positions):
            self.max_positions, self.limit_reason = min(horizons), COSFORMER_HORIZON
        self.position_padding = position_padding
        self.positions_from_mask = positions_from_mask
        self.quantized: str | None = None  # the scheme of `quantize`'s 8-bit linear layers (None: float weights)
        # decodable through `past_state`: some site keeps a state, and no causal site lacks one (an encoder's
        # sites are all non-causal: it keeps nothing, and is called on whole sequences)
        kept = {r.index for r in rewritten if r.state_inputs}
        self.supports_state = (len(rewritten) == len(sites) and bool(kept)
                               and all(s.index in kept or not s.causal for s in sites))

    def _param_dtype(self) -> torch.dtype | None:
        """The dtype of the graph's first parameter (the embeddings): the model's dtype."""
        first = next(self.graph.parameters(), None)
        return None if first is None else first.dtype

    def with_graph(self, graph: torch.nn.Module, input_names: list[str] | None = None) -> "LinearizedModel":
        """This model's interface (sites, config, position limits) around `graph`, a derived graph over the same
        weights (a compiled one, a tree verifier); `input_names` if it takes other inputs."""
        derived = LinearizedModel(graph, self.input_names if input_names is None else input_names, self.output_names,
                                  self.sites, _rebound(self.rewritten, graph), self.config, self.hf_config,
                                  self.max_positions, self.position_padding, self.limit_reason,
                                  self.positions_from_mask)
        derived.source_class, derived.source_model = self.source_class, self.source_model
        derived.captured_dtype = self.captured_dtype  # the casts in `graph` were traced for it (a cast model refuses)
        derived.quantized = self.quantized
        if hasattr(self, "recipe"):  # what `pretrained.linearized` loaded (`pretrained.trained` reads it)
            derived.recipe = self.recipe
        return derived

    def quantize(self, scheme: str = "int8", skip: str | tuple[str, ...] | list[str] = (),
                 calibration: torch.Tensor | None = None) -> "LinearizedModel":
        """This model with 8-bit linear layers (a new model; this one is left unchanged and shares its other
        tensors): int8 weights per output row, activations quantized per token, integer products on the CPU.
        `skip`: fnmatch patterns of projections kept float ('lm_head', '*.down_proj'; one string is one pattern).
        `calibration`: token blocks [N, T] of representative text (`lincompile.train.data.calibration_blocks`: 8
        of 256 tokens do; no mask, so no padding): each projection's input is smoothed by its ranges over them
        (SmoothQuant), which halves SmolLM2's perplexity cost. For inference on the CPU (quantize before compiling); see
        `lincompile.backends.eager_quantize`. Greedy text may differ at near-ties between a batched and a single
        run, or other prefill chunks: 8-bit activations magnify the attention forms' last-bit differences."""
        from lincompile.backends.eager_quantize import activation_ranges, check_scheme, quantize_graph
        from lincompile.kernels.int8.linear import SLOW_INT8, int8_speedup

        if self.quantized is not None:
            raise ValueError(f"this model is already quantized ({self.quantized}); quantize its float original")
        if not isinstance(self.graph, fx.GraphModule):
            raise ValueError(f"this model runs a {type(self.graph).__name__} (compiled), not an fx graph to rewrite: "
                             "quantize the model first, then compile the quantized one")
        check_scheme(scheme)  # before calibration's forwards
        skip = (skip,) if isinstance(skip, str) else tuple(skip)
        ranges = None
        if calibration is not None:
            if (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or not calibration.numel()
                    or calibration.dtype not in (torch.int32, torch.int64)):
                raise ValueError("calibration must be token ids [blocks, tokens] (an integer tensor, e.g. "
                                 "lincompile.train.data.calibration_blocks(tokenizer, 8)), got "
                                 f"{getattr(calibration, 'dtype', type(calibration).__name__)} "
                                 f"{tuple(getattr(calibration, 'shape', ()))}")
            ranges = activation_ranges(self, calibration, skip)
        graph, count = quantize_graph(self.graph, scheme, skip, ranges)
        if not count:
            raise ValueError("this model has no float linear layer to quantize" + (f" once skip={list(skip)} is "
                             "applied" if skip else ""))
        speedup = int8_speedup()
        if speedup < SLOW_INT8:
            warn(f"torch._int_mm runs at {speedup:.2f}x a float32 matmul's speed on this CPU (torch reports "
                 f"{torch.backends.cpu.get_cpu_capability()}; on x86 oneDNN's fast int8 kernels need AVX512 VNNI "
                 "or AMX): the 8-bit model computes right but runs slower than the float one here: keep the float "
                 "model, or for 8-bit weights on this CPU export to ONNX (export_onnx(..., quantize='int8'), "
                 "onnxruntime's own kernels)")
        derived = self.with_graph(graph)
        derived.quantized = scheme
        return derived

    def __deepcopy__(self, memo: dict[int, Any]) -> "LinearizedModel":
        """An independent copy (graph and weights copied). The detection metadata (`sites`, `report`: read-only,
        holding nodes of the traced graph, which cannot be copied) is shared; `rewritten` points into the copied
        graph."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        shared = ("sites", "_site_by_index", "report", "rewritten")
        dropped = ("_compiled_call_impl",  # `model.compile()`'s wrapper calls the original model
                   "_tree_verifier", "_logits_forked")  # forks of the original graph: the copy builds its own
        for key, value in self.__dict__.items():
            if key not in dropped:
                copied.__dict__[key] = value if key in shared else copy.deepcopy(value, memo)
        copied.rewritten = _rebound(self.rewritten, copied.graph)
        return copied

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a LinearizedModel cannot be pickled or shallow-copied (its metadata holds nodes of the "
                        "traced graph): save it with model.save_pretrained(directory) and read it back with "
                        "lincompile.load(directory); copy.deepcopy(model) copies it in memory")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _state_shapes(self) -> dict[str, tuple[int | str, ...]]:
        """Each state part's shape per row ("past" for a KV cache's growing length), computed once."""
        if self._shapes is None:
            self._shapes = {name: tuple("past" if n == 0 else n for n in t.shape[1:])
                            for name, t in self.initial_state(1, "meta").tensors.items()}
        return self._shapes

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> RecurrentState:
        """The state before any token, for every stateful site."""
        device = self.device if device is None else device
        dtype = next(self.parameters()).dtype
        tensors: dict[str, torch.Tensor] = {}
        for r in self.rewritten:
            if not r.state_inputs:
                continue
            site = self._site_by_index[r.index]
            spec = r.spec
            parts = init_state(spec, batch, site.kv_heads, site.head_dim, site.v_head_dim, device, dtype)
            tensors.update(zip(r.state_inputs, parts))
        return RecurrentState(tensors, 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_state: RecurrentState | None = None, use_cache: bool = True,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                **extra: torch.Tensor) -> LinearizedOutput:
        """`logits_to_keep`: the logits of the last that-many tokens only ([B, k, V]; 0: every token's; the
        decoder's tokens in an encoder-decoder), as in Hugging Face; the LM head then computes k rows
        (`runtime.graphs.logits_fork`: a prefill skips the head for all but its last token)."""
        dtype = self._param_dtype()
        if dtype != self.captured_dtype:
            raise ValueError(f"this model was captured in {self.captured_dtype} and cast to {dtype} since; its graph "
                             f"keeps the {self.captured_dtype} casts it was traced with: cast the Hugging Face model "
                             "first, then optimize it (a saved model: lincompile.load(dir, dtype=...))")
        self._check_keywords(extra)
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got shape "
                             f"{tuple(input_ids.shape)}")
        batch, tokens = input_ids.shape
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.device.type == "cpu":  # a GPU's ids are not read: that would cost a sync per call
            check_token_ids(input_ids, getattr(self.hf_config, "vocab_size", None))
        check_logits_to_keep(logits_to_keep)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, tokens], got shape {tuple(attention_mask.shape)}")
        if attention_mask is not None:
            check_attention_mask(attention_mask)
        if past_state is not None and not self.supports_state:
            raise ValueError("this model has attention sites without a recurrent state (not rewritten, "
                             "non-causal/custom-bias, or a method that reads later tokens); call it on the whole "
                             "sequence without past_state")
        if past_state is not None:
            check_state(past_state, self.state_inputs, batch, self._state_shapes())
            if not all(isinstance(t, torch.Tensor) for t in past_state.tensors.values()):
                past_state = past_state.to(input_ids.device)  # an `OrtModel`'s state: its OrtValues as tensors
        state = past_state if past_state is not None else self.initial_state(batch, input_ids.device)
        check_positions(self, state.length + tokens)
        counted = attention_mask if self.positions_from_mask else None  # past + new tokens, when it covers both
        if attention_mask is not None and attention_mask.shape[1] == state.length + tokens and state.length:
            attention_mask = attention_mask[:, state.length:]
        given_mask = attention_mask
        if attention_mask is None:
            attention_mask = torch.ones(batch, tokens, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (batch, tokens):
            raise ValueError(f"attention_mask must be [batch, tokens] = {(batch, tokens)} (or cover past + new "
                             f"tokens), got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = default_positions(input_ids, state.length, self.position_padding, counted)
        else:
            check_position_ids(position_ids, batch, tokens, given_mask)
            position_ids = torch.as_tensor(position_ids, device=input_ids.device).expand(batch, tokens)
            if given_mask is not None:  # nothing reads a masked token's position: keep it inside a learned table
                position_ids = torch.where(given_mask.to(input_ids.device) != 0, position_ids, 0)
        if "decoder_input_ids" in extra and "decoder_attention_mask" not in extra:  # optional, as in Hugging Face
            extra["decoder_attention_mask"] = torch.ones_like(extra["decoder_input_ids"])
        values = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  **extra, **state.tensors}
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise ValueError(f"missing inputs {missing}; this model takes {self.input_names}")
        graph, names = self.graph, self.input_names
        scored = extra["decoder_input_ids"].shape[1] if "decoder_input_ids" in extra else tokens  # logits' rows
        if 0 < logits_to_keep < scored:
            fork = self.logits_fork()
            if fork is not None:
                graph, names = fork, [*names, LOGITS_INDEX]
                values[LOGITS_INDEX] = torch.arange(scored - logits_to_keep, scored, device=input_ids.device)
        outputs = dict(zip(self.output_names, graph(*[values[n] for n in names])))
        logits = outputs.pop(self.output_names[0])
        if logits.shape[1] > logits_to_keep > 0:  # no fork (a compiled graph, a head it cannot split): cut after
            logits = logits[:, -logits_to_keep:]
        present = {name: outputs.pop(name) for name in list(outputs) if name.startswith(STATE_OUTPUT + ".")}
        new_state = None
        if use_cache and self.supports_state:
            new_state = RecurrentState(
                {name.replace(STATE_OUTPUT, STATE_INPUT, 1): t for name, t in present.items()}, state.length + tokens)
        return LinearizedOutput(logits, new_state, outputs)

    @torch.compiler.disable
    def logits_fork(self) -> fx.GraphModule | None:
        """`runtime.graphs.logits_fork(self.graph)`, built once while the graph holds the same tensors
        (`model.to(device)` replaces buffers: the fork would keep the old ones); None for a compiled graph or a head
        it cannot split."""
        if not isinstance(self.graph, fx.GraphModule):
            return None
        tensors = tuple(map(id, itertools.chain(self.graph.parameters(), self.graph.buffers())))
        cached = self.__dict__.get("_logits_forked")
        if cached is None or cached[0] != tensors:
            cached = (tensors, graphs.logits_fork(self.graph))
            object.__setattr__(self, "_logits_forked", cached)  # not a submodule: its weights are the graph's
        return cached[1]

    def _check_keywords(self, extra: dict[str, object]) -> None:
        """Refuse keywords that are not graph inputs (an ignored one would change nothing, silently)."""
        if not extra:  # the common call, every decode step: nothing to check
            return
        state = set(self.state_inputs)
        known = [n for n in self.input_names if n not in state]
        unknown = [name for name in extra if name not in known]
        if not unknown:
            return
        hints = {"past_key_values": "the recurrent state goes in past_state= (an earlier output's .past_state)",
                 "labels": "no loss is computed: take .logits (lincompile.train has the losses)"}
        why = "; ".join(hints[name] for name in unknown if name in hints)
        raise TypeError(f"unexpected keyword argument(s) {unknown}: this model takes {known}, past_state and "
                        f"use_cache" + (f"; {why}" if why else ""))

    def require_float(self, what: str, instead: str) -> None:
        """Raise for `what` (a call that needs the float weights) on a quantized model, saying what to do."""
        if self.quantized is not None:
            raise ValueError(f"{what} needs float weights; this model's linear layers are {self.quantized} "
                             f"(LinearizedModel.quantize): {instead}")

    def save_pretrained(self, directory: str, tokenizer: object | None = None) -> str:
        """Write this model atomically to `directory`; `lincompile.load(directory)` reads it back."""
        from lincompile.api import save

        return str(save(self, directory, tokenizer))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, **kwargs: object) -> torch.Tensor:
        """Autoregressive generation through the recurrent state, speculative with `draft=` (see
        `lincompile.runtime.generate`); stops at the model config's `eos_token_id` unless given another (None:
        never)."""
        from lincompile.runtime.generate import generate, with_model_ids

        config = self.hf_config
        kwargs = with_model_ids(kwargs, getattr(config, "eos_token_id", None), getattr(config, "pad_token_id", None))
        return generate(self, torch.as_tensor(input_ids), max_new_tokens, **kwargs)

    def export_onnx(self, out_dir: str, opset: int | None = None, tokenizer: object | None = None,
                    **options: Any) -> str:
        """Write model.onnx + lincompile_onnx.json atomically; `options` are `lincompile.export_onnx`'s keywords
        (chunk_size, quantize, decode_step, ...)."""
        from lincompile.backends.onnx import export_onnx

        return str(export_onnx(self, out_dir, opset, tokenizer, **options))
