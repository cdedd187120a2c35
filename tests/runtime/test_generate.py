"""Generation through the recurrent state: equals HF greedy decoding; padding-invariant; checks args."""
import pytest
import torch

import lincompile
from lincompile.runtime.sampling import SamplingConfig, penalize, probabilities
from lincompile.testing.tiny import perturb_new_parameters, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_softmax_greedy_equals_hf_generate(llama):
    """Also by default, where both stop at the model's own end-of-sequence id."""
    linear = lincompile.optimize(llama, "softmax")
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = linear.generate(ids, 8, eos_token_id=None)
    theirs = llama.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones_like(ids))
    assert torch.equal(ours, theirs)
    saved = llama.config.eos_token_id, llama.generation_config.eos_token_id
    llama.config.eos_token_id = llama.generation_config.eos_token_id = int(ours[0, 7])  # row 0's third new token
    try:
        theirs = llama.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        got = linear.generate(ids, 8)
        assert torch.equal(got, theirs) and not torch.equal(got, ours)  # row 0 stopped: the rest is padding
    finally:
        llama.config.eos_token_id, llama.generation_config.eos_token_id = saved


def test_repetition_penalty_is_hugging_faces():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    seen = torch.randint(0, 50, (3, 12), generator=g)  # repeats included
    for penalty in (0.7, 1.0, 1.3):
        want = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
        assert torch.equal(penalize(logits, seen, penalty), want)


def test_hugging_face_generation_arguments_give_hugging_faces_tokens(llama):
    """`max_length` (prompt included), `repetition_penalty` and `pad_token_id` (what a finished row repeats)
    mean what they mean in Hugging Face's `generate`: the exact rewrite gives its tokens."""
    linear = lincompile.optimize(llama, "softmax")
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    hf = dict(do_sample=False, attention_mask=torch.ones_like(ids), max_length=17, repetition_penalty=1.5)
    free = llama.generate(ids, eos_token_id=None, pad_token_id=0, **hf)
    eos = int(free[0, 7])  # row 0 ends at its third new token
    theirs = llama.generate(ids, eos_token_id=eos, pad_token_id=1, **hf)
    ours = linear.generate(ids, max_length=17, repetition_penalty=1.5, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(ours, theirs) and int(ours[0, -1]) == 1
    assert not torch.equal(linear.generate(ids, max_length=17), ours)  # the penalty changes the tokens
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, 2:]], 1)  # without a mask: 0 is padding
    assert torch.equal(linear.generate(padded, 6, pad_token_id=0, eos_token_id=None),
                       llama.generate(padded, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None))
    assert torch.equal(linear.generate(padded, 6, pad_token_id=0, eos_token_id=None), linear.generate(
        padded, 6, attention_mask=padded.ne(0).long(), eos_token_id=None))


class _Oracle:
    """A draft that proposes the next tokens of a known continuation (a chain), or (`tree`) those as a branch after
    a wrong one-token branch: the continuation's second token first, which the right branch's first row must
    not count as seen."""

    def __init__(self, sequence: torch.Tensor, tree: bool) -> None:
        self.sequence, self.tree = sequence, tree

    def propose(self, context, k, sampling, generator):
        from lincompile.runtime.drafts import Proposal

        tokens = self.sequence[len(context.tokens):len(context.tokens) + k]
        if not self.tree or len(tokens) < 2:
            return Proposal(tokens)
        parents = torch.arange(-1, len(tokens) + 1)  # the wrong root, then the continuation: its own root, a chain
        parents[1] = -1
        return Proposal(torch.cat([tokens[1:2], tokens]), parents[:len(tokens) + 1])

    def accepted(self, path):
        pass


@pytest.mark.parametrize("draft", ["prompt-lookup", "chain", "tree"])
def test_speculative_decoding_keeps_the_repetition_penalty(llama, draft):
    """Greedy speculative decoding with a repetition penalty gives plain greedy decoding's tokens with it: every
    verified position is penalized by the tokens before it on its path (drafts of new tokens, accepted whole,
    show it; a tree's wrong branch must not count)."""
    linear = perturb_new_parameters(lincompile.optimize(llama, "augmented"), 0.1)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2)).repeat(1, 3)
    plain = linear.generate(ids, 16, repetition_penalty=1.3)
    chosen = draft if draft == "prompt-lookup" else _Oracle(plain[0], tree=draft == "tree")
    assert torch.equal(linear.generate(ids, 16, repetition_penalty=1.3, draft=chosen), plain)


def test_beam_search_and_a_max_length_under_the_prompt_are_refused(llama):
    linear = lincompile.optimize(llama, "linear-elu")
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(ValueError, match="without beam search; use num_beams=1"):
        linear.generate(ids, 4, num_beams=2)
    with pytest.raises(ValueError, match="max_length=5 leaves no new token after a prompt of 5 tokens"):
        linear.generate(ids, max_length=5)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        linear.generate(ids, 4, repetition_penalty=0.0)
    assert linear.generate(ids, eos_token_id=None).shape == (1, 5 + 32)
    assert linear.generate(ids, max_length=9, eos_token_id=None).shape == (1, 9)


@pytest.mark.parametrize("method", ["linear-elu", "softmax", "augmented"])
def test_left_padded_row_generates_what_it_would_alone(llama, method):
    """`augmented`'s rows decode 3 positions apart (its group slots differ per row)."""
    linear = perturb_new_parameters(lincompile.optimize(llama, method), 0.1)
    short = torch.randint(3, 128, (1, 4))
    long = torch.randint(3, 128, (1, 7))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = linear.generate(batch, 6, attention_mask=mask, eos_token_id=None)
    alone = linear.generate(short, 6, eos_token_id=None)
    assert torch.equal(together[1, 3:], alone[0])
    assert torch.equal(together[0], linear.generate(long, 6, eos_token_id=None)[0])


def test_sampling_is_seeded_and_eos_stops(llama):
    linear = lincompile.optimize(llama, "linear-elu")
    ids = torch.randint(3, 128, (1, 4))
    a = linear.generate(ids, 10, do_sample=True, top_k=20, generator=torch.Generator().manual_seed(3),
                        eos_token_id=None)
    b = linear.generate(ids, 10, do_sample=True, top_k=20, generator=torch.Generator().manual_seed(3),
                        eos_token_id=None)
    assert torch.equal(a, b) and a.shape == (1, 14)
    first = int(linear.generate(ids, 1)[0, -1])
    stopped = linear.generate(ids, 10, eos_token_id=first)
    assert stopped.shape == (1, 5)


def test_top_k_top_p_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = probabilities(logits, SamplingConfig(True, top_k=2))
    assert p[0, 2:].sum() == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    p = probabilities(logits, SamplingConfig(True, top_p=0.5))
    assert torch.equal(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_a_tiny_temperature_samples_the_argmax():
    """logits / 1e-45 overflow to inf (and softmax to NaN) unless the largest is subtracted first."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, -2.0, 1.0]])
    p = probabilities(logits, SamplingConfig(True, temperature=1e-45))
    assert torch.equal(p, torch.nn.functional.one_hot(logits.argmax(-1), 4).float())
    torch.testing.assert_close(probabilities(logits, SamplingConfig(True, temperature=0.7)),
                               torch.softmax(logits / 0.7, -1))


def test_prompts_are_checked_and_may_be_lists(llama):
    """Ids outside the vocabulary are named (not an embedding's "index out of range"); a nested list is a prompt."""
    from lincompile.runtime.generate import generate
    from lincompile.runtime.speculative import speculative_generate

    linear = lincompile.optimize(llama, "linear-elu")
    for bad in (torch.tensor([[5, 128]]), torch.tensor([[-1, 5]])):
        with pytest.raises(ValueError, match="outside the vocabulary 0..127"):
            generate(linear, bad, 2)
        with pytest.raises(ValueError, match="outside the vocabulary 0..127"):
            speculative_generate(linear, bad, 2, "prompt-lookup")
    assert torch.equal(generate(linear, [[5, 6, 7]], 3), generate(linear, torch.tensor([[5, 6, 7]]), 3))
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer"):
        speculative_generate(linear, torch.tensor([[5, 6, 7]]), 2, "prompt-lookup", 2.5)


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"),
                                          ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(True, **kwargs)


def test_right_padding_is_refused(llama):
    linear = lincompile.optimize(llama, "linear-elu")
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        linear.generate(ids, 3, attention_mask=mask)


def test_several_eos_ids_each_end_a_row(llama):
    linear = lincompile.optimize(llama, "linear-elu")
    ids = torch.randint(3, 128, (2, 4))
    free = linear.generate(ids, 6, eos_token_id=None)
    eos = [int(free[0, 5]), int(free[1, 6])]
    ends = [4 + next(j for j in range(6) if int(free[r, 4 + j]) in eos) for r in (0, 1)]  # each row's first eos
    ended = linear.generate(ids, 6, eos_token_id=eos, pad_token_id=None)
    assert ended.shape == (2, max(ends) + 1)
    for r in (0, 1):
        assert torch.equal(ended[r, :ends[r] + 1], free[r, :ends[r] + 1])
        assert (ended[r, ends[r] + 1:] == eos[0]).all()  # a finished row repeats the first eos id
    spec = linear.generate(ids[:1], 6, eos_token_id=eos, draft="prompt-lookup")
    assert torch.equal(spec, free[:1, :ends[0] + 1])
    with pytest.raises(ValueError, match="eos_token_id"):
        linear.generate(ids, 2, eos_token_id=[])


class _Streamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value)

    def end(self):
        self.ended = True


@pytest.mark.parametrize("draft", [None, "prompt-lookup"])
def test_streamer_ends_even_without_new_tokens(llama, draft):
    linear = lincompile.optimize(llama, "linear-elu")
    ids = torch.randint(3, 128, (1, 4))
    streamer = _Streamer()
    assert torch.equal(linear.generate(ids, 0, streamer=streamer, draft=draft), ids)
    assert streamer.ended and torch.equal(streamer.chunks[0], ids)
    untouched = _Streamer()
    with pytest.raises(ValueError, match="one sequence at a time"):
        linear.generate(torch.randint(3, 128, (2, 4)), 3, streamer=untouched, draft="prompt-lookup")
    assert untouched.chunks == []


def test_past_state_of_another_batch_or_model_is_refused(llama):
    linear = lincompile.optimize(llama, "linear-elu")
    state = linear(torch.randint(3, 128, (1, 4))).past_state
    with pytest.raises(ValueError, match="past_state holds 1 rows"):
        linear(torch.randint(3, 128, (2, 1)), past_state=state)
    other = lincompile.optimize(tiny_model("llama", num_layers=3), "linear-elu")
    with pytest.raises(ValueError, match="does not belong to this model"):
        linear(torch.randint(3, 128, (1, 1)), past_state=other(torch.randint(3, 128, (1, 4))).past_state)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_learned_positions_are_a_clear_limit(family):
    """GPT-2's and OPT's learned position embeddings end at 128 rows here (OPT's net of its offset of 2): up to the
    last one the model runs as Hugging Face's does; past it, every path says so instead of an IndexError."""
    hf = tiny_model(family)
    model = lincompile.optimize(hf, "softmax")
    assert model.max_positions == 128
    ids = torch.randint(3, 128, (1, 128), generator=torch.Generator().manual_seed(0))  # no pad or eos id
    torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="reaches token 129, past the model's 128 learned positions"):
        model(torch.cat([ids, ids[:, :1]], 1))
    state = model(ids[:, :127]).past_state
    with pytest.raises(ValueError, match="reaches token 129"):
        model(ids[:, 127:].repeat(1, 2), past_state=state)
    plain = model.generate(ids[:, :120], max_new_tokens=9, eos_token_id=None)  # the 129th token is never fed
    assert plain.shape == (1, 129)
    message = "a prompt of 120 tokens plus max_new_tokens=10 passes the model's 128 .* use max_new_tokens <= 9"
    with pytest.raises(ValueError, match=message):
        model.generate(ids[:, :120], max_new_tokens=10)
    with pytest.raises(ValueError, match=message):
        model.generate(ids[:, :120], max_new_tokens=10, draft="prompt-lookup")
    too_long = torch.cat([ids, ids[:, :1]], 1)
    for new_tokens in (0, 1):
        with pytest.raises(ValueError, match="the prompt has 129 tokens, past the model's 128 .* at most 128 tokens"):
            model.generate(too_long, max_new_tokens=new_tokens)
    # drafts that always propose 6 tokens: verify calls near the end are cut to the positions left (a draft with
    # its own table, GPT-2's, also stops drafting past it); the tokens are plain greedy decoding's
    for draft in (tiny_model("llama"), tiny_model("gpt2", seed=1)):
        out = model.generate(ids[:, :120], max_new_tokens=9, draft=draft, num_draft_tokens=6, eos_token_id=None)
        assert torch.equal(out, plain)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_rotary_and_relative_positions_have_no_limit(family):
    assert lincompile.optimize(tiny_model(family), "softmax").max_positions is None
