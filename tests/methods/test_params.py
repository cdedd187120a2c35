"""Parameter contract: names, order, shapes, initial values, trainability, seeds."""
import torch

from lincompile.methods.params import init_params, named_params, param_layout, param_names, random_params
from lincompile.methods.spec import MethodSpec, get_method, methods


def test_layout_order_and_shapes():
    assert param_names(get_method("linear-elu")) == ()
    assert param_layout(get_method("augmented"), 4, 2, 8, 6) == [("alpha", (), True), ("conv_weight", (4, 63), True)]
    assert param_layout(get_method("augmented-performer"), 4, 2, 8, 6) == [
        ("performer_features", (2, 64, 8), False), ("conv_weight", (4, 63), True)]
    assert param_layout(get_method("hedgehog"), 4, 2, 8, 6) == [
        ("hedgehog_weight", (2, 8, 8), True), ("hedgehog_bias", (2, 8), True)]
    assert param_layout(get_method("linformer"), 4, 2, 8, 6) == [
        ("linformer_keys", (256, 4096), True), ("linformer_values", (256, 4096), True)]
    assert param_layout(get_method("retnet"), 4, 2, 8, 6) == [("decay", (2,), True)]
    spec = MethodSpec("all", feature_map="hedgehog", decay=True, conv="causal", conv_kernel=5)
    assert param_names(spec) == ("hedgehog_weight", "hedgehog_bias", "decay", "conv_weight")


def test_initial_values():
    for name in methods():
        spec = get_method(name)
        if spec.kind == "projected":
            continue
        for (pname, value, trainable), (lname, shape, ltrain) in zip(init_params(spec, 4, 2, 8, 6),
                                                                   param_layout(spec, 4, 2, 8, 6)):
            assert (pname, tuple(value.shape), trainable) == (lname, shape, ltrain)
            assert value.dtype == torch.float32
            if pname in ("alpha", "conv_weight", "hedgehog_bias"):
                assert not value.any()
            if pname == "hedgehog_weight":
                assert torch.equal(value, torch.eye(8).expand(2, 8, 8))
    gammas = torch.sigmoid(init_params(get_method("retnet"), 4, 4, 8, 8)[0][1].double())
    assert torch.allclose(gammas, 1 - 2.0 ** -(5 + torch.arange(4.0, dtype=torch.float64)), rtol=1e-6)


def test_random_features_are_fixed_by_the_seed():
    spec = get_method("performer")
    first = init_params(spec, 4, 2, 8, 6, seed=3)[0][1]
    assert torch.equal(first, init_params(spec, 4, 2, 8, 6, seed=3)[0][1])
    assert not torch.equal(first, init_params(spec, 4, 2, 8, 6, seed=4)[0][1])
    block = first[0, :8].double()
    norms = block.norm(dim=-1, keepdim=True)
    assert torch.allclose((block / norms) @ (block / norms).T, torch.eye(8, dtype=torch.float64), atol=1e-5)


def test_random_params_are_nonzero_and_named_params_checks_the_count():
    spec = get_method("augmented")
    alpha, taps = random_params(spec, 4, 2, 8, 6)
    assert alpha.item() == 1.0 and taps.abs().min() > 0
    named = named_params(spec, [alpha, taps], torch.float64)
    assert list(named) == ["alpha", "conv_weight"] and named["alpha"].dtype == torch.float64
    try:
        named_params(spec, [alpha], torch.float32)
    except ValueError as error:
        assert "alpha" in str(error) and "conv_weight" in str(error)
    else:
        raise AssertionError("a short params list must raise")
