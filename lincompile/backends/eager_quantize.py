"""8-bit linear layers for the PyTorch runtime (`LinearizedModel.quantize("int8")`), on the CPU.

Every projection of the graph (a linear or addmm with a weight attribute: attention projections, MLP, LM head)
becomes `lincompile.kernels.int8.linear.int8_linear`: int8 weights with a scale per output row, activations
quantized to int8 per token at each call, integer products (`torch._int_mm`). Projections that read the same
input (q/k/v, gate/up) become one product over their stacked weights, then a split: the same numbers, since
every output column is computed on its own from the shared quantized input. What stays float: the attention sites
(their parameters, the recurrent state, every product of activations), the norms, the embedding table, and the
projections `skip` names. The float weights of rewritten projections are dropped (the embedding table an LM head
is tied to stays, for the embedding).

Each token's quantization reads that token alone and integer sums are exact, so the linear layers give a token
the same output in a one-token step as in a multi-token call. `python bench/torch_quantize.py` measures
perplexity and speed against the float model.

With calibration (`activation_ranges`: the largest |x| per input channel of every projection's input over some
text) the inputs are smoothed first (SmoothQuant): per input channel s = max|x|^a / max|w|^(1-a) (a =
`SMOOTHING`), the weights' columns multiplied by s before they are quantized and the input divided by s (one
product per stacked projection) before its tokens are: x/s . (w s) = x . w, with the activations' outlier
channels moved into the weights, whose scales are per row. Where the input is made by a product the division can
join (`_fold`: a norm's weight, a LayerNorm's weight and bias, or a projection's output rows, such as Llama's
up_proj before down_proj), those tensors are divided instead and the call has no extra product; elsewhere (the
attention output before o_proj, GPT-2's GELU) the graph multiplies the input by 1/s.
"""
from __future__ import annotations

import copy
import fnmatch
import operator
import re
from typing import Any

import torch
from torch import fx

from lincompile.kernels.int8.linear import int8_linear
from lincompile.kernels.int8.reference import quantize_weight
from lincompile.diagnostics import warn
from lincompile.passes.linearize import PARAMS_MODULE
from lincompile.train.lora import LORA_MODULE, projection, projection_paths

#: The schemes `quantize` takes.
SCHEMES = ("int8",)
#: Where the stacked int8 weights, their scales and biases live in the quantized graph module.
INT8_PREFIX = "int8_linear_"
#: SmoothQuant's migration strength a (0: activations as they are; 1: all of their range moved into the weights).
#: On SmolLM2 0.7 cost the least perplexity of 0.5, 0.7 and 0.85 (a one-off comparison on the held-out blocks,
#: within its noise of about 0.3%).
SMOOTHING = 0.7
#: A channel whose activations stay at or below this in calibration is left unsmoothed (s = 1: text that does
#: activate it is not scaled up); weight ranges are floored at it; factors stay within
#: [1 / SMOOTHING_BOUND, SMOOTHING_BOUND], so 1/s fits in fp16.
RANGE_FLOOR = 1e-5
SMOOTHING_BOUND = 1e4

aten = torch.ops.aten


def _path(weight: fx.Node) -> str:
    return str(weight.target).removesuffix(".weight")


def _tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return operator.attrgetter(str(node.target))(gm)


def _bias(node: fx.Node) -> fx.Node | None:
    """The bias attribute of a projection node (None: no bias); raises on a bias computed in the graph."""
    bias = node.args[0] if node.target == aten.addmm.default else (node.args[2] if len(node.args) > 2 else None)
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        raise ValueError(f"{node.name}: a projection whose bias is computed in the graph cannot be quantized")
    return bias


def _projections(gm: fx.GraphModule, skip: tuple[str, ...]) -> dict[fx.Node, list[fx.Node]]:
    """{input node: the projection nodes reading it, in graph order} for every float projection not skipped and
    with at least 2 inputs (`int8_linear`'s minimum)."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    used = set()
    for node in gm.graph.nodes:
        found = projection(node)
        if found is None or node.kwargs or not _tensor(gm, found[1]).is_floating_point():
            continue
        x, weight, transposed = found
        matched = [p for p in skip if fnmatch.fnmatchcase(_path(weight), p)]
        used.update(matched)
        if not matched and _tensor(gm, weight).shape[0 if transposed else 1] >= 2:  # one input: kept float
            groups.setdefault(x, []).append(node)
    unused = [p for p in skip if p not in used]
    if unused:
        names = projection_paths(gm)
        raise ValueError(f"skip pattern(s) {unused} match no linear layer; the layers are named like "
                         f"{names[:2] + names[-1:]} (fnmatch patterns, e.g. 'lm_head' or '*.down_proj')")
    return groups


class _Observer(torch.nn.Module):
    """Records the largest |x| per input channel (last dim) of what flows through it into `ranges[key]`."""

    def __init__(self, ranges: dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.ranges, self.key = ranges, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        old = self.ranges.get(self.key)
        self.ranges[self.key] = seen if old is None else torch.maximum(old, seen)
        return x


def activation_ranges(model: Any, blocks: torch.Tensor, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """{projection input node name: the largest |x| per input channel} of `model` (a float `LinearizedModel`) over
    token blocks [N, T], one forward each without a mask (every token counts, padding ids too), for
    `quantize_graph`'s smoothing. `model` is left unchanged (the observers sit in a copy of its graph)."""
    gm = model.graph
    graph = copy.deepcopy(gm.graph)
    copied = dict(zip(gm.graph.nodes, graph.nodes))
    observer = fx.GraphModule(gm, graph)
    ranges: dict[str, torch.Tensor] = {}
    for index, (x, nodes) in enumerate(_projections(gm, skip).items()):
        name = f"lc_observe_{index}"
        observer.add_submodule(name, _Observer(ranges, x.name))
        with graph.inserting_after(copied[x]):
            observed = graph.call_module(name, (copied[x],))
        for node in nodes:
            copied[node].replace_input_with(copied[x], observed)
    observer.recompile()
    derived = model.with_graph(observer)
    with torch.no_grad():
        for block in blocks:
            derived(block[None].to(model.device))
    return ranges


def _smoothing(ranges: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """s [K] = max|x|^a / max|w|^(1-a) per input channel, over the stacked weights [N, K] of one input (1 for a
    channel inactive in calibration), within [1 / SMOOTHING_BOUND, SMOOTHING_BOUND]. A large activation over a
    near-zero weight column gets a large s: the channel, which adds nothing, no longer sets the token's scale."""
    columns = torch.cat([w.float().abs() for w in weights]).amax(0)
    ranges = ranges.to(columns.device)
    s = ranges.clamp_min(RANGE_FLOOR) ** SMOOTHING / columns.clamp_min(RANGE_FLOOR) ** (1 - SMOOTHING)
    s = torch.where(ranges > RANGE_FLOOR, s, 1.0)
    return s.clamp(1 / SMOOTHING_BOUND, SMOOTHING_BOUND)


#: Ops through which a product per input channel (the last dim) passes unchanged when the last dim is kept.
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _attr_of(gm: fx.GraphModule, node: Any, size: int) -> fx.Node | None:
    """`node` when it is the graph's only read of a [size] tensor attribute, and this read has one user."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1):
        return None
    if sum(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes) != 1:
        return None
    return node if tuple(_tensor(gm, node).shape) == (size,) else None


def _outputs(gm: fx.GraphModule, node: fx.Node) -> int:
    """How many outputs projection `node` has (addmm stores its weight as [K, N])."""
    _, weight, transposed = projection(node)
    return _tensor(gm, weight).shape[1 if transposed else 0]


def _fold(gm: fx.GraphModule, x: fx.Node, size: int, own: list[fx.Node], quantized: set[fx.Node]
          ) -> tuple[list[fx.Node], fx.Node | None] | None:
    """Where input `x` of the projections `own` (with `size` input channels) can take a product per channel
    exactly: (tensor attributes to multiply, none), or ([], a quantized projection whose output rows to multiply);
    None: nowhere (the graph multiplies `x`). Walks up through reshapes that keep the last dim; every node on the
    way, `x` included, must feed only this path (and `x` only `own`), so nothing else sees the product."""
    node, readers = x, set(own)
    while True:
        if set(node.users) != readers:
            return None
        if node.op != "call_function":
            return None
        if node.target in _RESHAPES and isinstance(node.args[0], fx.Node) \
                and node.args[0].meta.get("val") is not None and node.args[0].meta["val"].shape[-1] == size:
            node, readers = node.args[0], {node}
            continue
        break
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        for a, b in (node.args, node.args[::-1]):
            attr = _attr_of(gm, a, size)
            if attr is not None and isinstance(b, fx.Node):
                return [attr], None
            if isinstance(b, fx.Node) and b in quantized and set(b.users) == {node} and _outputs(gm, b) == size:
                return [], b
    if node.target == aten.layer_norm.default and len(node.args) >= 4:
        attrs = [_attr_of(gm, a, size) for a in node.args[2:4]]
        if all(attrs):
            return attrs, None
    return None


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; one of {list(SCHEMES)}")


def quantize_graph(gm: fx.GraphModule, scheme: str = "int8", skip: tuple[str, ...] = (),
                   ranges: dict[str, torch.Tensor] | None = None) -> tuple[fx.GraphModule, int]:
    """(a new graph module with 8-bit projections, how many projections it quantized); `gm` is left unchanged and
    the new module shares its other tensors. `skip`: fnmatch patterns of projection paths kept float. `ranges`
    (`activation_ranges` of the model): smooth each projection input found there."""
    check_scheme(scheme)
    graph = copy.deepcopy(gm.graph)
    copied = dict(zip(gm.graph.nodes, graph.nodes))
    groups = _projections(gm, tuple(skip))
    new_attrs: dict[str, torch.Tensor] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # a rewritten projection's node -> what stands for its output now
    weights: dict[fx.Node, torch.Tensor] = {}  # [N, K] per projection; addmm stores its weight as [K, N]
    for node in (n for nodes in groups.values() for n in nodes):
        _, weight, transposed = projection(node)
        weights[node] = _tensor(gm, weight).detach().t() if transposed else _tensor(gm, weight).detach()
    rows: dict[fx.Node, torch.Tensor] = {}  # a projection's output rows times these (folded smoothing)
    inverses: dict[fx.Node, torch.Tensor] = {}  # a group's input times these (smoothing not folded)
    for x, nodes in groups.items():  # 1/s in the input's dtype (the weights'); the weights take exactly its inverse
        if ranges is None or x.name not in ranges:
            continue
        inverse = (1 / _smoothing(ranges[x.name], [weights[n] for n in nodes])).to(weights[nodes[0]].dtype)
        fold = _fold(gm, x, inverse.shape[0], nodes, set(weights))
        if fold is None:
            inverses[x] = inverse
        elif fold[1] is not None:
            rows[fold[1]] = inverse.float()
        for attr in fold[0] if fold else ():
            tensor = _tensor(gm, attr).detach()
            new_attrs[str(attr.target)] = (tensor.float() * inverse.float()).to(tensor.dtype)
        for node in nodes:
            weights[node] = weights[node].float() / inverse.float()
    count = 0
    for index, (x, nodes) in enumerate(groups.items()):
        name = f"{INT8_PREFIX}{index}"
        pairs = [quantize_weight(weights[n] * rows[n][:, None] if n in rows else weights[n]) for n in nodes]
        sizes = [q.shape[0] for q, _ in pairs]  # (int8 weight [N, K], scale [N]) per projection
        biases = [_bias(n) for n in nodes]
        new_attrs[f"{name}_weight"] = torch.cat([q for q, _ in pairs])
        new_attrs[f"{name}_scale"] = torch.cat([s for _, s in pairs])
        if any(b is not None for b in biases):
            new_attrs[f"{name}_bias"] = torch.cat([
                (_tensor(gm, b).detach().float() * rows.get(n, 1.0)) if b is not None
                else torch.zeros(size, device=pairs[0][1].device) for n, b, size in zip(nodes, biases, sizes)])
        if x in inverses:
            new_attrs[f"{name}_smooth"] = inverses[x]
        first = copied[nodes[0]]
        with graph.inserting_before(first):
            args = [graph.get_attr(f"{name}_{part}") for part in ("weight", "scale")]
            bias = graph.get_attr(f"{name}_bias") if f"{name}_bias" in new_attrs else None
            source = replaced.get(copied[x], copied[x])
            if x in inverses:
                source = graph.call_function(torch.mul, (source, graph.get_attr(f"{name}_smooth")))
            fused = graph.call_function(int8_linear, (source, *args, bias))
            outs = [fused]
            if len(nodes) > 1:
                split = graph.call_function(torch.split, (fused, sizes, -1))
                outs = [graph.call_function(operator.getitem, (split, i)) for i in range(len(nodes))]
        for node, out in zip(nodes, outs):
            old = copied[node]
            out.meta = dict(old.meta)
            old.replace_all_uses_with(out)
            replaced[old] = out
            attrs = [a for a in old.all_input_nodes if a.op == "get_attr"]
            graph.erase_node(old)
            for attr in attrs:  # the float weight and bias, unless something else reads them (a tied embedding)
                if not attr.users:
                    graph.erase_node(attr)
        count += len(nodes)
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            target = str(node.target)
            root[target] = new_attrs[target] if target in new_attrs else _tensor(gm, node)
        elif node.op == "call_module":
            root[str(node.target)] = gm.get_submodule(str(node.target))
    quantized = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    left = _float_matrices_left(gm, graph)
    if left:
        warn(f"quantize: {len(left)} weights stay float: matrix products read them, but no linear layer quantize "
             f"can rewrite (such as the stacked experts of a mixture-of-experts layer): {left[:3]}"
             + (f" and {len(left) - 3} more" if len(left) > 3 else ""))
    return quantized, count


#: Ops that only reshape, select or cast what they read: a weight passes through them to its product.
_RESHAPING = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default, aten.view.default,
              aten.reshape.default, aten._unsafe_view.default, aten.select.int, aten.index.Tensor, aten.slice.Tensor,
              aten.unsqueeze.default, aten.expand.default, aten.contiguous.default, aten._to_copy.default,
              aten.to.dtype}


#: Words of an op's name (`aten.addmm.default`, `transformers.grouped_mm_fallback`) that make it a matrix product.
_PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "einsum", "linear"}


def _multiplied(node: fx.Node, depth: int = 4) -> bool:
    """Whether a matrix product (an op whose name has a word of `_PRODUCTS`) reads `node`, directly or through
    at most `depth` reshaping ops."""
    for user in node.users:
        if user.op == "call_function" and _PRODUCTS & set(re.split(r"[^a-z]+", str(user.target).lower())):
            return True
        if depth and user.target in _RESHAPING and _multiplied(user, depth - 1):
            return True
    return False


def _float_matrices_left(gm: fx.GraphModule, graph: fx.Graph) -> list[str]:
    """The floating parameters of >= 2 dims that a matrix product in `graph` still reads other than as a
    projection's weight (skipped or one-input ones): not an embedding table, an attention site's or an adapter's
    own parameter, or one read by no product (a conv kernel, a bias added to queries)."""
    left = []
    for node in graph.nodes:
        target = str(node.target)
        if node.op != "get_attr" or target.startswith((PARAMS_MODULE, LORA_MODULE)):
            continue
        try:
            tensor = gm.get_parameter(target)
        except AttributeError:  # a buffer (a rotary table, a mask)
            continue
        if tensor.dim() < 2 or not tensor.is_floating_point():
            continue
        if all(user.target == aten.embedding.default or (projection(user) or (None, None))[1] is node
               for user in node.users) or not _multiplied(node):
            continue
        left.append(target)
    return left
