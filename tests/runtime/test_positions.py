"""Position numbering: a RoBERTa-style model numbers its tokens after its padding id (Hugging Face's
`create_position_ids_from_input_ids`), OPT counts the real tokens of its attention mask; every lincompile path
that numbers positions itself numbers them so."""
import pytest
import torch
from torch import nn

import lincompile
from lincompile.runtime.prefill import prefill
from lincompile.runtime.state import (LEARNED_POSITIONS, default_positions, numbered_from_mask, position_padding,
                                      position_tables)
from lincompile.testing.families import family_model
from lincompile.testing.tiny import tiny_model
from lincompile.train.attention_transfer import graph_inputs, softmax_graph

PAD = 1  # RoBERTa's padding id: its tokens are numbered 2, 3, ...


def roberta(decoder: bool, seed: int = 0) -> nn.Module:
    import transformers as tf

    config = tf.RobertaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=130, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, pad_token_id=PAD, is_decoder=decoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (tf.RobertaForCausalLM if decoder else tf.RobertaModel)(config)
    return model.eval()


def ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decoder():
    return roberta(decoder=True)


def greedy(model: nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by full forwards of `model` (each numbering its positions itself)."""
    out = prompt
    for _ in range(new):
        out = torch.cat([out, model(out).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return out


def test_encoder_without_position_ids_matches_hugging_face_with_pads():
    hf = roberta(decoder=False)
    linear = lincompile.optimize(hf, "softmax")
    assert linear.position_padding == PAD and linear.max_positions == 128  # 130 rows less the pad and the one before
    x = ids(2, 10)
    x[1, -3:] = PAD
    mask = x.ne(PAD).long()
    torch.testing.assert_close(linear(x, attention_mask=mask).logits, hf(x, attention_mask=mask).last_hidden_state,
                               rtol=1e-5, atol=1e-5)


def test_mpnet_is_detected_and_numbered_as_hugging_face():
    """MPNet adds its relative bias in place (`scores += bias`) and views a permuted `.contiguous()`: both once kept
    it from running linearized. Its relative bias makes the sites custom-masked (linear methods drop it, as T5's)."""
    import transformers as tf

    config = tf.MPNetConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=130, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = tf.MPNetModel(config).eval()
    linear = lincompile.optimize(hf, "softmax", strict=True)
    assert len(linear.rewritten) == 2 and {s.mask_kind for s in linear.sites} == {"custom"}
    assert linear.position_padding == PAD
    x = ids(2, 10)
    x[1, -3:] = PAD
    mask = x.ne(PAD).long()
    torch.testing.assert_close(linear(x, attention_mask=mask).logits, hf(x, attention_mask=mask).last_hidden_state,
                               rtol=1e-5, atol=1e-5)


def test_decoder_paths_number_positions_as_the_source(decoder, tmp_path):
    linear = lincompile.optimize(decoder, "softmax")
    prompt = ids(1, 6)
    torch.testing.assert_close(linear(prompt).logits, decoder(prompt).logits, rtol=1e-5, atol=1e-5)
    expected = greedy(decoder, prompt, 6)
    assert torch.equal(linear.generate(prompt, 6, eos_token_id=None), expected)
    assert torch.equal(linear.generate(prompt, 6, draft="prompt-lookup", eos_token_id=None), expected)
    logits, state, position = prefill(linear, prompt, chunk_size=4)
    assert position.tolist() == [[PAD + 1 + 6]]
    step = linear(expected[:, 6:7], past_state=state)  # no position_ids: numbered after the state
    torch.testing.assert_close(step.logits[:, -1], decoder(expected[:, :7]).logits[:, -1], rtol=1e-5, atol=1e-5)
    teacher = softmax_graph(linear)(*graph_inputs(linear, prompt))[0]
    torch.testing.assert_close(teacher, decoder(prompt).logits, rtol=1e-5, atol=1e-5)
    saved = lincompile.load(linear.save_pretrained(str(tmp_path / "saved")))
    assert saved.position_padding == PAD


def test_linear_decoder_is_padding_invariant(decoder):
    linear = lincompile.optimize(decoder, "linear-elu")
    short, long = ids(1, 4, seed=1), ids(1, 7, seed=2)
    batch = torch.cat([long, torch.cat([torch.full((1, 3), PAD), short], 1)])
    mask = batch.ne(PAD).long()
    together = linear.generate(batch, 5, attention_mask=mask, eos_token_id=None)
    assert torch.equal(together[1, 3:], linear.generate(short, 5, eos_token_id=None)[0])
    assert torch.equal(together[0], linear.generate(long, 5, eos_token_id=None)[0])
    assert torch.equal(linear.generate(long, 5, draft="prompt-lookup"), linear.generate(long, 5))


def test_onnx_runner_numbers_positions_as_the_torch_model(decoder, tmp_path):
    from lincompile.backends.ort import OrtModel

    linear = lincompile.optimize(decoder, "linear-elu")
    ort = OrtModel.from_dir(linear.export_onnx(str(tmp_path / "onnx")), providers=["CPUExecutionProvider"])
    assert ort.position_padding == PAD
    x = ids(1, 9)
    ref, got = linear(x[:, :5]), ort(x[:, :5])
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    ref, got = linear(x[:, 5:], past_state=ref.past_state), ort(x[:, 5:], past_state=got.past_state)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(ort.generate(x, 4), linear.generate(x, 4))


def test_default_positions_count_real_tokens_after_the_padding_id():
    x = torch.tensor([[5, 6, 7, 8], [1, 1, 7, 8]])
    assert default_positions(x, 0, None).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert default_positions(x, 3, 1).tolist() == [[5, 6, 7, 8], [1, 1, 5, 6]]


class _Embeddings(nn.Module):
    def __init__(self, padding: int | None, numbered_after_padding: bool) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(50, 4)
        self.position_embeddings = nn.Embedding(20, 4, padding_idx=padding)
        if numbered_after_padding:
            self.padding_idx = padding


class _Composite(nn.Module):
    """A text model beside a RoBERTa-style encoder (as Evolla holds ESM): its own input table numbers from 0."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Embeddings(1, True)
        self.embed_tokens = nn.Embedding(50, 4)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens


@pytest.mark.parametrize("padding,numbered,limit", [(None, False, 20), (0, False, 20), (1, True, 18)])
def test_padding_rows_are_reserved_only_when_the_embeddings_number_after_them(padding, numbered, limit):
    """LXMERT's table has a padding row 0 but numbers its tokens from 0 (all 20 rows are positions)."""
    module = nn.Sequential(_Embeddings(padding, numbered))
    assert position_padding(module) == (padding if numbered else None)
    assert position_tables(module) == (limit, LEARNED_POSITIONS)


def test_only_the_input_embeddings_table_sets_the_numbering():
    assert position_padding(_Composite()) is None


@pytest.fixture(scope="module")
def opt():
    return family_model("opt")


def test_only_opt_is_found_numbering_from_its_mask(opt):
    assert numbered_from_mask(opt)
    assert not any(numbered_from_mask(family_model(f, "eager")) for f in ("openai-gpt", "gemma", "biogpt", "xglm"))
    assert not numbered_from_mask(tiny_model("gpt2"))
    assert not numbered_from_mask(roberta(decoder=True))  # numbered after its padding id instead
    opt.train()
    assert numbered_from_mask(opt) and opt.training  # probed in eval mode; the mode is given back
    opt.eval()


@pytest.mark.parametrize("method", ["softmax", "augmented"])
def test_opt_left_padded_rows_are_numbered_as_hugging_face(opt, method, tmp_path):
    """OPT numbers the real tokens of its mask: a left-padded row's logits are the unpadded row's, in one call, in
    a call continued from a state with the whole mask, and through onnxruntime."""
    from lincompile.backends.ort import OrtModel
    from lincompile.testing.tiny import perturb_new_parameters

    linear = perturb_new_parameters(lincompile.optimize(opt, method))
    assert linear.positions_from_mask
    x = ids(2, 10)
    mask = torch.ones_like(x)
    x[1, :3], mask[1, :3] = 0, 0
    real = mask.bool()
    whole = linear(x, attention_mask=mask).logits
    if method == "softmax":
        torch.testing.assert_close(whole[real], opt(x, attention_mask=mask).logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole[1, 3:], linear(x[1:, 3:]).logits[0], rtol=1e-4, atol=1e-4)
    first = linear(x[:, :6], attention_mask=mask[:, :6])
    rest = linear(x[:, 6:], attention_mask=mask, past_state=first.past_state).logits
    torch.testing.assert_close(rest, whole[:, 6:], rtol=1e-4, atol=1e-4)
    ort = OrtModel.from_dir(linear.export_onnx(str(tmp_path / "onnx")), providers=["CPUExecutionProvider"])
    assert ort.positions_from_mask
    got = ort(x[:, :6], attention_mask=mask[:, :6])
    torch.testing.assert_close(ort(x[:, 6:], attention_mask=mask, past_state=got.past_state).logits, rest,
                               rtol=1e-4, atol=1e-4)


def test_a_cosformer_site_limits_positions_to_its_horizon():
    """cos(pi/2 (i - j) / M) turns negative past the horizon M (its normalizer then crosses 0 near 2M, and the
    outputs diverge): a model with a cosFormer site refuses sequences longer than M, with the reason; other
    sites of a hybrid do not lift the limit."""
    import dataclasses

    from lincompile.methods.spec import get_method
    from lincompile.runtime.state import COSFORMER_HORIZON

    short = dataclasses.replace(get_method("augmented-cosformer"), name="cosformer-16", horizon=16)
    model = lincompile.optimize(tiny_model("llama"), short, layers=[1])
    assert (model.max_positions, model.limit_reason) == (16, COSFORMER_HORIZON)
    ids = torch.randint(3, 128, (1, 17), generator=torch.Generator().manual_seed(0))
    assert model(ids[:, :16]).logits.isfinite().all()
    with pytest.raises(ValueError, match="past the model's 16 positions, the horizon M of its cosFormer sites"):
        model(ids)
    with pytest.raises(ValueError, match="passes the model's 16 positions, the horizon M"):
        model.generate(ids[:, :10], 8)
    assert lincompile.optimize(tiny_model("llama"), "augmented").max_positions is None
