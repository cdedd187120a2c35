"""`LincompileWarning`: the category of every warning lincompile raises, so that callers can filter them
(`warnings.filterwarnings("ignore", category=LincompileWarning)`) and the CLI can print them as its own lines."""
from __future__ import annotations


class LincompileWarning(UserWarning):
    """A warning raised by lincompile (not by a library it calls)."""
