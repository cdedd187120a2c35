"""Einsum lowering: every plan equals np.einsum on random shapes, and lowered ONNX graphs run the same in
onnxruntime; equations outside the supported forms stay Einsum."""
import numpy as np
import pytest

from lincompile.backends.onnx_einsum import apply_numpy, lower_einsums, parse, plan_matmul

#: the reference op's equations (as exported from SmolLM2) plus other shapes of the same forms
EQUATIONS = ["bnj,bhnd->bhjd", "bhgtn,bhne->bhgte", "bhgtf,bhnf->bhgtn", "bhgtf,bhfe->bhgte",
             "bhn,bhnf,bhne->bhfe", "bhgf,bhf->bhg", "hgj,bhje->bhge", "ij,jk->ki", "j,jk->k", "ij,j->i",
             "bij,bjk->bik", "abc,cd->dba", "nf,bhne->bhfe", "ij,ij->i"]
NOT_MATMUL = ["ij,jk->i", "ii->i", "ij,jk", "i...,i...->i", "ab,bc,cd->ad", "ij,kl->ijkl"]


def _shapes(operands: list[str], rng: np.random.Generator) -> list[tuple[int, ...]]:
    size = {x: int(rng.integers(1, 5)) for x in "".join(operands)}
    return [tuple(size[x] for x in term) for term in operands]


def _numpy_lowered(equation: str, arrays: list[np.ndarray]) -> np.ndarray:
    operands, out = parse(equation)
    if len(operands) == 3:
        weight, term = operands[0], operands[1]
        folded = np.einsum(f"{weight},{term}->{term}", arrays[0], arrays[1])
        operands, arrays = operands[1:], [folded, arrays[2]]
    return apply_numpy(plan_matmul(*operands, out), *arrays)


@pytest.mark.parametrize("equation", EQUATIONS)
def test_plans_equal_einsum(equation):
    rng = np.random.default_rng(abs(hash(equation)) % 2**32)
    operands, _ = parse(equation)
    for _ in range(5):
        arrays = [rng.standard_normal(shape) for shape in _shapes(operands, rng)]
        np.testing.assert_allclose(_numpy_lowered(equation, arrays), np.einsum(equation, *arrays), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("equation", NOT_MATMUL)
def test_other_equations_are_not_planned(equation):
    parsed = parse(equation)
    assert parsed is None or len(parsed[0]) != 2 or plan_matmul(*parsed[0], parsed[1]) is None


def _model(equations: list[str], shapes: list[list[tuple[int, ...]]]):
    from onnx import TensorProto, helper

    inputs, nodes, outputs = [], [], []
    for i, (equation, operand_shapes) in enumerate(zip(equations, shapes)):
        names = [f"x{i}_{j}" for j in range(len(operand_shapes))]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, operand_shapes)]
        nodes.append(helper.make_node("Einsum", names, [f"y{i}"], name=f"einsum{i}", equation=equation))
        out_shape = np.einsum(equation, *[np.zeros(shape) for shape in operand_shapes]).shape
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, out_shape))
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_lowered_graph_runs_the_same_in_onnxruntime():
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    equations = EQUATIONS + ["ij,jk->i"]
    shapes = [_shapes(parse(e)[0], rng) for e in equations]
    feeds = {f"x{i}_{j}": rng.standard_normal(s).astype(np.float32)
             for i, operand_shapes in enumerate(shapes) for j, s in enumerate(operand_shapes)}
    model = _model(equations, shapes)

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    before = run(model)
    assert lower_einsums(model) == (len(EQUATIONS), 1)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Einsum") == 1
    for got, want in zip(run(model), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
