"""`LincompileWarning`: the category of every warning lincompile raises, so that callers can filter them
(`warnings.filterwarnings("ignore", category=LincompileWarning)`) and the CLI can print them as its own lines.
`warn` raises one, attributed to the caller's own line."""
from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = tuple(os.path.dirname(os.path.abspath(file)) + os.sep for file in (__file__, torch.__file__))


class LincompileWarning(UserWarning):
    """A warning raised by lincompile (not by a library it calls)."""


def warn(message: str) -> None:
    """Warn with `LincompileWarning` at the first frame outside lincompile and torch: the line of the caller's
    code that led here (through `nn.Module.__call__` or `torch.compile` too), whichever lincompile function
    noticed it."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, LincompileWarning, stacklevel=level + 1)
