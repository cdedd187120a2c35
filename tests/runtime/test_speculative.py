"""Speculative decoding on tiny models: greedy identity for every draft kind (chains and trees, crossing group
boundaries), exact committed state, the sampling distribution (chi-square), and clear errors."""
import dataclasses

import pytest
import torch

import lincompile
from lincompile.methods.spec import get_method
from lincompile.runtime.drafts import DEFAULT_NUM_DRAFT_TOKENS, Proposal, PromptLookupDraft
from lincompile.runtime.sampling import SamplingConfig, probabilities
from lincompile.runtime.speculative import SpeculativeDecoder, accept_greedy, accept_sampled, speculative_generate
from lincompile.testing.tiny import tiny_model

#: augmented with groups of 4 and a 5-tap conv: 40 tokens cross many group and conv-window boundaries.
SMALL_AUGMENTED = dataclasses.replace(get_method("augmented"), name="augmented-small", group_size=4, conv_kernel=5)


def _randomize_new_params(linear, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in linear.graph.named_parameters():
            if "lincompile_params" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return linear


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return _randomize_new_params(lincompile.optimize(tiny_model("llama"), SMALL_AUGMENTED))


@pytest.fixture(scope="module")
def hybrid():
    """Layer 0 augmented, layer 1 exact softmax with a KV cache."""
    torch.manual_seed(0)
    return _randomize_new_params(lincompile.optimize(tiny_model("llama"), SMALL_AUGMENTED, layers=[0]))


@pytest.fixture(scope="module")
def draft_model():
    torch.manual_seed(1)
    return _randomize_new_params(lincompile.optimize(tiny_model("llama", num_layers=1), SMALL_AUGMENTED), seed=1)


def _prompts(count, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, length), generator=g) for _ in range(count)]


class OracleTree:
    """A tree whose one branch is the true greedy continuation (known in advance) among wrong siblings."""

    name = "oracle-tree"

    def __init__(self, reference):
        self.reference = reference

    def propose(self, context, k, sampling, generator):
        start = len(context.tokens)
        true = self.reference[0, start:start + 3].tolist()
        wrong = [(t + 1) % 128 for t in true]
        layout = [(wrong, -1), (true, -1), (wrong, 1), (true, 1), (wrong, 3), (true, 3)]
        tokens, parents = [], []
        for depth, (row, parent) in enumerate(layout):
            if depth // 2 < len(true):
                tokens.append(row[depth // 2])
                parents.append(parent)
        return Proposal(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents))

    def accepted(self, path):
        pass


class RandomTree:
    name = "random-tree"

    def propose(self, context, k, sampling, generator):
        return Proposal(torch.randint(3, 128, (7,)), torch.tensor([-1, -1, 0, 0, 1, 2, 5]))

    def accepted(self, path):
        pass


@pytest.mark.parametrize("draft_kind,k", [("prompt-lookup", 3), ("model", 1), ("model", 4), ("hf-model", 3),
                                          ("oracle-tree", 3), ("random-tree", 3)])
def test_greedy_output_equals_plain_greedy(target, draft_model, draft_kind, k):
    for prompt in _prompts(2):
        plain = target.generate(prompt, 24, eos_token_id=None)
        draft = {"prompt-lookup": "prompt-lookup", "model": draft_model, "hf-model": tiny_model("llama", num_layers=1),
                 "oracle-tree": OracleTree(plain), "random-tree": RandomTree()}[draft_kind]
        out, stats = speculative_generate(target, prompt, 24, draft, k)
        assert torch.equal(out, plain), draft_kind
        assert stats.new_tokens == 24
        if draft_kind == "oracle-tree":
            assert stats.mean_accepted >= 2.5  # the true branch is taken (3 per call, fewer at the end)


@pytest.mark.parametrize("k", [1, 3])
def test_a_hugging_face_draft_of_the_target_itself_is_always_accepted(monkeypatch, k):
    """The exact rewrite of a model drafted for by the model: every draft accepted. Its KV cache is cropped only by
    a negative count (crop(0), "keep nothing" in transformers 5.0, emptied it after every fully accepted round)."""
    from transformers.cache_utils import DynamicCache

    crops = []
    crop = DynamicCache.crop
    monkeypatch.setattr(DynamicCache, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    source = tiny_model("llama", num_layers=1)
    exact = lincompile.optimize(source, "softmax")
    prompt = _prompts(1)[0]
    out, stats = speculative_generate(exact, prompt, 12, source, k)
    assert torch.equal(out, exact.generate(prompt, 12, eos_token_id=None))
    assert stats.accepted == stats.drafted > 0 and all(n < 0 for n in crops)


def test_hybrid_model_with_a_kv_cache_site(hybrid, draft_model):
    prompt = _prompts(1)[0]
    plain = hybrid.generate(prompt, 20, eos_token_id=None)
    for draft in (draft_model, OracleTree(plain)):
        assert torch.equal(speculative_generate(hybrid, prompt, 20, draft, 3)[0], plain)


@pytest.mark.parametrize("draft_kind", ["oracle-tree", "random-tree", "model"])
def test_committed_state_equals_token_by_token_decoding(target, draft_model, draft_kind):
    """After every step, the state equals prefill + the committed tokens fed one at a time."""
    prompt = _prompts(1, seed=5)[0]
    plain = target.generate(prompt, 30, eos_token_id=None)
    draft = {"oracle-tree": OracleTree(plain), "random-tree": RandomTree(), "model": draft_model}[draft_kind]
    decoder = SpeculativeDecoder(target, draft, 3)
    decoder.prefill(prompt)
    expected = target(prompt).past_state
    for _ in range(8):
        decoder.step()
        for i in range(expected.length, len(decoder.tokens) - 1):
            expected = target(decoder.tokens[None, i:i + 1], past_state=expected).past_state
        assert decoder.state.length == expected.length == len(decoder.tokens) - 1
        for name, value in expected.tensors.items():
            assert (decoder.state.tensors[name] - value).abs().max().item() <= 1e-6, name


def test_the_tree_verifier_follows_the_model_when_its_buffers_are_replaced():
    """`model.to(device)` replaces a module's buffers (its parameters change in place): the cached verifier, built
    over the old tensors, must not be reused then."""
    from lincompile.runtime.verify import PARENTS_INPUT, tree_verifier

    model = lincompile.optimize(tiny_model("llama"), "performer")
    verifier = tree_verifier(model)
    assert tree_verifier(model) is verifier
    model._apply(torch.clone)  # what a move to another device does
    with torch.no_grad():
        for buffer in model.graph.buffers():
            if buffer.is_floating_point():
                buffer.mul_(1.5)
    ids = _prompts(1)[0]
    chain = torch.arange(ids.shape[1]) - 1
    got = tree_verifier(model)(ids, **{PARENTS_INPUT: chain}).logits
    torch.testing.assert_close(got, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_accept_greedy_follows_the_argmax_path_in_a_tree():
    vocab = 10
    logits = torch.full((6, vocab), -1.0)
    # rows: pending, then nodes 0..4; argmax: pending->4, node1->7, node3->2
    for row, best in ((0, 4), (2, 7), (4, 2), (1, 0), (3, 0), (5, 0)):
        logits[row, best] = 1.0
    proposal = Proposal(torch.tensor([3, 4, 5, 7, 9]), torch.tensor([-1, -1, 0, 1, 1]))
    assert accept_greedy(logits, proposal) == ([1, 3], 2)


def _chi_square_p(samples, probs):
    """p-value of samples (ints) against probs; consecutive cells are merged into bins of expected count >= 5."""
    n = len(samples)
    observed = torch.bincount(torch.tensor(samples), minlength=probs.shape[0]).double()
    expected = probs.double() * n
    obs, exp = [0.0], [0.0]
    for o, e in zip(observed.tolist(), expected.tolist()):
        if exp[-1] >= 5:
            obs.append(0.0)
            exp.append(0.0)
        obs[-1] += o
        exp[-1] += e
    if exp[-1] < 5 and len(exp) > 1:  # a short last bin joins the one before
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    assert len(exp) >= 2, "too few samples for a chi-square test"
    obs_t, exp_t = torch.tensor(obs), torch.tensor(exp)
    exp_t = exp_t * obs_t.sum() / exp_t.sum()
    statistic = ((obs_t - exp_t) ** 2 / exp_t).sum()
    return torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2.0, dtype=torch.float64), statistic / 2).item()


@pytest.fixture(scope="module")
def tiny_distributions(target):
    """The tiny target's next-token distributions (temperature 0.7) at a prompt, and after each first token."""
    prompt = _prompts(1, seed=9)[0]
    config = SamplingConfig(True, 0.7)
    with torch.no_grad():
        p0 = probabilities(target(prompt).logits[0, -1], config)
        following = torch.cat([prompt.expand(128, -1), torch.arange(128)[:, None]], 1)
        p1 = probabilities(target(following).logits[:, -1], config)
    return config, p0, p1


@pytest.mark.parametrize("bad", [False, True])
def test_speculative_sampling_keeps_the_target_distribution(tiny_distributions, bad):
    """First and second emitted tokens over 20k runs of a 2-token chain drawn from a draft distribution q,
    which is either close to the target or deliberately bad (mass on the target's least likely tokens)."""
    config, p0, p1 = tiny_distributions
    g = torch.Generator().manual_seed(0)
    if bad:
        q0 = torch.softmax(-4 * p0.log().clamp_min(-30) / 10, -1)
        q1 = torch.softmax(-p1.log().clamp_min(-30) / 3, -1)
    else:
        q0 = 0.7 * p0 + 0.3 / 128
        q1 = 0.7 * p1 + 0.3 / 128
    firsts, seconds = [], []
    for _ in range(20_000):
        d0 = int(torch.multinomial(q0, 1, generator=g))
        d1 = int(torch.multinomial(q1[d0], 1, generator=g))
        proposal = Proposal(torch.tensor([d0, d1]), None, torch.stack([q0, q1[d0]]))
        path, token = accept_sampled(torch.stack([p0, p1[d0], p1[d1]]), proposal, g)
        emitted = [d0, d1][:len(path)] + [token]
        if len(emitted) == 1:  # the next round would draw its first token from the target after emitted[0]
            emitted.append(int(torch.multinomial(p1[emitted[0]], 1, generator=g)))
        firsts.append(emitted[0])
        seconds.append(emitted[1])
    assert _chi_square_p(firsts, p0) >= 0.01
    assert _chi_square_p(seconds, p0 @ p1) >= 0.01


def test_sampling_end_to_end_matches_the_target(target, draft_model, tiny_distributions):
    """Through the real decoder (prefill, draft model, verify, commit): the first token of a speculative step."""
    config, p0, p1 = tiny_distributions
    prompt = _prompts(1, seed=9)[0]
    g = torch.Generator().manual_seed(1)
    decoder = SpeculativeDecoder(target, draft_model, 2, config, g)
    pending, following = [], []
    for _ in range(300):  # a wiring check; the 20k-sample distribution tests are above
        decoder.prefill(prompt)
        pending.append(int(decoder.tokens[-1]))
        following.append(decoder.step()[0])
    assert _chi_square_p(pending, p0) >= 0.01
    assert _chi_square_p(following, p0 @ p1) >= 0.01


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    draft = PromptLookupDraft(max_ngram=2)
    from lincompile.runtime.drafts import DraftContext

    tokens = torch.tensor([5, 6, 7, 8, 9, 1, 6, 7])
    proposal = draft.propose(DraftContext(tokens, None), 3, SamplingConfig(), None)
    assert proposal.tokens.tolist() == [8, 9, 1]
    assert len(draft.propose(DraftContext(torch.tensor([1, 2, 3]), None), 3, SamplingConfig(), None)) == 0


class RepeatLast:
    """A draft of its own kind, naming no default k: proposes the last token k times."""

    name = "repeat-last"

    def propose(self, context, k, sampling, generator):
        return Proposal(context.tokens[-1:].repeat(k))

    def accepted(self, path):
        pass


def test_k_defaults_to_the_drafts_own(target):
    """Without num_draft_tokens each draft drafts its own default k (prompt lookup 8), a draft naming none 4;
    a given k wins. The stats record the k asked for."""
    prompt = _prompts(1)[0]
    assert PromptLookupDraft.default_num_draft_tokens == 8 and DEFAULT_NUM_DRAFT_TOKENS == 4
    for draft, k, expected in (("prompt-lookup", None, 8), ("prompt-lookup", 3, 3), (RepeatLast(), None, 4)):
        _, stats = speculative_generate(target, prompt, 12, draft, k)
        assert stats.num_draft_tokens == expected, draft
    assert stats.drafted == 4 * stats.target_calls  # RepeatLast proposes k tokens on every call


def test_bad_arguments_get_clear_errors(target, draft_model):
    prompt = _prompts(1)[0]
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        speculative_generate(target, prompt, 4, "prompt-lookup", 0)
    with pytest.raises(ValueError, match="vocabulary"):
        other = tiny_model("llama", num_layers=1)
        other.resize_token_embeddings(64)
        speculative_generate(target, prompt, 4, other, 2)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, prompt, 4, "prompt-lookup", 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(target, prompt, 4, "prompt-lookup", 2, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="one sequence at a time"):
        speculative_generate(target, prompt.expand(2, -1), 4, "prompt-lookup", 2)
    with pytest.raises(ValueError, match="train-medusa"):
        speculative_generate(target, prompt, 4, "medusa", 2)
    with pytest.raises(ValueError, match="unknown draft"):
        speculative_generate(target, prompt, 4, "ngram", 2)
    with pytest.raises(ValueError, match="tree drafts are for greedy"):
        speculative_generate(target, prompt, 4, RandomTree(), 2, do_sample=True)


def test_eos_stops_and_adaptive_k_keeps_the_output(target, draft_model):
    prompt = _prompts(1)[0]
    plain = target.generate(prompt, 20, eos_token_id=None)
    eos = int(plain[0, 8 + 5])
    out, _ = speculative_generate(target, prompt, 20, draft_model, 4, eos_token_id=eos)
    assert out.shape[1] == 8 + plain[0, 8:].tolist().index(eos) + 1
    adaptive, stats = speculative_generate(target, prompt, 20, draft_model, 6, adaptive=True)
    assert torch.equal(adaptive, plain)


def test_adaptive_k_ignores_rounds_with_nothing_drafted(target):
    """k shrinks after rejections and grows after full acceptance; a round with an empty proposal leaves it."""

    prompt = _prompts(1)[0]
    plain = target.generate(prompt, 20, eos_token_id=None)[0]

    class Scripted:
        """Round 1: two right tokens, then wrong ones; round 2: nothing."""

        name = "scripted"

        def propose(self, context, k, sampling, generator):
            if len(context.tokens) > prompt.shape[1] + 1:
                return Proposal(torch.zeros(0, dtype=torch.long))
            start = len(context.tokens)
            wrong = (int(plain[start + 2]) + 1) % 128
            return Proposal(torch.cat([plain[start:start + 2], torch.full((k - 2,), wrong)]))

        def accepted(self, path):
            pass

    decoder = SpeculativeDecoder(target, Scripted(), 6, adaptive=True)
    decoder.prefill(prompt)
    decoder.step()
    assert decoder.k == 3  # two of six accepted: k = accepted + 1
    decoder.step()
    assert decoder.k == 3


def test_adaptive_k_grows_when_a_tree_is_accepted_to_its_depth(target):
    """A tree has more nodes than levels: accepting a path as deep as the tree is full acceptance, and k grows
    back after a rejection (it used to stay low for the rest of the generation)."""
    prompt = _prompts(1)[0]
    plain = target.generate(prompt, 20, eos_token_id=None)[0]

    class Tree:
        """Round 1: a chain, two right tokens, then wrong ones; later: k right tokens plus a wrong first sibling."""

        name = "tree"

        def propose(self, context, k, sampling, generator):
            start = len(context.tokens)
            wrong = (int(plain[start]) + 1) % 128
            if start == prompt.shape[1] + 1:
                return Proposal(torch.cat([plain[start:start + 2], torch.full((k - 2,), wrong)]))
            return Proposal(torch.cat([plain[start:start + k], torch.tensor([wrong])]),
                            torch.cat([torch.arange(-1, k - 1), torch.tensor([-1])]))

        def accepted(self, path):
            pass

    decoder = SpeculativeDecoder(target, Tree(), 6, adaptive=True)
    decoder.prefill(prompt)
    decoder.step()
    assert decoder.k == 3
    assert len(decoder.step()) == 4 and decoder.k == 4
    assert len(decoder.step()) == 5 and decoder.k == 5
    assert torch.equal(decoder.tokens, plain[:len(decoder.tokens)])


def test_speculative_generate_records_no_autograd_graph(monkeypatch):
    """The model's parameters require grad; a recorded graph would chain every state to the last (memory grows
    with each token)."""
    from lincompile.runtime import speculative

    linear = lincompile.optimize(tiny_model("llama"), "local")
    assert any(p.requires_grad for p in linear.parameters())
    seen = []
    step = speculative.SpeculativeDecoder.step
    monkeypatch.setattr(speculative.SpeculativeDecoder, "step",
                        lambda self: seen.append(torch.is_grad_enabled()) or step(self))
    speculative_generate(linear, torch.randint(3, 128, (1, 6)), 8, "prompt-lookup", 2)
    assert seen and not any(seen)


@pytest.mark.parametrize("k", [1, 3])
def test_a_draft_model_continues_its_state_across_rounds(target, k):
    """The target drafting for itself: every draft is accepted (so the draft's continued state is right), and after
    the first round the draft absorbs only the tokens it has not seen (at most 2 per call: the last kept draft,
    which it never fed, and the target's own token), not the whole context again."""
    from lincompile.runtime.drafts import ModelDraft

    draft = ModelDraft(target)
    fed = []
    call = draft._call
    draft._call = lambda ids, state: (fed.append(ids.shape[1]), call(ids, state))[1]
    prompt = _prompts(1)[0]
    out, stats = speculative_generate(target, prompt, 20, draft, k)
    assert torch.equal(out, target.generate(prompt, 20, eos_token_id=None))
    assert stats.accepted == stats.drafted > 0
    assert fed[0] == prompt.shape[1] + 1 and max(fed[1:]) <= 2, fed


def test_a_draft_model_past_its_positions_proposes_nothing(target, monkeypatch):
    from lincompile.runtime.drafts import ModelDraft
    from lincompile.testing.tiny import tiny_model

    draft = ModelDraft(tiny_model("llama", num_layers=1))
    draft.max_positions = 4  # shorter than the prompt: every round decodes plainly
    prompt = _prompts(1)[0]
    out, stats = speculative_generate(target, prompt, 6, draft, 3)
    assert torch.equal(out, target.generate(prompt, 6, eos_token_id=None)) and stats.drafted == 0
