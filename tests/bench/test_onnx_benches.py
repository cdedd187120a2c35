"""bench/onnx_prefill.py and bench/onnx_quantize.py end to end on the real model with small budgets: SmolLM2
exported with chunks inside the graph and with 8-bit weights, against its plain export."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, out: Path, *argv: str) -> dict:
    subprocess.run([sys.executable, str(BENCH / script), "--threads", "1", "--out", str(out), *argv], check=True,
                   capture_output=True, text=True, timeout=900)
    (path,) = out.glob(f"{script.removesuffix('.py')}_*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_chunked_export_of_smollm2_agrees_with_the_plain_one(tmp_path):
    """A 130-token call takes the chunked branch (64 + 64 + 2 tokens): logits within 1e-3 of the plain export's,
    the same greedy decode, and each export's own prefill call size."""
    result = _run("onnx_prefill.py", tmp_path, "--contexts", "130", "--call-sizes", "64", "--rounds", "3",
                  "--repeats", "1")
    assert result["one_call"][0]["max_logit_difference"] < 1e-3
    assert result["decode"]["greedy_tokens_agree"]
    assert result["prefill_chunk_size"] == {"whole": 128, "chunked": 512}
    assert result["command"].startswith("python ") and "onnx_prefill.py" in result["command"]


@pytest.mark.slow
def test_8_bit_smollm2_keeps_its_perplexity(tmp_path):
    result = _run("onnx_quantize.py", tmp_path, "--max-blocks", "2", "--block-size", "64", "--rounds", "3",
                  "--prefill", "16")
    forms = result["forms"]
    assert forms["int8"]["ppl"] / forms["float"]["ppl"] < 1.02
    assert forms["int8"]["megabytes"] / forms["float"]["megabytes"] < 0.6
