"""A command's closing summary, one format for every command."""
from __future__ import annotations

import json
from typing import Any


def format_value(value: Any) -> str:
    """A summary value as text: floats to 4 significant digits, None as '-', booleans as yes/no, a dict as
    `key=value` pairs; anything else as str()."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key}={format_value(item)}" for key, item in value.items())
    return str(value)


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """One JSON object (`--json`: the values as they are), else one `key  value` line per entry, keys aligned."""
    if as_json:
        print(json.dumps(summary))
        return
    width = max((len(key) for key in summary), default=0) + 2
    for key, value in summary.items():
        print(f"{key:<{width}}{format_value(value)}")
