"""The n-gram draft: the table keeps the target's most frequent greedy prediction per context, round-trips
through its file, fills a prompt-lookup chain, and speculative decoding with it stays the plain greedy output."""
import json

import pytest
import torch

import lincompile
from lincompile.runtime.drafts import DraftContext, make_draft
from lincompile.runtime.ngram import NgramDraft, NgramTable, build_ngram_table
from lincompile.runtime.sampling import SamplingConfig
from lincompile.runtime.speculative import speculative_generate
from lincompile.testing.tiny import tiny_model


def test_table_keeps_the_most_frequent_prediction_and_prefers_two_tokens():
    ids = torch.tensor([[1, 2, 3, 1, 2], [5, 2, 7, 2, 9]])
    greedy = torch.tensor([[4, 6, 0, 4, 6], [0, 8, 0, 8, 0]])
    table = build_ngram_table(ids, greedy, 10)
    assert table.unigram[2] == 6  # 2 -> 6 twice, 2 -> 8 twice: the first seen wins
    assert table.bigram[(1, 2)] == 6 and table.bigram[(5, 2)] == 8
    assert table.next_token([5, 2]) == 8  # the bigram wins over the unigram
    assert table.next_token([9, 2]) == 6  # unseen bigram: the unigram
    assert table.next_token([4]) is None and table.next_token([]) is None
    assert (3, 1) in table.bigram and (2, 5) not in table.bigram  # contexts never cross a block boundary
    assert table.trigram == {(1, 2, 3): 0, (2, 3, 1): 4, (3, 1, 2): 6, (5, 2, 7): 0, (2, 7, 2): 8, (7, 2, 9): 0}
    assert table.next_token([2, 7, 2]) == 8 and table.next_token([9, 5, 2]) == 8  # seen and unseen trigram


def test_longest_seen_context_wins():
    table = NgramTable(10, {3: 1}, {(2, 3): 4}, {}, {(1, 2, 3): 5})
    assert table.next_token([1, 2, 3]) == 5
    assert table.next_token([0, 2, 3]) == 4  # unseen trigram: the bigram
    assert table.next_token([0, 0, 3]) == 1  # unseen bigram too: the unigram


def test_table_round_trips_and_refuses_other_files(tmp_path):
    table = build_ngram_table(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]), 5, {"tokens": 3})
    assert table.trigram == {(1, 2, 3): 4}
    out = tmp_path / "table"
    table.save(out)
    assert NgramTable.load(out) == table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]  # no temp directory left beside it
    tmp_path = out
    payload = json.loads((tmp_path / "ngram.json").read_text())
    del payload["trigram"]  # a file written before trigrams existed: loads, and backs off to bigrams
    (tmp_path / "ngram.json").write_text(json.dumps(payload))
    assert NgramTable.load(tmp_path) == NgramTable(5, table.unigram, table.bigram, {"tokens": 3})
    payload["trigram"] = [[1, 2, 9, 3]]
    (tmp_path / "ngram.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="outside its vocabulary of 5"):
        NgramTable.load(tmp_path)
    (tmp_path / "ngram.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a lincompile-ngram"):
        NgramTable.load(tmp_path)
    (tmp_path / "ngram.json").write_text(json.dumps({"format": "lincompile-ngram", "version": 1, "vocab_size": 5,
                                                     "unigram": [[1, 9]], "bigram": []}))
    with pytest.raises(ValueError, match="outside its vocabulary of 5"):
        NgramTable.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="build-ngram"):
        NgramTable.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="beyond vocab_size"):
        build_ngram_table(torch.tensor([[1, 7]]), torch.tensor([[2, 3]]), 5)


def test_draft_is_prompt_lookup_then_the_table():
    table = NgramTable(100, {9: 10, 10: 11, 11: 12}, {(4, 5): 9})
    draft = NgramDraft(table)
    context = DraftContext(torch.tensor([1, 4, 5, 6, 2, 4, 5]), None)
    # prompt lookup: "4 5" was followed by "6 2 4 5"; the table continues after "... 4 5" with 9, 10, ...
    proposal = draft.propose(context, 7, SamplingConfig(), None)
    assert proposal.tokens.tolist() == [6, 2, 4, 5, 9, 10, 11]
    assert draft.propose(DraftContext(torch.tensor([3, 9]), None), 5, SamplingConfig(), None).tokens.tolist() == [
        10, 11, 12]  # no lookup match: the table alone, until a context it never saw
    assert isinstance(make_draft(table, None), NgramDraft)


def test_speculative_output_with_the_table_is_plain_greedy():
    torch.manual_seed(0)
    target = lincompile.optimize(tiny_model("llama"), "augmented")
    g = torch.Generator().manual_seed(0)
    corpus = torch.randint(3, 128, (4, 32), generator=g)
    table = build_ngram_table(corpus, target(corpus).logits.argmax(-1), 128)
    for seed in range(2):
        prompt = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(seed))
        plain = target.generate(prompt, 24, eos_token_id=None)
        out, stats = speculative_generate(target, prompt, 24, table, 4)
        assert torch.equal(out, plain)
        assert stats.drafted > 0
    with pytest.raises(ValueError, match="vocabulary has 64 tokens"):
        speculative_generate(target, prompt, 4, NgramTable(64, {}, {}), 4)


def test_a_damaged_table_file_is_named(tmp_path):
    from lincompile.runtime.ngram import TABLE_FILE

    (tmp_path / TABLE_FILE).write_text('{"format": "lincompile-ngram", "unigr')
    with pytest.raises(ValueError, match=f"{TABLE_FILE} is damaged"):
        NgramTable.load(tmp_path)
