"""bench/attention_kernels.py on the CPU (issue 4: it runs anywhere and prints its table of ratios); a --quick run
writes its own files, never the committed full run's."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "attention_kernels.py"


def test_cpu_quick_run_prints_ratios_and_writes_its_own_file(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--lengths", "64,128", "--repeats", "1",
                          "--threads", "1", "--out", str(tmp_path)], check=True, capture_output=True, text=True,
                         timeout=300)
    assert "sdpa/chunked" in run.stdout and "verify/call sdpa/chain" in run.stdout and "T=128" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_cpu_quick.json", "kernels_cpu_quick.png"]
    result = json.loads((tmp_path / "kernels_cpu_quick.json").read_text())
    assert result["complete"] and [row["T"] for row in result["rows"]] == [64, 128]
    assert all(ms > 0 for row in result["rows"] for ms in row["ms"].values() if ms is not None)
