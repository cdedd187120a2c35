"""Replaying a draft against the plain greedy output gives the counts speculative decoding gets with the target
(whose output, with every draft, is the plain greedy output)."""
import pytest
import torch

import lincompile
from lincompile.runtime.ngram import NgramTable, build_ngram_table
from lincompile.runtime.replay import ReplayStats, replay_draft
from lincompile.runtime.speculative import speculative_generate
from lincompile.testing.tiny import tiny_model


def test_replay_counts_what_speculative_decoding_does():
    torch.manual_seed(0)
    target = lincompile.optimize(tiny_model("llama"), "augmented")
    g = torch.Generator().manual_seed(1)
    corpus = torch.randint(3, 128, (4, 32), generator=g)
    table = build_ngram_table(corpus, target(corpus).logits.argmax(-1), 128)
    prompts = [torch.randint(3, 128, (1, 6), generator=g) for _ in range(3)]
    plain = [target.generate(prompt, 20, eos_token_id=None) for prompt in prompts]
    for draft in ("prompt-lookup", table):
        for k in (1, 3, 6):
            accepted, drafted, new_tokens = [], 0, 0
            for prompt, reference in zip(prompts, plain):
                out, stats = speculative_generate(target, prompt, 20, draft, k)
                assert torch.equal(out, reference)
                accepted += stats.accepted_per_call
                drafted += stats.drafted
                new_tokens += stats.new_tokens
            replay = replay_draft(draft, plain, 6, k)
            assert list(replay.accepted) == accepted and sum(replay.drafted) == drafted
            assert replay.new_tokens == new_tokens == 60 and replay.calls == len(accepted)
    assert sum(replay_draft(table, plain, 6, 6).accepted) > 0  # the comparison saw drafts kept
    repeated = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # prompt lookup drafts past a short max_new_tokens
    for new in (2, 3, 5):
        reference = target.generate(repeated, new, eos_token_id=None)
        out, stats = speculative_generate(target, repeated, new, "prompt-lookup", 6)
        replay = replay_draft("prompt-lookup", [reference], 10, 6)
        assert torch.equal(out, reference) and replay.new_tokens == stats.new_tokens == new
        assert replay.calls == stats.target_calls and sum(replay.drafted) == stats.drafted
        assert list(replay.accepted[:-1]) == stats.accepted_per_call[:-1]
        assert replay.accepted[-1] <= stats.accepted_per_call[-1]  # the replay stops at the plain output's end
    with pytest.raises(ValueError, match="vocabulary has 64 tokens"):
        speculative_generate(target, prompts[0], 4, NgramTable(64, {}), 4)


def test_modelled_speedup_weighs_each_call_by_its_width():
    stats = ReplayStats(drafted=(2, 0, 3), accepted=(2, 0, 1), new_tokens=7, sequences=1)
    assert stats.calls == 3 and stats.tokens_per_call == pytest.approx(7 / 3)
    assert stats.drafted_per_call == pytest.approx(5 / 3)
    # plain: 7 width-1 calls; speculative: the prompt's last token, then widths 3, 1, 4
    assert stats.modelled_speedup([1.0, 1.5, 2.0, 2.5]) == pytest.approx(7 / (1 + 2.0 + 1.0 + 2.5))
    # a draft that never drafts is as fast as plain decoding, however many sequences (each prefill pays once)
    unlucky = replay_draft("prompt-lookup", [torch.arange(20) + 100 * i for i in range(5)], 4, 4)
    assert sum(unlucky.drafted) == 0 and unlucky.sequences == 5
    assert unlucky.modelled_speedup([1.0, 1.5, 2.0, 2.5, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="widths up to 3"):
        stats.modelled_speedup([1.0, 1.5, 2.0])
    with pytest.raises(ValueError, match="no continuation"):
        replay_draft("prompt-lookup", [torch.arange(6)], 6, 2)
    from lincompile.runtime.medusa import MedusaConfig, MedusaHeads

    for medusa in ("medusa", MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=16), torch.zeros(16, 8))):
        with pytest.raises(ValueError, match="Medusa heads draft from the target's hidden states"):
            replay_draft(medusa, [torch.arange(12)], 6, 2)
