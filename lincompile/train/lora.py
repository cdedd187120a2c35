"""LoRA as a graph rewrite over the projections of a linearized graph, and `merge_lora` to fold it back.

A projection is an `aten.linear.default(x, W, b?)` node (W [out, in]) or a GPT-2 `Conv1D`, captured as
`aten.addmm.default(b, x, W)` (W [in, out]), whose weight is a get_attr of `<path>.weight` with the last
components of `<path>` equal to a target (`q_proj`, or `attn.c_proj` to skip GPT-2's `mlp.c_proj`). It becomes

    y = proj(x) + (alpha / r) * linear(linear(x, A), B)      A [r, in] ~ U(+-1/sqrt(in)), B [out, r] = 0

with A, B parameters `lincompile_lora.<path with "." -> "_">.{A,B}`. Invariants: B = 0 at creation, so the graph
computes exactly what it computed before; `merge_lora` replaces W by a new parameter W + (alpha / r) * B @ A (the
source Hugging Face model, which shares W, is left unchanged) and restores the original graph structure and
state-dict keys.
"""
from __future__ import annotations

import math

import torch
from torch import fx

aten = torch.ops.aten

#: Submodule of the graph that owns the adapters.
LORA_MODULE = "lincompile_lora"
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
_META = "lincompile_lora"  # node.meta key on the `add` node of each adapter: (holder name, scale)


def projection(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(input, weight get_attr, transposed) for a projection node, else None."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        x, weight, transposed = node.args[0], node.args[1], False
    elif node.target == aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        x, weight, transposed = node.args[1], node.args[2], True
    else:
        return None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight")):
        return None
    return x, weight, transposed


def _matches(path: str, targets: tuple[str, ...]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def projection_paths(gm: fx.GraphModule) -> list[str]:
    """Module paths of every projection in graph order (what `targets` can name)."""
    out = []
    for node in gm.graph.nodes:
        found = projection(node)
        if found is not None:
            out.append(str(found[1].target)[: -len(".weight")])
    return out


def lora_matches(gm: fx.GraphModule, targets: tuple[str, ...], each: bool = False) -> list[tuple[fx.Node, tuple]]:
    """The projections `targets` adapt, as (node, (input, weight, transposed)) in graph order; ValueError naming the
    graph's projections when there are none, or (`each`: targets a user named, where a misspelt one would adapt
    nothing silently) when one of them matches none (checked before training: stage 2 adds the adapters)."""
    found = [(node, hit, str(hit[1].target)[: -len(".weight")]) for node in list(gm.graph.nodes)
             if (hit := projection(node)) is not None]
    matched = [(node, hit) for node, hit, path in found if _matches(path, targets)]
    paths = [path for _, _, path in found]
    unmatched = [t for t in targets if not any(_matches(p, (t,)) for p in paths)] if each else []
    if not matched or unmatched:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise ValueError(f"no projection matches LoRA target{'s' if len(unmatched) != 1 else ''} "
                         f"{unmatched or list(targets)}; the graph's projections are named {names}")
    return matched


def apply_lora(gm: fx.GraphModule, targets: tuple[str, ...] = DEFAULT_TARGETS, rank: int = 8,
               alpha: float = 16.0, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """Add an adapter to every targeted projection, in place; returns {parameter name: parameter}.

    A of the i-th adapter (graph order) is drawn from `seed` + i, so the same graph and seed give the same
    adapters. Raises if the graph already has adapters or no projection matches `targets`.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if hasattr(gm, LORA_MODULE):
        raise ValueError("this graph already has LoRA adapters; merge_lora first")
    matched = lora_matches(gm, targets)
    gm.add_submodule(LORA_MODULE, torch.nn.Module())
    root = getattr(gm, LORA_MODULE)
    scale = alpha / rank
    created: dict[str, torch.nn.Parameter] = {}
    for i, (node, (x, weight, transposed)) in enumerate(matched):
        w = gm.get_parameter(str(weight.target))
        fan_out, fan_in = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        generator = torch.Generator().manual_seed(seed + i)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
        a = (torch.rand(rank, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        holder_name = str(weight.target)[: -len(".weight")].replace(".", "_")
        holder = torch.nn.Module()
        holder.register_parameter("A", torch.nn.Parameter(a.to(device=w.device, dtype=w.dtype)))
        holder.register_parameter("B", torch.nn.Parameter(torch.zeros(fan_out, rank, device=w.device,
                                                                      dtype=w.dtype)))
        root.add_module(holder_name, holder)
        prefix = f"{LORA_MODULE}.{holder_name}"
        created.update({f"{prefix}.A": holder.A, f"{prefix}.B": holder.B})
        graph = gm.graph
        with graph.inserting_before(node.next):
            a_node, b_node = graph.get_attr(f"{prefix}.A"), graph.get_attr(f"{prefix}.B")
            down = graph.call_function(aten.linear.default, (x, a_node))
            up = graph.call_function(aten.linear.default, (down, b_node))
            scaled = graph.call_function(aten.mul.Tensor, (up, scale))
            out = graph.call_function(aten.add.Tensor, (node, scaled))
        out.meta[_META] = holder_name
        out.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    gm.recompile()
    return created


def lora_parameters(gm: fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the adapters in `gm` (empty without LoRA)."""
    if not hasattr(gm, LORA_MODULE):
        return {}
    return {f"{LORA_MODULE}.{n}": p for n, p in getattr(gm, LORA_MODULE).named_parameters()}


@torch.no_grad()
def merge_lora(gm: fx.GraphModule) -> int:
    """Fold every adapter into its base weight, remove the adapter nodes and parameters; returns the count.

    Afterwards the graph computes the same function (up to rounding) with the original structure. Merged
    weights are new tensors: a model the graph shares weights with (the captured original) is left unchanged.
    """
    merged = 0
    for out in [n for n in gm.graph.nodes if _META in n.meta]:
        base, scaled = out.args
        up = scaled.args[0]
        down, b_node = up.args
        a_node = down.args[1]
        _, weight, transposed = projection(base)
        owner_name, _, attr = str(weight.target).rpartition(".")
        owner = gm.get_submodule(owner_name)
        w = getattr(owner, attr)
        delta = scaled.args[1] * (gm.get_parameter(str(b_node.target)).float()
                                  @ gm.get_parameter(str(a_node.target)).float())
        merged_weight = w.detach() + (delta.T if transposed else delta).to(w.dtype)
        setattr(owner, attr, torch.nn.Parameter(merged_weight, requires_grad=w.requires_grad))
        out.replace_all_uses_with(base)
        for node in (out, scaled, up, down, b_node, a_node):
            gm.graph.erase_node(node)
        merged += 1
    if hasattr(gm, LORA_MODULE):
        delattr(gm, LORA_MODULE)
    gm.recompile()
    return merged
