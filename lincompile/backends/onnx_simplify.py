"""Exact peephole rewrites of an exported graph that onnxruntime leaves in place (`simplify`).

Each spliced site's step and general forms sit in the branches of an `If`, and onnxruntime neither shares
constants nor merges repeated nodes there: every copy of `x % 64` reads its own constant 64. torch.onnx also
writes `x[:, None, None]` as a chain of Unsqueeze nodes and `x[:, :, 0]` with a Slice over the whole of axis 0.
At a decode step each node costs microseconds whatever its size. The rewrites, in every graph and branch:

- constants: a small constant (initializer or Constant node) equal to one the graph can already read (its own
  or an enclosing graph's, defined earlier) is replaced by it;
- repeated nodes: a deterministic node of the default domain with the same op, inputs and attributes as an
  earlier node of its graph is replaced by that node's outputs;
- a Slice with starts 0, steps 1 and ends at INT64 max (what torch.onnx writes for `:`): its input, used directly;
- Unsqueeze(Unsqueeze(x, a), b), the inner one used once: one Unsqueeze with the merged axes (constant,
  non-negative axes);
- Reshape(Reshape(x, s), t), the inner one used once, t a constant without 0 (0 copies an input dim): Reshape(x, t).

Invariant: every value a node or a graph output reads is the same tensor as before (same shape, dtype and
numbers); graph inputs and outputs (of the model or a branch) keep their names and producers. A name that is
defined more than once in the model (a branch or loop body reusing a name, which ONNX scoping allows) is never
renamed nor read in place of another, since renames are by name; nor is an initializer that a graph input can
override.
tests/backends/test_onnx_simplify.py runs each rewrite against onnxruntime.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, NamedTuple

import numpy as np

from lincompile.backends.onnx_chunks import subgraphs

LONGEST = np.iinfo(np.int64).max  # a Slice end this large is past the end of any axis (torch.onnx writes it)
SHARED_ELEMENTS = 64  # constants up to this size are shared
_SAME_VALUES = ("Reshape", "Squeeze", "Unsqueeze", "Identity")  # ops that keep a tensor's values in order
_INTEGER = {6: np.int32, 7: np.int64}  # TensorProto.INT32, INT64
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
           "Dropout"}


def simplify(model: Any) -> dict[str, int]:
    """Rewrite `model` (a ModelProto) in place; returns how many of each rewrite it made."""
    graphs = list(_graphs(model.graph))
    uses = Counter(name for graph in graphs for node in graph.node for name in node.input)
    uses.update(o.name for graph in graphs for o in graph.output)
    defined = Counter(name for graph in graphs for name in (*(v.name for v in graph.input),
                                                            *(t.name for t in graph.initializer),
                                                            *(t.values.name for t in graph.sparse_initializer),
                                                            *(o for node in graph.node for o in node.output)))
    twice = {name for name, count in defined.items() if count > 1} | {""}
    fixed = twice | {v.name for graph in graphs for v in (*graph.input, *graph.output)}
    counts = dict.fromkeys(("shared_constant", "repeated_node", "noop_slice", "unsqueeze_chain", "reshape_chain"), 0)
    # consumers come after producers (in enclosing graphs too), so each node's inputs are renamed when it is visited
    _Walk(model.graph, {}, {}, uses, _Names(fixed, twice, set(defined) | set(uses)), {}, counts).run()
    return counts


def _graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph in it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _graphs(sub)


def _resolve(renamed: dict[str, str], name: str) -> str:
    while name in renamed:
        name = renamed[name]
    return name


def _constant_value(node: Any) -> np.ndarray | None:
    """The tensor a Constant node holds, when it is small enough to share (a tensor is read only then)."""
    from onnx import numpy_helper

    if len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    value = {"value_int": lambda: np.array(attribute.i, dtype=np.int64),
             "value_ints": lambda: np.array(attribute.ints, dtype=np.int64),
             "value_float": lambda: np.array(attribute.f, dtype=np.float32),
             "value_floats": lambda: np.array(attribute.floats, dtype=np.float32),
             "value": lambda: numpy_helper.to_array(attribute.t) if _few(attribute.t) else None}.get(attribute.name)
    return None if value is None else _small(value())


def _small(array: np.ndarray | None) -> np.ndarray | None:
    return array if array is not None and array.size <= SHARED_ELEMENTS and array.dtype != object else None


def _key(array: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    return array.dtype.name, array.shape, array.tobytes()  # the name tells int4 from float8 (both "<V1")


class _Names(NamedTuple):
    """`fixed`: names never renamed (graph inputs and outputs, and `twice`); `twice`: names defined more than once
    in the model (a branch or loop body may reuse a name), which never stand in for another name nor carry a
    known value; `taken`: every name in use, which a new name must avoid."""

    fixed: set[str]
    twice: set[str]
    taken: set[str]


class _Walk:
    """One graph's rewrite, in node order; `constants` (integer values, flattened, for the rules' checks) and
    `shared` (value key -> name) hold what the graph can read so far, the enclosing graphs' included."""

    def __init__(self, graph: Any, constants: dict[str, np.ndarray], shared: dict[Any, str], uses: Counter[str],
                 names: _Names, renamed: dict[str, str], counts: dict[str, int]) -> None:
        self.graph, self.constants, self.shared = graph, dict(constants), dict(shared)
        self.uses, self.names, self.renamed, self.counts = uses, names, renamed, counts
        self.producer: dict[str, int] = {}  # name -> index of its node (node wrappers' ids are not stable)
        self.seen: dict[Any, int] = {}  # a node's op, inputs and attributes -> index of the latest such node
        self.dropped: set[int] = set()

    def run(self) -> None:
        from onnx import numpy_helper

        kept = []
        for tensor in self.graph.initializer:
            array = _small(numpy_helper.to_array(tensor)) if _few(tensor) else None
            if array is not None and not self._share(tensor.name, array):
                continue
            kept.append(tensor)
        if len(kept) < len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept)
        for index, node in enumerate(self.graph.node):
            self._visit(index, node)
        nodes = [node for index, node in enumerate(self.graph.node) if index not in self.dropped]
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def _share(self, name: str, array: np.ndarray) -> bool:
        """Record a constant's value; False when an equal one is readable already (`name` then reads it)."""
        if name in self.names.fixed:  # a graph input may override it, a name defined twice is not one value, an
            return True  # output keeps its name
        key = _key(array)
        if key in self.shared:
            self._rename(name, self.shared[key])
            self.counts["shared_constant"] += 1
            return False
        self.shared[key] = name
        if array.dtype in (np.int32, np.int64) and array.ndim <= 1:
            self.constants[name] = array.reshape(-1)
        return True

    def _rename(self, old: str, new: str) -> None:
        self.renamed[old] = new
        self.uses[new] += self.uses[old]

    def _drop(self, index: int) -> None:
        self.dropped.add(index)
        for name in self.graph.node[index].input:
            self.uses[name] -= 1

    def _const(self, name: str) -> np.ndarray | None:
        return self.constants.get(_resolve(self.renamed, name)) if name else None

    def _single_use(self, index: int) -> bool:
        name = self.graph.node[index].output[0]
        return self.uses[name] == 1 and name not in self.names.fixed

    def _visit(self, index: int, node: Any) -> None:
        for i, name in enumerate(node.input):
            node.input[i] = _resolve(self.renamed, name)
        if node.op_type == "Constant" and node.output[0] not in self.names.fixed:
            value = _constant_value(node)
            if value is not None and not self._share(node.output[0], value):
                self._drop(index)
                return
        if (node.op_type == "Slice" and node.output[0] not in self.names.fixed
                and node.input[0] not in self.names.twice and _noop_slice(node, self._const)):
            self._rename(node.output[0], node.input[0])
            self._drop(index)
            self.counts["noop_slice"] += 1
            return
        self._merge_chain(node)
        held = list(subgraphs(node))
        if not held and node.domain in ("", "ai.onnx") and node.op_type not in _RANDOM:
            key = (node.op_type, tuple(node.input), len(node.output),
                   tuple(sorted(a.SerializeToString() for a in node.attribute)))
            earlier = self.seen.get(key)
            if earlier is not None and earlier not in self.dropped and self._same_outputs(node, earlier):
                for old, new in zip(node.output, self.graph.node[earlier].output):
                    if old:
                        self._rename(old, new)
                self._drop(index)
                self.counts["repeated_node"] += 1
                return
            if not self.names.twice.intersection(filter(None, node.output)):
                self.seen[key] = index
        for sub in held:
            _Walk(sub, self.constants, self.shared, self.uses, self.names, self.renamed, self.counts).run()
        value = self._const(node.input[0]) if node.input and node.output[0] not in self.names.twice else None
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if value is not None and node.op_type in _SAME_VALUES:
            self.constants[node.output[0]] = value
        elif value is not None and node.op_type == "Cast" and to in _INTEGER:
            self.constants[node.output[0]] = value.astype(_INTEGER[to])
        for name in node.output:
            self.producer[name] = index

    def _new_name(self, base: str) -> str:
        """`base`, or `base` with a suffix, not used anywhere in the model; recorded as used."""
        name, suffix = base, 0
        while name in self.names.taken:
            suffix += 1
            name = f"{base}_{suffix}"
        self.names.taken.add(name)
        return name

    def _same_outputs(self, node: Any, earlier: int) -> bool:
        """Whether `node`'s outputs can read the earlier node's: none fixed, and each present where the earlier
        node's is (an optional output left out has no value to stand in for)."""
        outputs = self.graph.node[earlier].output
        return (not self.names.fixed.intersection(filter(None, node.output))
                and all(bool(new) or not old for old, new in zip(node.output, outputs)))

    def _merge_chain(self, node: Any) -> None:
        """Fold the node's producer into it: Unsqueeze(Unsqueeze) and Reshape(Reshape), the inner used once."""
        from onnx import numpy_helper

        inner_index = self.producer.get(node.input[0]) if node.input else None
        if inner_index is None or not self._single_use(inner_index):
            return
        inner = self.graph.node[inner_index]
        if node.op_type == inner.op_type == "Unsqueeze" and len(node.input) > 1 and len(inner.input) > 1:
            axes = _merged_axes(self._const(inner.input[1]), self._const(node.input[1]))
            if axes is None:
                return
            name = self._new_name(f"{node.output[0]}/axes")
            self.graph.initializer.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), name))
            self.constants[name] = np.array(axes, dtype=np.int64)
            self.uses[name] += 1
            self.uses[node.input[1]] -= 1
            node.input[1] = name
            self.counts["unsqueeze_chain"] += 1
        elif node.op_type == inner.op_type == "Reshape" and _keeps_no_dim(node, self._const(node.input[1])):
            self.counts["reshape_chain"] += 1
        else:
            return
        self.uses[inner.input[0]] += 1
        node.input[0] = inner.input[0]
        self._drop(inner_index)


def _few(tensor: Any) -> bool:
    """Whether a TensorProto is small enough to share (and stored in the proto, not in external data)."""
    return int(np.prod(tensor.dims, dtype=np.int64)) <= SHARED_ELEMENTS and tensor.data_location == 0


def _noop_slice(node: Any, const: Any) -> bool:
    """Whether a Slice (inputs data, starts, ends[, axes[, steps]]) copies its input whole."""
    if len(node.input) < 3:  # opset < 10 keeps the bounds in attributes
        return False
    starts, ends = const(node.input[1]), const(node.input[2])
    steps = const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1, dtype=np.int64)
    if starts is None or ends is None or steps is None:
        return False
    return bool((starts == 0).all() and (ends >= LONGEST).all() and (steps == 1).all())


def _merged_axes(first: np.ndarray | None, second: np.ndarray | None) -> list[int] | None:
    """The axes of one Unsqueeze doing Unsqueeze(first) then Unsqueeze(second); None unless both are known and
    non-negative (a negative axis counts from a rank this does not know)."""
    if first is None or second is None or not first.size or not second.size or (first < 0).any() or (second < 0).any():
        return None
    later = sorted(int(a) for a in second)
    kept = [p for p in range(len(later) + int(first.max()) + 1) if p not in later]  # where the first's dims land
    return sorted(later + [kept[int(a)] for a in first])


def _keeps_no_dim(node: Any, shape: np.ndarray | None) -> bool:
    """Whether a Reshape's target `shape` is a constant whose 0s (if any) are literal (allowzero=1): its result
    then does not depend on which tensor of that size it reshapes."""
    if shape is None:
        return False
    allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
    return bool(allowzero or not (shape == 0).any())
