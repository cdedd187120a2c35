"""Stage 1: attention transfer trains the method parameters only, and lowers every site's MSE to softmax."""
from __future__ import annotations

import torch

from lincompile.train.attention_transfer import (TransferObjective, attention_parameters, graph_inputs,
                                                 softmax_graph)
from lincompile.train.trainer import TrainConfig, train


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


def test_softmax_graph_is_the_original_model(linearize, llama_capture):
    model, _ = llama_capture
    linear = linearize("augmented")
    ids = _blocks(2, 0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = softmax_graph(linear)(*graph_inputs(linear, ids))[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_teacher_forcing_isolates_sites(linearize):
    """The MSE of site 1 depends on site 1's parameters only: its input came from softmax, not from site 0."""
    linear = linearize("augmented")
    objective = TransferObjective(linear)
    assert objective.sites == [0, 1]
    _, per_site = objective(_blocks(2, 1))
    assert per_site.shape == (2,) and bool((per_site > 0).all())
    params = attention_parameters(linear)
    loss = objective.graph(*graph_inputs(linear, _blocks(2, 1)))[1]
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    by_name = dict(zip(params, grads))
    assert by_name["lincompile_params.site_0.conv_weight"] is None
    assert by_name["lincompile_params.site_1.conv_weight"].abs().sum() > 0


def test_stage1_lowers_every_site_mse_and_touches_only_new_parameters(linearize, tmp_path):
    linear = linearize("augmented")
    objective = TransferObjective(linear)
    held = _blocks(4, 2)
    with torch.no_grad():
        before_mse = objective(held)[1]
    before = {n: p.detach().clone() for n, p in linear.graph.named_parameters()}
    flags = {n: p.requires_grad for n, p in linear.graph.named_parameters()}
    config = TrainConfig(stage1_steps=8, stage2_steps=0, batch_size=4, block_size=32, warmup_steps=0,
                         checkpoint_every=0)
    result = train(linear, _blocks(16, 3), config, tmp_path, progress=False)
    with torch.no_grad():
        after_mse = objective(held)[1]
    assert bool((after_mse < 0.9 * before_mse).all()), (before_mse, after_mse)
    assert [r["stage"] for r in result.history] == [1] * 8 and len(result.history[0]["site_mse"]) == 2
    new = set(attention_parameters(linear))
    assert new == {f"lincompile_params.site_{i}.{n}" for i in (0, 1) for n in ("alpha", "conv_weight")}
    for name, p in linear.graph.named_parameters():
        if name in new:
            continue
        assert torch.equal(p, before[name]), f"base weight {name} changed"
    assert not torch.equal(before["lincompile_params.site_0.conv_weight"],
                           linear.graph.get_parameter("lincompile_params.site_0.conv_weight"))
    assert {n: p.requires_grad for n, p in linear.graph.named_parameters()} == flags
