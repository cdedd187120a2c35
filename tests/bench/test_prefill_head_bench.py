"""bench/prefill_head.py end to end on the real model with a small budget: prefill with the LM head on the last
token and on every token, in PyTorch and onnxruntime, the same last logits."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
def test_the_prefill_head_bench_times_both_heads_in_both_runtimes(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "prefill_head.py"), "--threads", "1", "--out", str(tmp_path),
                    "--contexts", "130", "--repeats", "1"], check=True, capture_output=True, text=True, timeout=900)
    (path,) = tmp_path.glob("prefill_head_*.json")
    result = json.loads(path.read_text())
    assert [(row["runtime"], row["context"]) for row in result["rows"]] == [("torch", 130), ("onnxruntime", 130)]
    for row in result["rows"]:
        assert row["s_last_token"] > 0 and row["s_every_token"] > 0 and row["speedup"] > 0
        assert row["max_logit_difference"] < 1e-3
    assert result["prefill_chunk_size"] == {"torch": 512, "onnxruntime": 128}
    assert "prefill_head.py" in result["command"]
