"""The n-gram draft: the table keeps the target's most frequent greedy prediction per context with its counts,
round-trips through its file; the draft mixes prompt lookup and the table token by token and stops where the chain
gets unlikely. Speculative decoding with it (plain greedy output, and the counts a replay gives): test_replay.py."""
import json

import pytest
import torch

from lincompile.runtime.drafts import DraftContext, make_draft
from lincompile.runtime.ngram import TABLE_FILE, NgramDraft, NgramTable, Prediction, build_ngram_table
from lincompile.runtime.sampling import SamplingConfig


def test_table_keeps_the_most_frequent_prediction_with_its_counts():
    ids = torch.tensor([[1, 2, 3, 1, 2], [5, 2, 7, 2, 9]])
    greedy = torch.tensor([[4, 6, 0, 4, 6], [0, 8, 0, 8, 0]])
    table = build_ngram_table(ids, greedy, 10, order=3)
    assert table.contexts[(2,)] == Prediction(6, 2, 4)  # 2 -> 6 twice, 2 -> 8 twice: the first seen wins
    assert table.contexts[(1, 2)] == Prediction(6, 2, 2) and table.contexts[(5, 2)] == Prediction(8, 1, 1)
    assert table.predict([5, 2]).token == 8  # the two-token context wins over the one-token one
    assert table.predict([9, 2]).token == 6  # unseen pair: the last token alone
    assert table.predict([4]) is None and table.predict([]) is None
    assert (3, 1) in table.contexts and (2, 5) not in table.contexts  # contexts never cross a block boundary
    assert {c: token for c, (token, _, _) in table.contexts.items() if len(c) == 3} == {
        (1, 2, 3): 0, (2, 3, 1): 4, (3, 1, 2): 6, (5, 2, 7): 0, (2, 7, 2): 8, (7, 2, 9): 0}
    assert table.predict([2, 7, 2]).token == 8 and table.predict([9, 5, 2]).token == 8  # seen and unseen triple
    assert table.order == 3 and table.counts_by_order() == {1: 6, 2: 7, 3: 6}
    assert build_ngram_table(ids, greedy, 10) == table  # order 3 by default
    assert build_ngram_table(ids, greedy, 10, order=4).counts_by_order() == {1: 6, 2: 7, 3: 6, 4: 4}
    assert build_ngram_table(ids, greedy, 10, order=1).order == 1


def test_confidence_is_count_over_seen_plus_one():
    assert Prediction(6, 2, 4).confidence == pytest.approx(2 / 5)
    assert Prediction(6, 1, 1).confidence == 0.5 and Prediction(6, 9, 9).confidence == 0.9
    assert Prediction(6, 0, 0).confidence == 1.0  # unknown counts (a version-1 file)


def test_longest_seen_context_wins():
    table = _table({(3,): 1, (2, 3): 4, (1, 2, 3): 5})
    assert table.predict([1, 2, 3]).token == 5
    assert table.predict([0, 2, 3]).token == 4  # unseen triple: the pair
    assert table.predict([0, 0, 3]).token == 1  # unseen pair too: the last token


def test_table_round_trips_and_refuses_other_files(tmp_path):
    table = build_ngram_table(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]), 5, {"tokens": 3})
    assert table.contexts[(1, 2, 3)] == Prediction(4, 1, 1)
    out = tmp_path / "table"
    table.save(out)
    assert NgramTable.load(out) == table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]  # no temp directory left beside it
    path = out / TABLE_FILE
    v1 = {"format": "lincompile-ngram", "version": 1, "vocab_size": 5, "metadata": {"tokens": 3},
          "unigram": [[3, 4]], "bigram": [[2, 3, 1]]}  # a file from before counts and 3-token contexts
    path.write_text(json.dumps(v1))
    assert NgramTable.load(out) == NgramTable(5, {(3,): Prediction(4, 0, 0), (2, 3): Prediction(1, 0, 0)},
                                              {"tokens": 3})
    path.write_text(json.dumps({**v1, "trigram": [[1, 2, 9, 3]]}))
    with pytest.raises(ValueError, match="outside its vocabulary of 5"):
        NgramTable.load(out)
    v2 = {"format": "lincompile-ngram", "version": 2, "vocab_size": 5}
    for row in ([1, 2], [1, 2, "3", 4], [1, 2, True, 4], [1, 2, 3, -1], [1, 2, 3, 2]):
        path.write_text(json.dumps({**v2, "contexts": [row]}))
        with pytest.raises(ValueError, match="not a context, token and counts"):
            NgramTable.load(out)
    for damaged in ({**v2, "contexts": 3}, {**v2, "contexts": None}, v2, {**v2, "contexts": [], "metadata": None},
                    {**v2, "contexts": [], "vocab_size": "x"}, {**v1, "unigram": [1, 2]}):
        path.write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match="lacks a vocab_size, metadata or list of rows"):
            NgramTable.load(out)
    path.write_text(json.dumps({**v2, "version": True, "contexts": []}))
    with pytest.raises(ValueError, match="not a lincompile-ngram"):
        NgramTable.load(out)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a lincompile-ngram"):
        NgramTable.load(out)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a lincompile-ngram"):
        NgramTable.load(out)
    with pytest.raises(FileNotFoundError, match="build-ngram"):
        NgramTable.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="beyond vocab_size"):
        build_ngram_table(torch.tensor([[1, 7]]), torch.tensor([[2, 3]]), 5)
    with pytest.raises(ValueError, match="order must be >= 1"):
        build_ngram_table(torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), 5, order=0)


def _table(tokens: dict[tuple[int, ...], int], count: int = 9, seen: int = 9) -> NgramTable:
    return NgramTable(100, {context: Prediction(token, count, seen) for context, token in tokens.items()})


def _propose(draft: NgramDraft, tokens: list[int], k: int) -> list[int]:
    return draft.propose(DraftContext(torch.tensor(tokens), None), k, SamplingConfig(), None).tokens.tolist()


def test_draft_takes_a_long_enough_lookup_match_else_the_table_token_by_token():
    table = _table({(9,): 10, (10,): 11, (11,): 12, (5,): 7, (4, 5): 9})
    draft = NgramDraft(table, min_confidence=0)
    # "3 4 5" was followed by "6 2 3 4 5": the lookup copies it, and the copy's own n-grams go on with it (the
    # table's 5 -> 7 is not asked)
    assert _propose(draft, [3, 4, 5, 6, 2, 3, 4, 5], 7) == [6, 2, 3, 4, 5, 6, 2]
    # a 2-token match is too short: the table's (4, 5) -> 9, then 10, 11, 12, until an unseen context
    assert _propose(draft, [1, 4, 5, 6, 2, 4, 5], 7) == [9, 10, 11, 12]
    assert _propose(NgramDraft(table, min_match=2, min_confidence=0), [1, 4, 5, 6, 2, 4, 5], 3) == [6, 2, 4]
    assert _propose(draft, [3, 9], 2) == [10, 11]  # at most k
    assert isinstance(make_draft(table, None), NgramDraft)


def test_draft_stops_where_the_chain_gets_unlikely():
    table = NgramTable(100, {(1,): Prediction(2, 9, 9), (2,): Prediction(3, 1, 1), (3,): Prediction(4, 9, 9)})
    # confidences 0.9, 0.5, 0.9: the product 0.9, 0.45, 0.405
    assert _propose(NgramDraft(table, min_confidence=0.5), [1], 8) == [2]
    assert _propose(NgramDraft(table, min_confidence=0.4), [1], 8) == [2, 3, 4]
    assert _propose(NgramDraft(table, min_confidence=0.99), [1], 8) == [2]  # the first token is always drafted
    lookup = NgramDraft(table, min_match=1, lookup_confidence=0.6, min_confidence=0.5)
    assert _propose(lookup, [7, 8, 7], 8) == [8]  # lookup tokens count lookup_confidence each: 0.6, then 0.36
    with pytest.raises(ValueError, match="min_match <= max_match"):
        NgramDraft(table, min_match=5)
    with pytest.raises(ValueError, match="lookup_confidence"):
        NgramDraft(table, lookup_confidence=0)


def test_a_draft_kept_across_calls_proposes_what_a_fresh_one_does():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 6, (200,), generator=g).tolist()
    table = build_ngram_table(torch.tensor([text[:100]]), torch.tensor([text[1:101]]), 6)
    kept = NgramDraft(table, min_confidence=0)
    for length in (20, 21, 25, 40, 41, 90, 30, 60):  # growing, then a context that is not a continuation
        assert _propose(kept, text[:length], 6) == _propose(NgramDraft(table, min_confidence=0), text[:length], 6)
    other = [5, 5, 5, 1, 2, 3, 1, 2]
    assert _propose(kept, other, 3) == _propose(NgramDraft(table, min_confidence=0), other, 3)


def test_a_damaged_table_file_is_named(tmp_path):
    (tmp_path / TABLE_FILE).write_text('{"format": "lincompile-ngram", "unigr')
    with pytest.raises(ValueError, match=f"{TABLE_FILE} is damaged"):
        NgramTable.load(tmp_path)
