"""bench/quality_report.py: result files merged at one budget, only when they were evaluated and trained alike;
the same run in two files must agree; a method trained with two splits keeps both; the verdict can go either way."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality_report.py"
RESULTS = SCRIPT.parent / "results"
spec = importlib.util.spec_from_file_location("quality_report", SCRIPT)
report = importlib.util.module_from_spec(spec)
sys.modules["quality_report"] = report  # its dataclasses look their module up
spec.loader.exec_module(report)


def _run(method: str, role: str, stage1: int, ppls: list[float]) -> dict:
    curve = [{"tokens": 100 * i, "step": i, "ppl": p} for i, p in enumerate(ppls)]
    return {"method": method, "role": role, "stage1_steps": stage1, "tokens": curve[-1]["tokens"],
            "ppl": ppls[-1], "curve": curve}


def _write(path: Path, runs: list[dict], lr: float = 5e-4, heldout: int = 1016, device: str = "cpu",
           **budget: int) -> Path:
    path.write_text(json.dumps({"model": "m", "ppl_original": 30.0, "heldout_tokens": heldout, "runs": runs,
                                "device": device,
                                "budget": {"batch_size": 4, "block_size": 128, "lr": lr, "seed": 0, **budget}}))
    return path


@pytest.fixture
def files(tmp_path):
    a = _write(tmp_path / "a.json", [_run("augmented", "ours", 20, [900, 80, 50, 40]),
                                     _run("hedgehog", "baseline", 20, [300, 60, 55, 52])])
    b = _write(tmp_path / "b.json", [_run("hedgehog", "baseline", 160, [300, 90, 45, 44, 43]),
                                     _run("augmented", "ours", 20, [900, 80, 50, 40, 39])])
    return a, b


def test_runs_are_taken_at_the_budget_and_split_methods_keep_both(files):
    rows, short = report.rows_at(report.load(list(files)), 300, 0)
    assert [(r.label, r.ppl) for r in rows] == [("augmented", 40), ("hedgehog (160 AT steps)", 44),
                                                ("hedgehog (20 AT steps)", 52)]
    assert short == []
    assert report.verdict(rows, "augmented").startswith("augmented leads every plain baseline (2 runs): 40.0")
    rows, short = report.rows_at(report.load(list(files)), 400, 0)
    assert [r.label for r in rows] == ["augmented", "hedgehog"] and short == ["augmented (a.json: 300 tokens)",
                                                                              "hedgehog (a.json: 300 tokens)"]


def test_a_window_averages_the_evaluations_up_to_the_budget(files):
    rows, _ = report.rows_at(report.load(list(files)), 300, 100)
    assert {r.label: r.ppl for r in rows} == {"augmented": 45, "hedgehog (160 AT steps)": 44.5,
                                              "hedgehog (20 AT steps)": 53.5}
    assert "does NOT lead every plain baseline: hedgehog (160 AT steps) 44.5 against 45.0" in report.verdict(
        rows, "augmented")


def test_files_trained_or_evaluated_differently_are_refused(tmp_path, files):
    other = _write(tmp_path / "c.json", [_run("taylor", "baseline", 20, [1, 2])], lr=1e-3)
    with pytest.raises(report.ReportError, match="c.json was trained with lr = 0.001"):
        report.load([files[0], other])
    other = _write(tmp_path / "d.json", [_run("taylor", "baseline", 20, [1, 2])], heldout=2048)
    with pytest.raises(report.ReportError, match="heldout_tokens = 2048"):
        report.load([files[0], other])
    other = _write(tmp_path / "g.json", [_run("taylor", "baseline", 20, [1, 2])], device="cuda")  # bf16 training
    with pytest.raises(report.ReportError, match="g.json has device = cuda, a.json has cpu"):
        report.load([files[0], other])
    warm = [_write(tmp_path / f"w{n}.json", [_run("taylor", "baseline", 20, [1, 2])], warmup_steps=n) for n in (5, 10)]
    with pytest.raises(report.ReportError, match="w10.json was trained with warmup_steps = 10"):
        report.load(warm)
    assert len(report.load([files[0], *warm[:1]])) == 2  # a file that does not record its warm-up is not judged by it
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(report.ReportError, match="not a bench/quality.py result file"):
        report.load([tmp_path / "e.json"])


def test_the_same_run_must_agree_across_files(tmp_path, files):
    drift = _write(tmp_path / "f.json", [_run("augmented", "ours", 20, [900, 80, 50, 41])])
    with pytest.raises(report.ReportError, match="the same run should agree"):
        report.rows_at(report.load([files[0], drift]), 300, 0)


def test_the_command_prints_the_table_and_draws_the_curves(tmp_path, files):
    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, files), "--at", "300", "--markdown", "--plot",
                           str(png)], capture_output=True, text=True, timeout=120, check=True)
    assert "| hedgehog (160 AT steps) | baseline | 44.0 | 1.47x | 1.10x | b.json |" in proc.stdout
    assert png.stat().st_size > 1000
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, files), "--at", "250"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no run was evaluated at 250 tokens" in proc.stderr


def test_a_file_stopped_midway_is_named(tmp_path, files):
    stopped = json.loads(files[1].read_text())
    files[1].write_text(json.dumps({**stopped, "complete": False}))
    assert report.unfinished(report.load(list(files))) == ["b.json"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, files), "--at", "300"], capture_output=True,
                          text=True, timeout=120, check=True)
    assert "stopped before finishing (complete: false): b.json" in proc.stdout


def test_the_readme_comparison_holds_on_the_committed_results():
    """The README's equal-recipe table: every plain baseline's 20 + 460 run against `augmented`'s at 246k."""
    files = sorted(RESULTS.glob("quality_cpu_16x_*_stage1-20.json")) + [RESULTS / "quality_cpu_32x_stage1-20.json"]
    rows, _ = report.rows_at(report.load(files), 245760, 0)
    baselines = {r.method for r in rows if r.role == "baseline"}
    assert baselines == set(report_baselines())
    assert report.verdict(rows, "augmented").startswith("augmented leads every plain baseline")


def report_baselines() -> tuple[str, ...]:
    quality = importlib.util.spec_from_file_location("quality_bench", SCRIPT.parent / "quality.py")
    module = importlib.util.module_from_spec(quality)
    quality.loader.exec_module(module)
    return module.BASELINES
