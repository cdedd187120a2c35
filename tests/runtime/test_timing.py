"""The decode-timing sessions decode what a plain forward pass computes, on a tiny llama (fast; `open_ort` and
`compiled_model` run in the demo test on the real model)."""
from __future__ import annotations

import pytest
import torch

import lincompile
from lincompile.runtime.prefill import prefill
from lincompile.runtime.timing import HFCache, kv_cache_bytes, linear_session, time_steps
from lincompile.testing.tiny import perturb_new_parameters, tiny_model

PROMPT, STEPS = 70, 6  # the prompt crosses a group boundary (G = 64)


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def linear(hf):
    """The tiny llama linearized, its new parameters (alpha, conv taps start at zero) moved so they count."""
    return perturb_new_parameters(lincompile.optimize(hf, "augmented"))


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def _run(step, n: int) -> list[torch.Tensor]:
    return [step() for _ in range(n)]


def _check_against_forward(forward, prompt: torch.Tensor, first: torch.Tensor, logits: list[torch.Tensor]) -> None:
    """Step i's logits equal a forward pass over the prompt and the greedy tokens fed so far."""
    fed = [first] + [step.argmax(-1, keepdim=True) for step in logits[:-1]]
    full = forward(torch.cat([prompt, *fed], dim=1))
    expected = full[0, PROMPT:]
    torch.testing.assert_close(torch.cat(logits), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_linear_session_decodes_what_a_forward_pass_computes_and_leaves_the_state_alone(linear, prompt):
    filled = prefill(linear, prompt, chunk_size=32)
    before = filled.state.clone()
    logits = _run(linear_session(linear, filled.logits, filled.state, filled.next_position_ids), STEPS)
    for name, tensor in before.tensors.items():
        assert torch.equal(tensor, filled.state.tensors[name]), name
    _check_against_forward(lambda ids: linear(ids).logits, prompt, filled.logits.argmax(-1, keepdim=True), logits)


@torch.no_grad()
def test_hf_cache_decodes_what_a_forward_pass_computes_and_rewinds(hf, prompt):
    cache = HFCache(hf)
    with pytest.raises(ValueError, match="extend or fill_random"):
        cache.session()
    cache.extend(prompt, chunk=32)
    assert cache.length == PROMPT and cache.nbytes() == kv_cache_bytes(hf.config, PROMPT)
    first = cache.next_token
    logits = _run(cache.session(), STEPS)
    assert cache.length == PROMPT + STEPS
    _check_against_forward(lambda ids: hf(ids, use_cache=False).logits, prompt, first, logits)
    cache.rewind(PROMPT)
    assert cache.length == PROMPT and cache.cache.get_seq_length() == PROMPT


@torch.no_grad()
def test_hf_random_cache_has_the_requested_length_and_decodes(hf):
    cache = HFCache(hf)
    cache.fill_random(100, torch.tensor([[5]]))
    assert cache.length == cache.cache.get_seq_length() == 100
    assert cache.nbytes() == kv_cache_bytes(hf.config, 100)
    logits = _run(cache.session(), 2)
    assert cache.length == cache.cache.get_seq_length() == 102
    assert logits[0].shape == (1, hf.config.vocab_size) and all(bool(x.isfinite().all()) for x in logits)


def test_time_steps_warms_up_then_interleaves_rounds_in_alternating_order():
    calls: list[str] = []

    def session(name: str):
        def step() -> torch.Tensor:
            calls.append(name)
            return torch.tensor([[0.0, 1.0]])
        return step

    timings = time_steps({"a": session("a"), "b": session("b")}, warmup=1, rounds=2, steps=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"]
    assert {name: len(v) for name, v in timings.steps.items()} == {"a": 4, "b": 4}
    assert timings.tokens == {"a": [1] * 5, "b": [1] * 5}
    assert all(rate > 0 for rate in timings.tokens_per_s().values())


def test_agreement_counts_same_steps_and_finds_the_first_difference():
    from lincompile.runtime.timing import Timings

    timings = Timings(tokens={"a": [5, 6, 7, 8, 9], "b": [5, 6, 0, 8, 9], "c": [5, 6, 7, 8, 9]})
    assert timings.agreement("a", "b") == {"same": 4, "steps": 5, "same_until": 2}
    assert timings.agreement("a", "c") == {"same": 5, "steps": 5, "same_until": None}


def test_turns_rotate_so_each_session_takes_each_place():
    from lincompile.runtime.timing import alternate

    three = {"a": 1, "b": 2, "c": 3}
    orders = ["".join(name for name, _ in alternate(three, turn)) for turn in range(4)]
    assert orders == ["abc", "bca", "cab", "abc"]
    assert all(one[-1] != two[0] for one, two in zip(orders, orders[1:]))  # none twice in a row
    assert [name for name, _ in alternate({"a": 1, "b": 2}, 1)] == ["b", "a"] and alternate({}, 3) == []
