"""Committing an accepted path: sites committed together (stacked along the batch) get exactly the state each
gets alone, and which methods may be stacked."""
import dataclasses

import pytest
import torch

import lincompile
from lincompile.kernels.linear_attention.verify import VerifyExtras, commit
from lincompile.methods.params import state_update_reads_params
from lincompile.methods.spec import get_method
from lincompile.runtime.verify import commit_path, commit_sites
from lincompile.testing.tiny import tiny_model


@pytest.mark.parametrize("name,reads", [("augmented", False), ("local+grouped", False), ("linear-elu", False),
                                        ("softmax", False), ("hedgehog", True), ("retnet", True),
                                        ("performer", True), ("augmented-hedgehog", True)])
def test_which_state_updates_read_parameters(name, reads):
    assert state_update_reads_params(get_method(name)) is reads


@pytest.mark.parametrize("method", ["augmented", "softmax", "hedgehog"])  # stacked, stacked KV caches, alone
def test_stacked_commit_equals_each_site_alone(method):
    spec = dataclasses.replace(get_method(method), name=f"{method}-small", group_size=4, conv_kernel=5)
    linear = lincompile.optimize(tiny_model("llama", num_layers=3), spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in linear.graph.named_parameters():
            if "lincompile_params" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = linear(torch.randint(3, 128, (2, 7), generator=g)).past_state  # 7 tokens: mid-group
    out = linear(torch.randint(3, 128, (2, 5), generator=g), past_state=state)
    parents = torch.arange(5) - 1
    sites = commit_sites(linear)
    assert len(sites) == 3
    for path in ([0], [0, 1, 2], [0, 1, 2, 3, 4]):  # the last crosses a group boundary
        committed = commit_path(sites, state, out.extras, parents, path)
        for site in sites:
            keys_name, values_name = site.draft_names()
            info = VerifyExtras(site.spec, site.params, site.scale, out.extras[keys_name][:, :, -5:],
                                out.extras[values_name][:, :, -5:], parents)
            alone = commit([state.tensors[n] for n in site.state_names], info, path)
            for name, expected in zip(site.state_names, alone):
                assert torch.equal(committed.tensors[name], expected), (path, name)
        assert committed.length == state.length + len(path)
