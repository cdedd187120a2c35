"""`logits_to_keep`: the logits of a call's last k tokens only, computed by a fork whose LM head scores k rows;
prefill asks for the last token's, in torch and in onnxruntime (an export takes `logits_index`)."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import lincompile
from lincompile.backends.eager import LinearizedModel
from lincompile.backends.ort import OrtModel
from lincompile.runtime.graphs import LOGITS_INDEX
from lincompile.runtime.prefill import prefill
from lincompile.testing.families import family_model
from lincompile.testing.tiny import perturb_new_parameters, tiny_model

TOKENS = 11


def _ids(batch: int = 2, tokens: int = TOKENS) -> torch.Tensor:
    return torch.randint(3, 60, (batch, tokens), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def llama() -> LinearizedModel:
    return perturb_new_parameters(lincompile.optimize(tiny_model("llama"), "augmented"))


def _fork_rows(model: LinearizedModel, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The fork's own logits output for `index` (not cut afterwards)."""
    state = model.initial_state(ids.shape[0])
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "position_ids": torch.arange(ids.shape[1]).expand_as(ids), **state.tensors, LOGITS_INDEX: index}
    return model.logits_fork()(*[values[n] for n in [*model.input_names, LOGITS_INDEX]])[0]


@pytest.mark.parametrize("case", ["llama", "gemma2-softcap", "int8", "int8-calibrated"])
def test_kept_logits_are_the_last_rows_and_the_head_scores_only_them(llama, case):
    """Gemma 2 caps its logits (div, tanh, mul after the head); an 8-bit head is `int8_linear`, whose input a
    calibrated model first multiplies by its smoothing factors."""
    if case == "llama":
        model = llama
    elif case == "gemma2-softcap":
        model = lincompile.optimize(family_model("gemma2", "eager"), "augmented")
        assert model.hf_config.final_logit_softcapping
    elif case == "int8":
        model = llama.quantize("int8")
    else:
        model = llama.quantize("int8", calibration=_ids(2, 16))
    ids = _ids()
    full = model(ids).logits
    for keep in (1, 3, TOKENS, TOKENS + 4):
        got = model(ids, logits_to_keep=keep).logits
        assert got.shape == (2, min(keep, TOKENS), full.shape[-1])
        torch.testing.assert_close(got, full[:, -keep:], atol=1e-6, rtol=1e-6)  # the product rounds by rows
    assert model.logits_fork() is not None and model.logits_fork() is model.logits_fork()  # built once
    rows = _fork_rows(model, ids, torch.tensor([4, 9]))
    assert rows.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(rows, full[:, [4, 9]], atol=1e-6, rtol=1e-6)


def test_a_graph_it_cannot_fork_cuts_the_logits_after(llama):
    """A compiled graph (any module but an fx graph) has no fork: all rows are computed, the last k returned."""
    class Wrapped(torch.nn.Module):
        def __init__(self, graph):
            super().__init__()
            self.inner = graph

        def forward(self, *inputs):
            return self.inner(*inputs)

    wrapped = llama.with_graph(Wrapped(llama.graph))
    assert wrapped.logits_fork() is None
    ids = _ids()
    torch.testing.assert_close(wrapped(ids, logits_to_keep=2).logits, llama(ids).logits[:, -2:], atol=0, rtol=0)


def test_a_deep_copy_forks_its_own_graph(llama):
    ids = _ids()
    before = llama(ids, logits_to_keep=1).logits
    copied = copy.deepcopy(llama)
    head = copied.graph.get_parameter(next(n for n, _ in copied.graph.named_parameters() if "lm_head" in n))
    with torch.no_grad():
        head.mul_(2)
    assert copied.logits_fork() is not llama.logits_fork()
    assert not torch.allclose(copied(ids, logits_to_keep=1).logits, before)
    torch.testing.assert_close(llama(ids, logits_to_keep=1).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_logits_to_keep_is_refused(llama, bad):
    with pytest.raises(ValueError, match="logits_to_keep must be an integer >= 0"):
        llama(_ids(), logits_to_keep=bad)


def test_prefill_asks_a_linearized_model_for_the_last_tokens_logits(llama):
    """A module's __call__ takes anything: prefill reads its forward's signature, and the fork scores the rows."""
    copied = copy.deepcopy(llama)
    assert "_logits_forked" not in copied.__dict__
    ids = _ids()
    got = prefill(copied, ids, chunk_size=4)
    assert copied.__dict__["_logits_forked"][1] is not None
    torch.testing.assert_close(got.logits, prefill(llama, ids, chunk_size=None, all_logits=True).logits[:, -1],
                               atol=1e-5, rtol=0)


def test_an_encoder_decoder_keeps_its_decoders_last_tokens():
    """The kept rows count the decoder's tokens, fewer or more than the encoder's."""
    model = lincompile.optimize(tiny_model("t5"), "linear-elu")
    ids = _ids(2, 7)
    for decoded in (3, 9):
        decoder = _ids(2, decoded)
        full = model(ids, decoder_input_ids=decoder).logits
        got = model(ids, decoder_input_ids=decoder, logits_to_keep=2).logits
        assert got.shape == (2, 2, full.shape[-1])
        torch.testing.assert_close(got, full[:, -2:], atol=1e-6, rtol=1e-6)


def test_prefill_asks_for_the_last_tokens_logits_only():
    seen = []

    def model(input_ids, attention_mask=None, past_state=None, position_ids=None, logits_to_keep=0):
        seen.append(logits_to_keep)
        logits = torch.zeros(*input_ids.shape, 5)
        return type("Out", (), {"logits": logits[:, -logits_to_keep:], "past_state": object()})()

    ids = torch.ones(1, 10, dtype=torch.long)
    prefill(model, ids, chunk_size=4)
    assert seen == [1, 1, 1]
    seen.clear()
    assert prefill(model, ids, chunk_size=4, all_logits=True).logits.shape == (1, 10, 5)
    assert seen == [0, 0, 0]
    assert "logits_to_keep" in inspect.signature(LinearizedModel.forward).parameters
    assert "logits_to_keep" in inspect.signature(OrtModel.__call__).parameters


@pytest.mark.parametrize("forked", [True, False])
def test_onnx_export_takes_logits_index(llama, tmp_path, monkeypatch, forked):
    """Without a fork (a head it cannot split; exports made before it) the runner cuts the logits after."""
    if not forked:
        monkeypatch.setattr(LinearizedModel, "logits_fork", lambda self: None)
    runner = OrtModel.from_dir(llama.export_onnx(str(tmp_path / "onnx")), providers=["CPUExecutionProvider"])
    assert (LOGITS_INDEX in runner.input_names) == forked
    ids = _ids()
    full = llama(ids).logits
    for keep in (0, 1, 3, TOKENS + 1):
        got = runner(ids, logits_to_keep=keep).logits
        torch.testing.assert_close(got, full[:, -keep:] if keep else full, atol=1e-5, rtol=0)
    state = runner(ids[:, :6]).past_state
    torch.testing.assert_close(runner(ids[:, 6:7], past_state=state).logits, full[:, 6:7], atol=1e-5, rtol=0)
    ref = prefill(llama, ids, chunk_size=4)
    torch.testing.assert_close(prefill(runner, ids, chunk_size=4).logits, ref.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        runner(ids, logits_to_keep=-2)
