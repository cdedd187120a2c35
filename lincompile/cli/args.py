"""argparse value types that refuse out-of-range numbers at parse time, with the option named by argparse
(`argument --batch-size: must be >= 1, got 0`), before any model loads."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _bounded(kind: type, low: float, strict: bool) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value

    return parse


#: an int >= 1 (counts, sizes)
positive_int = _bounded(int, 1, strict=False)
#: an int >= 0 (step counts where 0 skips, "every N" where 0 means never)
nonnegative_int = _bounded(int, 0, strict=False)
#: a float > 0 (learning rates)
positive_float = _bounded(float, 0.0, strict=True)
#: a float >= 0 (weights, decay, clipping where 0 is off)
nonnegative_float = _bounded(float, 0.0, strict=False)


def probability(text: str) -> float:
    """A float in (0, 1] (`--top-p`)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def draft_tokens(text: str) -> int:
    """Drafted tokens per verify call (`-k`): 1 <= k < VERIFY_WINDOW, the most one verify call scores."""
    from lincompile.passes.linearize import VERIFY_WINDOW

    value = positive_int(text)
    if value >= VERIFY_WINDOW:
        raise argparse.ArgumentTypeError(f"must be < {VERIFY_WINDOW} (one verify call scores at most "
                                         f"{VERIFY_WINDOW} tokens), got {text}")
    return value


def opset_type(text: str) -> int:
    """An ONNX opset the export can write: >= 18 (the lowering's minimum)."""
    from lincompile.backends.onnx import MIN_OPSET

    return _bounded(int, MIN_OPSET, strict=False)(text)


def positive_int_list(text: str) -> list[int]:
    """Comma-separated ints >= 1 (`--lengths 1024,2048`)."""
    return [positive_int(item.strip()) for item in text.split(",")]


def given_flags(options: dict[str, object]) -> str:
    """The flags of `options` ({flag: parsed value}) the command line gave, comma-separated: a value other than
    None (an option's "not given" default) or False (an unset store_true)."""
    return ", ".join(flag for flag, value in options.items() if value is not None and value is not False)
