"""Tests for lincompile.train.data (the default corpus is fetched into the real cache once, ~5 MB)."""

from __future__ import annotations


import pytest
import torch

from lincompile.assets import corpus_dir
from lincompile.train import data
from lincompile.train.data import HELDOUT_WORKS, load_texts, token_blocks


class CharTokenizer:
    """Deterministic stand-in: one token per character, eos id 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        assert not add_special_tokens
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_split_is_disjoint_and_covers_every_work():
    split = data.shakespeare_split()
    stems = {p.stem for p in corpus_dir().glob("*.txt")}
    assert set(split.train).isdisjoint(split.heldout)
    assert set(split.train) | set(split.heldout) == stems and len(stems) == 42
    assert split.heldout == tuple(sorted(HELDOUT_WORKS))
    assert list(split.train) == sorted(split.train)


def test_heldout_fraction_and_content():
    train, heldout = load_texts("train"), load_texts("heldout")
    assert len(heldout) == len(HELDOUT_WORKS) and len(train) == 38
    frac = sum(map(len, heldout)) / (sum(map(len, train)) + sum(map(len, heldout)))
    assert 0.08 <= frac <= 0.11
    assert heldout[0].startswith("HAMLET, PRINCE OF DENMARK")
    assert not any("To be, or not to be" in t for t in train) and "To be, or not to be" in heldout[0]
    assert not any("Project Gutenberg" in t for t in train + heldout)
    assert load_texts("heldout") == heldout  # stable order


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        load_texts("test")


def test_strip_gutenberg():
    raw = ("The Project Gutenberg EBook of X\r\nlicence\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
           "Body line 1\r\nBody line 2\r\n\r\nEnd of the Project Gutenberg EBook of X\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlegal footer\r\n")
    assert data.strip_gutenberg(raw) == "Body line 1\nBody line 2"
    assert data.strip_gutenberg("  plain text\n") == "plain text"


def test_every_book_of_a_joined_gutenberg_file_is_kept():
    book = ("*** START OF THE PROJECT GUTENBERG EBOOK {0} ***\n{0} text\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK {0} ***\n")
    raw = "header\n" + book.format("A") + "licence\n" + book.format("B") + "footer\n"
    assert data.strip_gutenberg(raw) == "A text\n\nB text"


def test_a_file_of_one_line_is_split_by_characters(tmp_path):
    """One line (a minified dump, say) used to leave train empty: its last tenth of characters is held out."""
    f = tmp_path / "one_line.txt"
    words = [f"w{i:03d}" for i in range(200)]
    f.write_text(" ".join(words))
    train, heldout = load_texts("train", f)[0], load_texts("heldout", f)[0]
    assert train.split() + heldout.split() == words
    assert 0.08 < len(heldout) / len(f.read_text()) < 0.12
    f.write_text("ab " + "x" * 1000)  # its only space far before the cut: cut where the tenth begins, mid-word
    assert len(load_texts("train", f)[0]) == 902 and len(load_texts("heldout", f)[0]) == 101


def test_user_single_file_holds_out_last_tenth_of_lines(tmp_path):
    f = tmp_path / "corpus.txt"
    lines = [f"line {i}" for i in range(100)]
    f.write_text("\n".join(lines) + "\n")
    train, heldout = load_texts("train", f), load_texts("heldout", str(f))
    assert train == ["\n".join(lines[:90])] and heldout == ["\n".join(lines[90:])]


def test_user_directory_with_split_subdirs(tmp_path):
    (tmp_path / "train" / "sub").mkdir(parents=True)
    (tmp_path / "heldout").mkdir()
    (tmp_path / "train" / "b.txt").write_text("bee")
    (tmp_path / "train" / "sub" / "a.txt").write_text("ay")
    (tmp_path / "train" / "ignored.md").write_text("no")
    (tmp_path / "heldout" / "c.txt").write_text("sea")
    assert load_texts("train", tmp_path) == ["bee", "ay"]
    assert load_texts("heldout", tmp_path) == ["sea"]


def test_user_plain_directory_splits_each_file(tmp_path):
    for name in ("x", "y"):
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{name}{i}" for i in range(20)))
    assert load_texts("heldout", tmp_path) == ["x18\nx19", "y18\ny19"]
    assert load_texts("train", tmp_path)[1].endswith("y17")


def test_missing_or_empty_user_data(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        load_texts("train", missing)
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_texts("heldout", tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no non-empty text"):
        load_texts("train", tmp_path / "d")


def test_token_blocks_layout_and_determinism():
    tok = CharTokenizer()
    texts = ["abcde", "fgh", "ij"]  # stream: abcde 0 fgh 0 ij = 12 tokens
    blocks = token_blocks(tok, texts, block_size=4)
    assert blocks.dtype == torch.long and blocks.shape == (3, 4)
    expected = [ord(c) for c in "abcde"] + [0] + [ord(c) for c in "fgh"] + [0] + [ord(c) for c in "ij"]
    assert blocks.flatten().tolist() == expected
    assert token_blocks(tok, texts, 5).shape == (2, 5)  # tail of 2 tokens dropped
    assert torch.equal(token_blocks(tok, texts, 5), token_blocks(tok, iter(texts), 5))
    assert torch.equal(token_blocks(tok, texts, 4, max_blocks=2), blocks[:2])
    assert token_blocks(tok, texts, 4, max_blocks=100).shape == (3, 4)
    with_empty = ["", "abcde", "", "fgh", "ij"]  # empty texts add nothing, one text at a time or in batches
    assert torch.equal(token_blocks(tok, with_empty, 4), blocks)
    assert torch.equal(token_blocks(tok, with_empty, 4, max_blocks=3), blocks)
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(tok, ["ab"], 3)
    with pytest.raises(ValueError):
        token_blocks(tok, texts, 0)


def test_heldout_blocks_default_corpus_with_char_tokenizer():
    blocks = data.heldout_blocks(CharTokenizer(), block_size=64, max_blocks=10)
    assert blocks.shape == (10, 64)
    assert "".join(map(chr, blocks[0].tolist())).startswith("HAMLET")


@pytest.mark.slow
def test_heldout_blocks_real_tokenizer():
    from transformers import AutoTokenizer

    from lincompile.assets import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    a = data.heldout_blocks(tok, block_size=256)
    b = data.heldout_blocks(tok, block_size=256, max_blocks=8)
    assert 500 < a.shape[0] < 700 and a.shape[1] == 256
    assert torch.equal(a[:8], b) and torch.equal(a, data.heldout_blocks(tok, block_size=256))
    assert int(a.max()) < len(tok) and int(a.min()) >= 0
    assert tok.decode(a[0, :10]).startswith("HAMLET")
    assert (a == tok.eos_token_id).sum() == len(HELDOUT_WORKS) - 1  # eos only between works
