"""Training through the generated kernels end to end: a linearized tiny Llama's next-token loss and the gradient
of every parameter (base weights and each site's alpha and conv taps) under LINCOMPILE_KERNELS=triton (forward and
backward in the kernels, under the interpreter) match the reference implementation's."""
import dataclasses

import torch

import lincompile
from lincompile.kernels import ops
from lincompile.methods.spec import get_method
from lincompile.testing.tiny import tiny_model


def _loss_and_grads(linear, ids):
    linear.graph.zero_grad()
    logits = linear(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in linear.graph.named_parameters()}


def test_linearized_model_trains_through_the_kernels(monkeypatch, kit):
    spec = dataclasses.replace(get_method("augmented"), group_size=4, conv_kernel=5)
    linear = lincompile.optimize(tiny_model("llama", seed=0), spec)
    generator = torch.Generator().manual_seed(50)
    with torch.no_grad():
        for name, p in linear.graph.named_parameters():
            if name.startswith("lincompile_params."):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    ids = torch.randint(3, 128, (2, 13), generator=generator)
    calls = []
    fast = ops.attention_backward
    monkeypatch.setattr(ops, "attention_backward", lambda *a: calls.append(1) or fast(*a))
    loss, grads = _loss_and_grads(linear, ids)
    assert len(calls) == 2, "each of the two sites runs the generated backward"
    monkeypatch.setenv("LINCOMPILE_KERNELS", "reference")
    ref_loss, ref_grads = _loss_and_grads(linear, ids)
    assert len(calls) == 2
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert any(n.endswith("conv_weight") for n in grads) and any(n.endswith("alpha") for n in grads)
    for name, grad in grads.items():
        assert kit.rel(grad, ref_grads[name]) <= 1e-4, name
