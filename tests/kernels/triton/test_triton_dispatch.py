"""Which implementation serves a call, the `lincompile::attention` op through the Triton kernels (numbers,
gradients, torch.library.opcheck), the reference fallbacks, and the generated-module cache."""
import pytest
import torch

import lincompile.kernels.ops  # noqa: F401
from lincompile.kernels import registry
from lincompile.kernels.linear_attention import reference
from lincompile.kernels.triton import compile as gen
from lincompile.kernels.triton import launch
from lincompile.kernels.triton.codegen import FORMS, generate
from lincompile.kernels.triton.plan import Plan, unsupported_reason
from lincompile.methods.spec import get_method, methods

op = torch.ops.lincompile.attention
CPU = torch.device("cpu")


def test_registry_modes(monkeypatch):
    augmented = get_method("augmented")
    assert registry.select(augmented, CPU).name == "triton"
    for name in methods():
        spec = get_method(name)
        step = spec.kind == "linear" and spec.causal_safe
        expected = "triton" if unsupported_reason(spec) is None else "recurrent-step" if step else "reference"
        assert registry.select(spec, CPU).name == expected, name
    monkeypatch.setenv("LINCOMPILE_KERNELS", "reference")
    assert registry.select(augmented, CPU).name == "reference"
    monkeypatch.setenv("LINCOMPILE_KERNELS", "auto")
    assert registry.select(augmented, CPU).name == "recurrent-step"  # CPU without forcing: the reference forms
    monkeypatch.setenv("LINCOMPILE_KERNELS", "fast")
    with pytest.raises(ValueError, match="LINCOMPILE_KERNELS"):
        registry.select(augmented, CPU)
    monkeypatch.setenv("LINCOMPILE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        registry.select(augmented, CPU)


def test_an_interpreter_that_cannot_run_beside_numpy_is_named(monkeypatch):
    """Triton 3.6's interpreter with NumPy 2.4 fails inside a kernel (triton-lang/triton#9171): refused up front,
    naming both versions and the way out."""
    import numpy
    import triton

    assert gen.interpreter_problem("3.7.0", "2.4.6") is None
    assert gen.interpreter_problem("3.6.0", "2.3.5") is None
    assert gen.interpreter_problem("3.9.0+git1234", "2.4.0") is None
    assert gen.interpreter_problem("unknown", "2.4.0") is None
    assert "numpy<2.4" in gen.interpreter_problem("3.6.0", "2.4.0")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0's interpreter fails beside NumPy 2\.4\.1"):
        registry.select(get_method("augmented"), CPU)


def test_unsupported_reasons_are_named():
    reasons = {name: unsupported_reason(get_method(name)) for name in methods()}
    assert reasons["augmented"] is None and reasons["linear-elu"] is None
    assert "kind='softmax'" in reasons["softmax"] and reasons["retnet"] is None
    assert reasons["performer"] is None and reasons["castling"] is None and reasons["cosformer"] is None
    assert reasons["hedgehog"] is None and "taylor" in reasons["taylor"] and "yoso" in reasons["yoso"]
    assert "centered" in reasons["augmented-centered"]
    with pytest.raises(ValueError, match="cannot generate"):
        Plan(get_method("taylor"), 8, 8, "float32", 16)


def _op_case(kit, requires_grad=False):
    spec = kit.spec_of("augmented")
    c = kit.make(spec, 7, seed=21, pad=2)
    q, k, v = kit.cast([c.q, c.k, c.v])
    params = [p.requires_grad_(requires_grad) for p in kit.cast(c.params)]
    return spec, q, k, v, c.mask, params


def test_op_runs_the_generated_kernels(kit):
    spec, q, k, v, mask, params = _op_case(kit)
    out, state = op(q, k, v, mask, None, [], params, spec.to_json(), kit.SCALE, True)
    direct, direct_state = launch.attention(q, k, v, mask, None, [], params, spec, kit.SCALE, True)
    assert torch.equal(out, direct) and all(torch.equal(a, b) for a, b in zip(state, direct_state))
    ref, _ = reference.attention(*kit.cast([q, k, v], torch.float64), mask, None, [], kit.cast(params, torch.float64),
                                 spec, kit.SCALE, True)
    assert kit.rel(out, ref) <= 1e-5


def test_op_gradients_recompute_through_the_reference(kit, allow_fallback):
    """Forward by the kernels; backward recomputes through the reference (gradients within 1e-4)."""
    spec, q, k, v, mask, params = _op_case(kit, requires_grad=True)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = op(q, k, v, mask, None, [], params, spec.to_json(), kit.SCALE, True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, *params))
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v, *params)]
    ref, _ = reference.attention(*exact[:3], mask, None, [], exact[3:], spec, kit.SCALE, True)
    ref_grads = torch.autograd.grad(ref.square().sum(), exact)
    for g, r in zip(grads, ref_grads):
        assert kit.rel(g, r) <= 1e-4


def test_opcheck_with_the_triton_implementation(kit, allow_fallback):
    """One row, one KV head, 5 tokens (the interpreter runs every program in Python); backward: reference."""
    spec = kit.spec_of("augmented")
    c = kit.make(spec, 5, seed=22, heads=2, kv_heads=1)
    q, k, v = (t[:1] for t in kit.cast([c.q, c.k, c.v]))
    mask = c.mask[:1].clone()
    mask[0, 0] = False
    params = kit.cast(c.params)
    state = reference.init_state(spec, 1, 1, 8, kit.DV, "cpu", torch.float32)
    q.requires_grad_(True)
    torch.library.opcheck(op.default, (q, k, v, mask, None, state, params, spec.to_json(), kit.SCALE, True))


def test_interior_padding_is_served_by_the_reference(kit, allow_fallback):
    spec, q, k, v, mask, params = _op_case(kit)
    mask[0, 4] = False
    out, state = launch.attention(q, k, v, mask, None, [], params, spec, kit.SCALE, True)
    ref, ref_state = reference.attention(q, k, v, mask, None, [], params, spec, kit.SCALE, True)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(state, ref_state))


def test_generated_modules_are_cached_per_plan():
    plan = Plan(get_method("augmented"), 8, 6, "float32", 16)
    assert generate(plan) == generate(plan)
    assert gen.load(plan) is gen.load(Plan(get_method("augmented"), 8, 6, "float32", 16))
    assert gen.load(plan) is not gen.load(Plan(get_method("augmented"), 8, 6, "bfloat16", 16))
    module = gen.load(plan)
    assert all(hasattr(module, name) for name in ("chunked_fwd", "verify_fwd", "recurrent"))
    assert set(FORMS) <= {"chunked_fwd", "verify", "recurrent"}


def test_the_backward_dots_experiment_switch(monkeypatch):
    """LINCOMPILE_BWD_DOTS=fp32 (bench/gpu_session.sh's experiment) gives the backward the interpreter's products
    on a GPU too, as another cached module; another value is refused by name."""
    from lincompile.kernels.triton.codegen_bwd import generate_backward

    plan = Plan(get_method("augmented"), 32, 32, "bfloat16", 32)
    gpu, fp32 = generate_backward(plan), generate_backward(plan, fp32_dots=True)
    assert "tl.dot((" in gpu and ".to(tl.bfloat16).to(tl.float32)" not in gpu
    assert ".to(tl.bfloat16).to(tl.float32)" in fp32
    monkeypatch.setenv(gen.BWD_DOTS, "fp32")
    assert gen.fp32_backward_dots()
    monkeypatch.setenv(gen.BWD_DOTS, "bf16")
    assert not gen.fp32_backward_dots()
    monkeypatch.setenv(gen.BWD_DOTS, "tf32")
    with pytest.raises(ValueError, match="LINCOMPILE_BWD_DOTS='tf32': expected 'bf16'"):
        gen.load_backward(plan)


def test_a_decode_step_runs_no_host_kernels_but_the_position_add(kit, monkeypatch):
    """A one-token call without a key mask: besides the recurrent kernel, only the position counter's add (on a GPU
    every fill, compare or cast is a kernel launch, which a decode step of a small batch cannot afford). The kernel
    is stubbed and outputs are not poisoned here; allocations and views launch nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    launched = []
    kernel = type("Kernels", (), {"__getitem__": lambda self, grid: lambda *a, **k: launched.append(grid)})()
    monkeypatch.setattr(launch.gen, "load", lambda plan: type("Module", (), {"recurrent": kernel})())
    monkeypatch.setattr(launch, "POISON_OUTPUTS", False)
    spec = get_method("augmented")
    state, params = kit.prefilled_state(spec, 6, seed=11)
    c = kit.make(spec, 1, seed=12)
    state = [s.contiguous() for s in kit.cast(state)]  # as the kernels return it (the reference's may be strided)
    args = (*kit.cast([c.q, c.k, c.v]), None, None, state, kit.cast(params), spec, kit.SCALE, True)
    launch.attention(*args)  # the first call makes the per-device constants
    with Ops() as ops:
        launch.attention(*args)
    assert len(launched) == 2
    assert [n for n in ops.names if not n.startswith(("empty", "view"))] == ["add.Tensor"]


def test_forms_launch_on_their_tensors_gpu(monkeypatch):
    """Triton launches on the current device: the forms make it the tensors' (cuda:1 here, where the current
    device would be cuda:0); on the CPU they enter nothing."""
    import contextlib
    from types import SimpleNamespace

    entered = []

    @contextlib.contextmanager
    def device(where):
        entered.append(where)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    form = launch._on_device(lambda q, *rest: (entered.copy(), rest))
    gpu = SimpleNamespace(device=torch.device("cuda", 1))
    assert form(gpu, 2) == ([torch.device("cuda", 1)], (2,))
    entered.clear()
    assert form(torch.zeros(1), 3) == ([], (3,))
    assert launch.attention.__wrapped__ and launch.verify.__wrapped__ and launch.attention_backward.__wrapped__
