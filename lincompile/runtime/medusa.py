"""Medusa-style draft heads on a target's final hidden state, and the sparse token trees they propose.

Head i (1..num_heads) maps the final hidden state h_t (the lm_head's input, after the final norm) through
`num_layers` residual blocks `h + SiLU(W h + b)` and then the target's own lm_head, to logits for token t+1+i
(the base lm_head predicts t+1). Invariants:
- W and b start at zero, so every head starts as the base lm_head;
- the lm_head weight is the target's (shared storage, frozen, never saved): a saved directory holds only the
  residual blocks (`medusa.safetensors`) and `medusa.json`.

A tree is a set of choice paths: `(0, 2)` is "the top-1 token of head 1, then the top-3 token of head 2 below it".
`medusa_tree` turns head logits into (tokens, parents) in topological order; the runtime adds the root token.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lincompile.atomic import atomic_directory
from lincompile.jsonconfig import JsonConfig
from lincompile.runtime.sampling import SamplingConfig, probabilities

__all__ = ["MEDUSA_FORMAT", "MedusaConfig", "MedusaHeads", "TREES", "TreeSpec", "attach", "lm_head_weight",
           "medusa_tree", "read_metadata", "sample_chain", "tree_spec"]

MEDUSA_FORMAT = "lincompile-medusa"
MEDUSA_VERSION = 1
CONFIG_FILE = "medusa.json"
WEIGHTS_FILE = "medusa.safetensors"


@dataclass(frozen=True, kw_only=True)
class MedusaConfig(JsonConfig):
    """Shape of a set of heads: `num_heads` future tokens, `num_layers` residual blocks per head."""

    num_heads: int = 4
    hidden_size: int
    vocab_size: int
    num_layers: int = 1

    def __post_init__(self) -> None:
        bad = [f.name for f in dataclasses.fields(self) if not (isinstance(getattr(self, f.name), int)
                                                                 and getattr(self, f.name) >= 1)]
        if bad:
            raise ValueError(f"MedusaConfig fields {bad} must be integers >= 1")


class ResBlock(nn.Module):
    """`h + SiLU(W h + b)`, zero-initialised (the identity)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + F.silu(self.linear(h))


class MedusaHeads(nn.Module):
    """`num_heads` draft heads sharing the target's frozen lm_head weight [vocab, hidden]."""

    lm_head_weight: Tensor

    def __init__(self, config: MedusaConfig, lm_head_weight: Tensor) -> None:
        super().__init__()
        _check_lm_head(config, lm_head_weight)
        self.config = config
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(config.hidden_size) for _ in range(config.num_layers)))
            for _ in range(config.num_heads))
        self.register_buffer("lm_head_weight", lm_head_weight.detach(), persistent=False)

    def features(self, hidden: Tensor) -> Tensor:
        """[..., H] -> [..., num_heads, H]: each head's input to the lm_head (in the blocks' dtype)."""
        h = hidden.to(self.heads[0][0].linear.weight.dtype)
        return torch.stack([head(h) for head in self.heads], dim=-2)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [B, T, H] -> logits [B, T, num_heads, V]; [..., i-1, :] predicts token t+1+i.

        One matmul over all heads, so the lm_head weight is read once (in its own dtype)."""
        return F.linear(self.features(hidden).to(self.lm_head_weight.dtype), self.lm_head_weight)

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write medusa.json (+ `metadata`, e.g. training results) and the block weights, atomically."""
        from safetensors.torch import save_file

        target = Path(directory)
        with atomic_directory(target, CONFIG_FILE) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, tmp / WEIGHTS_FILE)
            meta = {"format": MEDUSA_FORMAT, "version": MEDUSA_VERSION, "config": self.config.to_dict(),
                    "metadata": metadata or {}}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return target

    @classmethod
    def load(cls, directory: str | Path, lm_head_weight: Tensor) -> "MedusaHeads":
        """Read what `save` wrote, on `lm_head_weight`'s device; ValueError on any mismatch or corruption."""
        from safetensors.torch import load_file

        path = Path(directory)
        meta = read_metadata(path)
        config = MedusaConfig.from_dict(meta["config"])
        heads = cls(config, lm_head_weight)
        try:
            state = load_file(path / WEIGHTS_FILE)
        except Exception as exc:
            raise ValueError(f"{path / WEIGHTS_FILE}: cannot read the head weights ({exc})") from exc
        expected = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            diff = sorted(set(found.items()) ^ set(expected.items()))[:4]
            raise ValueError(f"{path / WEIGHTS_FILE}: weights do not match {CONFIG_FILE} ({config}); "
                             f"differing entries (name, shape): {diff}")
        heads.load_state_dict(state)
        return heads.to(lm_head_weight.device)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The parsed medusa.json of a saved head directory (checked format and version)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} holds no Medusa heads (no {CONFIG_FILE}); train them with "
                                "`lincompile train-medusa`")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != MEDUSA_FORMAT:
        raise ValueError(f"{path}: not a {MEDUSA_FORMAT} file")
    if meta.get("version", 0) > MEDUSA_VERSION:
        raise ValueError(f"{path}: version {meta['version']} is newer than this lincompile")
    return meta


def lm_head_weight(model: nn.Module) -> Tensor:
    """The target's lm_head weight [V, H]: a Hugging Face model's output embeddings, or the final linear of a
    `LinearizedModel` graph (`lincompile.runtime.graphs.lm_head_weight`)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is not None:
        return head.weight
    from lincompile.runtime.graphs import lm_head_weight as graph_lm_head_weight

    return graph_lm_head_weight(model)


def attach(model: nn.Module, directory: str | Path) -> MedusaHeads:
    """Load heads saved in `directory` onto `model`'s lm_head and set them as `model.medusa` (for
    `generate(draft="medusa")`). They are not registered as a submodule: the model's parameters, state dict and
    saved files do not change."""
    heads = MedusaHeads.load(directory, lm_head_weight(model))
    object.__setattr__(model, "medusa", heads)
    return heads


def _check_lm_head(config: MedusaConfig, weight: Tensor) -> None:
    expected = (config.vocab_size, config.hidden_size)
    if weight.dim() != 2 or tuple(weight.shape) != expected:
        raise ValueError(f"the heads were made for hidden size {config.hidden_size} and vocabulary "
                         f"{config.vocab_size} (lm_head [V, H] = {list(expected)}), but the target's lm_head "
                         f"weight is {list(weight.shape)}")


# --- trees ---------------------------------------------------------------------------------------------

#: Medusa's "mc_sim_7b_63" sparse tree (63 nodes, depth 4, top-10 at depth 1).
MC_SIM_63: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,),
    (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1),
    (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0),
    (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0))
#: Named trees. "chain" is top-1 of every head (depth = num_heads); named trees are cut to the heads available.
TREES: dict[str, tuple[tuple[int, ...], ...]] = {
    "default": MC_SIM_63,
    "small": MC_SIM_63[:31],  # the 31 highest-ranked paths of mc_sim_7b_63 (prefix-closed)
    "chain": tuple((0,) * d for d in range(1, 17)),
}


@dataclass(frozen=True)
class TreeSpec:
    """A validated tree: paths sorted by (depth, path), so parents come first.

    `parents[i]` is -1 for depth-1 nodes (children of the root token), else an earlier index;
    `topk[d]` is how many candidates head d+1 must rank."""

    paths: tuple[tuple[int, ...], ...]
    parents: tuple[int, ...]
    topk: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.topk)

    def __len__(self) -> int:
        return len(self.paths)


@functools.lru_cache(maxsize=32)
def tree_spec(choices: str | tuple[tuple[int, ...], ...], num_heads: int) -> TreeSpec:
    """Validate `choices` (a name in `TREES` or choice paths) for `num_heads` heads.

    Named trees drop paths deeper than `num_heads`; explicit paths must be non-empty, distinct, >= 0,
    prefix-closed and at most `num_heads` deep."""
    if isinstance(choices, str):
        if choices not in TREES:
            raise ValueError(f"unknown tree {choices!r}; expected one of {sorted(TREES)} or a list of paths")
        paths = [p for p in TREES[choices] if len(p) <= num_heads]
    else:
        paths = [tuple(int(i) for i in p) for p in choices]
        deep = [p for p in paths if len(p) > num_heads]
        if deep:
            raise ValueError(f"tree paths {deep[:3]} are deeper than the {num_heads} heads")
    if not paths or any(not p or min(p) < 0 for p in paths):
        raise ValueError("a tree needs at least one path, and every path is a non-empty tuple of indices >= 0")
    if len(set(paths)) != len(paths):
        raise ValueError("tree paths must be distinct")
    ordered = sorted(paths, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(ordered)}
    orphans = [p for p in ordered if len(p) > 1 and p[:-1] not in index]
    if orphans:
        raise ValueError(f"tree paths {orphans[:3]} have no parent path (the tree must be prefix-closed)")
    parents = tuple(index[p[:-1]] if len(p) > 1 else -1 for p in ordered)
    depth = max(len(p) for p in ordered)
    topk = tuple(1 + max(p[d] for p in ordered if len(p) > d) for d in range(depth))
    return TreeSpec(tuple(ordered), parents, topk)


def medusa_tree(head_logits: Tensor, choices: str | Sequence[Sequence[int]] = "default") -> tuple[Tensor, Tensor]:
    """Draft tree from one position's head logits [num_heads, V]: (tokens [n], parents [n]), both int64.

    Node i holds the `paths[i][-1]`-th ranked token of head `len(paths[i])`; ties rank like `torch.topk`."""
    if head_logits.dim() != 2:
        raise ValueError(f"head_logits must be [num_heads, vocab], got {tuple(head_logits.shape)}")
    key = choices if isinstance(choices, str) else tuple(tuple(p) for p in choices)
    spec = tree_spec(key, head_logits.shape[0])
    if max(spec.topk) > head_logits.shape[1]:
        raise ValueError(f"the tree ranks {max(spec.topk)} candidates but the vocabulary has {head_logits.shape[1]}")
    ranked = [torch.topk(head_logits[d], k).indices for d, k in enumerate(spec.topk)]
    tokens = torch.stack([ranked[len(p) - 1][p[-1]] for p in spec.paths])
    return tokens, torch.tensor(spec.parents, dtype=torch.long, device=head_logits.device)


def sample_chain(head_logits: Tensor, sampling_config: SamplingConfig,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One draft chain for speculative sampling: token i drawn from head i's distribution q_i.

    Returns (tokens [num_heads], q_probs [num_heads, V] fp32); greedy configs give the argmax (one-hot q)."""
    if head_logits.dim() != 2:
        raise ValueError(f"head_logits must be [num_heads, vocab], got {tuple(head_logits.shape)}")
    q = probabilities(head_logits, sampling_config)
    tokens = torch.multinomial(q, 1, generator=generator).squeeze(-1)
    return tokens, q
