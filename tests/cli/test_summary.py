"""Every command's closing summary: JSON as it is, or aligned `key value` lines that read as text."""
from __future__ import annotations

import json

from lincompile.cli.summary import format_value, print_summary


def test_values_read_as_text():
    assert [format_value(v) for v in (None, True, False, 0.123456, 3, "a")] == ["-", "yes", "no", "0.1235", "3", "a"]
    assert format_value({1: 717, 2: None, "ppl": 52.3456}) == "1=717, 2=-, ppl=52.35"


def test_text_lines_are_aligned_and_json_keeps_the_values(capsys):
    summary = {"out": "runs/x", "contexts_by_order": {1: 2}, "ppl": None}
    print_summary(summary, as_json=False)
    assert capsys.readouterr().out.splitlines() == ["out                runs/x", "contexts_by_order  1=2",
                                                   "ppl                -"]
    print_summary(summary, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"out": "runs/x", "contexts_by_order": {"1": 2}, "ppl": None}
