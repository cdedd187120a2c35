"""bench/quality.py end to end on the real model (a --quick budget): methods trained in two worker processes
(`--jobs 2`) give the numbers one process gives, listed in the order asked for, with their ratios; a worker's
error reaches the main process whole."""
import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


def _run(tmp_path: Path, jobs: int) -> dict:
    out = tmp_path / f"jobs{jobs}"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--methods", "linear-elu", "softmax", "--jobs", str(jobs),
                    "--no-progress", "--out", str(out)], check=True, capture_output=True,
                   text=True, timeout=900)
    return json.loads((out / "quality_cpu_quick.json").read_text())


@pytest.mark.slow
def test_jobs_give_the_same_results_in_the_asked_order(tmp_path):
    parallel, serial = _run(tmp_path, 2), _run(tmp_path, 1)
    assert parallel["complete"] and [r["method"] for r in parallel["runs"]] == ["linear-elu", "softmax"]
    for a, b in zip(parallel["runs"], serial["runs"]):
        assert a["method"] == b["method"] and abs(a["ppl"] / b["ppl"] - 1) < 1e-3
        assert a["ratio_to_softmax_finetuned"] == pytest.approx(a["ppl"] / parallel["runs"][1]["ppl"])
    assert parallel["runs"][1]["ratio_to_softmax_finetuned"] == 1.0


@pytest.mark.slow
def test_bad_jobs_and_repeated_methods_are_refused(tmp_path):
    for args, message in ((["--jobs", "0"], "--jobs must be >= 1"), (["--methods", "softmax", "softmax"], "twice")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr


class _TwoArgumentError(Exception):
    """Like torch.export's UserError: pickles, but cannot be rebuilt from its args."""

    def __init__(self, kind: int, msg: str) -> None:
        super().__init__(msg)


def test_a_worker_error_comes_back_as_text(monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    def fail(*args):
        raise _TwoArgumentError(1, "found two different devices")

    monkeypatch.setattr(quality, "train_one", fail)
    monkeypatch.setitem(quality._WORKER, "args", SimpleNamespace())
    monkeypatch.setitem(quality._WORKER, "setup", SimpleNamespace(model=None, captured=None, blocks=None, held=None))
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(_TwoArgumentError(1, "x")))
    with pytest.raises(RuntimeError) as error:
        quality._train_in_worker("hedgehog")
    back = pickle.loads(pickle.dumps(error.value))
    assert "hedgehog: _TwoArgumentError: found two different devices" in str(back) and "Traceback" in str(back)
