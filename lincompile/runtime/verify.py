"""Verifying drafts in one target call, and committing an accepted path to the state exactly.

A chain of drafts is verified by the model's own forward (the causal op over the new tokens from the state
is the chain case of `reference.verify`); a tree needs the tree verifier, a fork of the model's graph in
which every stateful attention op runs `reference.verify` under the tree mask (torch only). Either way the
call also returns each site's draft keys and values (`draft.{i}.keys|values`), and `commit` absorbs an
accepted root-to-node path from them with `reference.commit`: the committed state is the one decoding the
accepted tokens one at a time gives, with no rerun of the model and whatever the rejected drafts were.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, fx

from lincompile.capture.check import attention_op
from lincompile.kernels.linear_attention.reference import VerifyExtras, commit, verify
from lincompile.methods.params import state_update_reads_params
from lincompile.methods.spec import MethodSpec
from lincompile.passes.linearize import DRAFT_OUTPUT, VERIFY_WINDOW, state_name
from lincompile.runtime.state import RecurrentState

#: Graph input of the tree verifier: parents [tokens] int64 (-1 = attached to the committed prefix).
PARENTS_INPUT = "draft_parents"
#: Beside an ONNX export: every site's method parameters, which `commit` needs.
PARAMS_FILE = "lincompile_params.safetensors"


@dataclass(frozen=True)
class CommitSite:
    """One stateful attention site as `commit` sees it: its method, parameters, scale and state names."""

    index: int
    spec: MethodSpec
    params: tuple[Tensor, ...]
    scale: float
    state_names: tuple[str, ...]

    def draft_names(self) -> tuple[str, str]:
        return state_name(DRAFT_OUTPUT, self.index, "keys"), state_name(DRAFT_OUTPUT, self.index, "values")


def _attribute(root: torch.nn.Module, target: str) -> Tensor:
    return operator.attrgetter(target)(root)


def commit_sites(model: Any) -> list[CommitSite]:
    """The stateful sites of a `LinearizedModel` (from its graph) or an `OrtModel` (from its export)."""
    if hasattr(model, "rewritten"):
        sites = []
        for r in model.rewritten:
            if not r.state_inputs:
                continue
            args = r.node.args
            params = tuple(_attribute(model.graph, p.target) for p in args[6])
            sites.append(CommitSite(r.index, r.spec, params,
                                    float(args[8]), tuple(r.state_inputs)))
        return sites
    return _ort_sites(model)


def _ort_sites(model: Any) -> list[CommitSite]:
    from safetensors.torch import load_file

    meta = model.meta
    if not all("scale" in s for s in meta["sites"]):
        raise ValueError(f"{model.directory}: this export predates speculative decoding (no site scales); "
                         "export it again with this lincompile")
    path = Path(model.directory) / PARAMS_FILE
    tensors = load_file(path) if path.is_file() else {}
    sites = []
    for s in meta["sites"]:
        if not s["state_inputs"]:
            continue
        spec = MethodSpec.from_dict(meta["methods"][s["method"]])
        if spec.kind == "softmax":  # "methods" is keyed by name; cap and sinks are the site's (older exports: none)
            spec = replace(spec, softcap=s.get("softcap", 0.0), sinks=s.get("sinks") is not None)
        missing = [name for name in s.get("params", []) if name not in tensors]
        if missing:
            raise ValueError(f"{model.directory}: {PARAMS_FILE} lacks {missing[:2]}, which committing a speculative "
                             "step reads: the export was damaged or copied in part; export it again")
        params = tuple(tensors[name] for name in s.get("params", []))
        sites.append(CommitSite(s["index"], spec, params, float(s["scale"]), tuple(s["state_inputs"])))
    return sites


def _torch(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    import numpy as np

    return torch.from_numpy(np.array(value.numpy()))


def _commit_batches(sites: list[CommitSite], parts: dict[str, Tensor]) -> list[list[CommitSite]]:
    """Sites whose states can be updated in one `commit` call, stacked along the batch: same method, scale and
    state shapes, and a state update that reads no parameter (so one site's parameters serve them all)."""
    batches: dict[tuple[Any, ...], list[CommitSite]] = {}
    alone = []
    for site in sites:
        if state_update_reads_params(site.spec):
            alone.append([site])
        else:
            shapes = tuple(tuple(parts[name].shape) for name in site.state_names)
            batches.setdefault((site.spec, site.scale, shapes), []).append(site)
    return [*batches.values(), *alone]


def commit_path(sites: list[CommitSite], state: RecurrentState, extras: dict[str, Tensor], parents: Tensor,
                path: list[int]) -> RecurrentState:
    """The state after absorbing the verified tokens on `path` (node indices, root first) from `state`, the
    state the verify call started from. `extras` are that call's outputs; `parents` its tree (chain: i - 1).

    Sites of one method whose state update reads no parameter (`state_update_reads_params`; e.g. augmented,
    softmax, but not hedgehog or retnet) are committed in one call with their states stacked along the batch
    (30 layers cost one site's Python loop): every update is per batch row, so on the CPU each site's state
    is bit for bit the one it gets alone. Other sites are committed one at a time."""
    count = parents.shape[0]
    if count > VERIFY_WINDOW:
        raise ValueError(f"{count} tokens were verified; a verify call may score at most {VERIFY_WINDOW}")
    tensors = dict(state.tensors)
    parts = {name: _torch(tensors[name]) for site in sites for name in site.state_names}
    for batch in _commit_batches(sites, parts):
        names = [site.draft_names() for site in batch]
        keys = torch.cat([extras[k][:, :, -count:] for k, _ in names])
        values = torch.cat([extras[v][:, :, -count:] for _, v in names])
        stacked = [torch.cat([parts[site.state_names[i]] for site in batch]) for i in range(len(batch[0].state_names))]
        first = batch[0]
        info = VerifyExtras(first.spec, first.params, first.scale, keys, values, parents.to(keys.device))
        rows = keys.shape[0] // len(batch)
        for i, part in enumerate(commit(stacked, info, path)):
            tensors.update((site.state_names[i], chunk) for site, chunk in zip(batch, part.split(rows)))
    return RecurrentState(tensors, state.length + len(path))


def _tree_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
                    state: list[Tensor], params: list[Tensor], spec: str, scale: float, causal: bool,
                    parents: Tensor) -> tuple[Tensor, list[Tensor]]:
    """A stateful site under a draft tree: outputs as if each node's path had been decoded; state unchanged."""
    out, _ = verify(q, k, v, list(state), list(params), MethodSpec.from_json(spec), scale, parents)
    return out, list(state)


def tree_verifier(model: Any) -> Callable[..., Any]:
    """A `LinearizedModel` sharing `model`'s weights whose stateful ops verify a tree given as the extra
    input `draft_parents`; call it as `verifier(ids, past_state=, position_ids=, draft_parents=)`."""
    if not hasattr(model, "graph"):
        raise TypeError("tree verification runs on a LinearizedModel (torch); an ONNX model verifies chains")
    # the verifier's graph holds the tensors `model.graph` held when it was built: `model.to(device)` replaces the
    # buffers (parameters change in place), so a verifier is reused only while every tensor is the same object
    tensors = tuple(map(id, itertools.chain(model.graph.parameters(), model.graph.buffers())))
    cached = getattr(model, "_tree_verifier", None)
    if cached is not None and cached[0] == tensors:
        return cached[1]
    graph = fx.Graph()
    graph._codegen = model.graph.graph._codegen
    mapping: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(model.graph.graph, mapping))
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        parents = graph.placeholder(PARENTS_INPUT)
    for old, new in mapping.items():
        if old.op == "call_function" and old.target == attention_op() and old.args[5]:
            new.target = _tree_attention
            new.args = tuple(new.args) + (parents,)
    verifier = model.with_graph(fx.GraphModule(model.graph, graph), [*model.input_names, PARENTS_INPUT])
    object.__setattr__(model, "_tree_verifier", (tensors, verifier))  # not a submodule: its weights are model's
    return verifier
