"""`lincompile demo` runs end to end on the real model and reports measured numbers."""
import json

import pytest

from lincompile.cli.main import main


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_its_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--context", "64", "--steps", "2", "--eval-blocks", "1"]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s @ 64: lincompile (onnxruntime)" in out and "reproduce: lincompile demo" in out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["sites"] == 30 and result["state_bytes"] < result["kv_cache_bytes_8k"]
    assert all(result[k] > 0 for k in ("tokens_per_s_hf_kv_cache", "tokens_per_s_lincompile_torch",
                                       "tokens_per_s_lincompile_onnxruntime", "ppl_original"))
    assert result["speculative_identical_to_greedy"] and result["accepted_per_call"] >= 0
    assert (tmp_path / "memory.png").stat().st_size > 0 and (tmp_path / "onnx" / "model.onnx").is_file()
