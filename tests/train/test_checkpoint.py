"""Checkpoints are atomic and resuming reproduces the uninterrupted run (SIGKILL mid-run, crash mid-write)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from lincompile.train import checkpoint as ckpt
from lincompile.train.trainer import TrainConfig, batch_indices, train

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_history(got: list[dict], expected: list[dict], atol: float) -> None:
    assert [(r["step"], r["stage"], r["lr"]) for r in got] == [(r["step"], r["stage"], r["lr"]) for r in expected]
    for a, b in zip(got, expected):
        assert set(a) == set(b)
        for key in set(a) - {"step", "stage", "lr"}:
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=atol, rtol=0,
                                       msg=f"step {a['step']} {key}: {a[key]} != {b[key]}")


def assert_same_params(linear, expected: dict[str, torch.Tensor]) -> None:
    got = dict(linear.graph.named_parameters())
    assert set(got) == set(expected)
    for name, p in got.items():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-5, rtol=0, msg=name)


def test_train_config_roundtrips_and_validates():
    config = TrainConfig(stage1_steps=3, lora_targets=["c_attn", "attn.c_proj"], kl_weight=0.25)
    assert TrainConfig.from_json(config.to_json()) == config
    assert config.lora_targets == ("c_attn", "attn.c_proj")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="lora_rank=0"):
        TrainConfig(full=True)
    for bad in (dict(lr=-1e-4), dict(stage1_lr=-1e-3), dict(weight_decay=float("nan")), dict(max_grad_norm=-1.0)):
        with pytest.raises(ValueError, match=rf"\['{next(iter(bad))}'\] must be >= 0"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="eval_blocks must be >= 0"):
        TrainConfig(eval_blocks=-1)
    with pytest.raises(ValueError, match="kl_weight >= 0, got 256, 2 and nan"):  # NaN made every loss NaN
        TrainConfig(kl_weight=float("nan"))
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        TrainConfig(lora_alpha=float("nan"))


def test_data_order_depends_only_on_seed_and_step():
    first = [batch_indices(7, s, 5, 12) for s in range(6)]  # 30 rows: epochs 0, 1 and half of 2
    assert all(torch.equal(a, batch_indices(7, s, 5, 12)) for s, a in enumerate(first))
    stream = torch.cat(first)
    assert sorted(stream[:12].tolist()) == list(range(12)) and sorted(stream[12:24].tolist()) == list(range(12))
    assert not torch.equal(stream[:12], stream[12:24])
    assert not torch.equal(batch_indices(8, 0, 5, 12), first[0])


def test_resume_after_sigkill_matches_uninterrupted_run(request, tmp_path, worker):
    """Killed after step 5 (checkpoints at 2, 3 (end of stage 1) and 4): resume from 4, inside stage 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, str(worker.WORKER), "kill", str(tmp_path), "5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reference, params = request.getfixturevalue("reference_run")  # computed while the subprocess runs
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, output
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.name == "step-00000004"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003", "step-00000004"]

    linear, blocks, held = worker.build()
    result = train(linear, blocks, worker.config(), tmp_path, eval_blocks=held, resume=True, progress=False)
    assert_same_history(result.history, reference.history, atol=1e-5)
    assert [e["step"] for e in result.evals] == [e["step"] for e in reference.evals]
    torch.testing.assert_close(torch.tensor([e["ppl"] for e in result.evals]),
                               torch.tensor([e["ppl"] for e in reference.evals]), atol=1e-4, rtol=0)
    assert_same_params(linear, params)


def test_crash_while_writing_keeps_previous_checkpoint(monkeypatch, tmp_path, worker, reference_run):
    """A crash inside the write of step 3's checkpoint, with no cleanup (as under SIGKILL): step 2 stays the
    newest, loads, and resuming from it reproduces the uninterrupted run."""
    write_json = ckpt._write_json

    def crashing(path, data):
        if path.parent.name.startswith(".tmp-step-00000003") and path.name == "train_config.json":
            raise RuntimeError("simulated crash")
        write_json(path, data)

    monkeypatch.setattr(ckpt, "_write_json", crashing)
    monkeypatch.setattr(ckpt, "_discard", lambda path: None)  # a killed process cleans nothing up
    linear, blocks, held = worker.build()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(linear, blocks, worker.config(), tmp_path, eval_blocks=held, progress=False)
    root = tmp_path / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-00000003")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002"]
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(root))
    assert loaded.step == 2 and loaded.state["stage"] == 1
    assert set(loaded.tensors) == {f"lincompile_params.site_{i}.{n}" for i in (0, 1) for n in ("alpha", "conv_weight")}
    with pytest.raises(ValueError, match="not a complete"):
        ckpt.load_checkpoint(root / leftovers[0])

    monkeypatch.undo()
    reference, params = reference_run
    linear, blocks, held = worker.build()
    result = train(linear, blocks, worker.config(), tmp_path, eval_blocks=held, resume=True, progress=False)
    assert_same_history(result.history, reference.history, atol=1e-5)
    assert_same_params(linear, params)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")], "stale temp dirs are removed"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000006", "step-00000007"]


def test_resume_refuses_a_changed_config(tmp_path, worker):
    linear, blocks, held = worker.build()
    config = worker.config(stage1_steps=1, stage2_steps=0)
    train(linear, blocks, config, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"changed in \['lr'\]"):
        train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=0, lr=0.5), tmp_path, resume=True,
              progress=False)


def test_checkpoints_have_ordinary_permissions(usual_umask, tmp_path):
    from lincompile.train.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {}, {}, {}, {})
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {0o644}


def test_a_crash_while_pruning_leaves_no_partial_checkpoint(monkeypatch, tmp_path):
    """An old checkpoint is renamed before it is deleted: killed during the delete, every `step-*` left is whole."""
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {}, {}, {})

    def killed(path):
        for child in sorted(path.rglob("*"), reverse=True)[:1]:  # one file gone, then the process dies
            child.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_discard", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {}, {}, {}, {})
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(2), ckpt.checkpoint_name(3)]
    for path in ckpt.list_checkpoints(tmp_path):
        assert ckpt.load_checkpoint(path).tensors["w"].shape == (2,)
    ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, {}, {}, {}, {})  # sweeps what the crash left
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.checkpoint_name(3), ckpt.checkpoint_name(4)]


def test_a_copied_or_renamed_checkpoint_loads(tmp_path):
    """`--init`, `linearized(weights=)` and `ship` take a checkpoint by path, under whatever name it was copied to."""
    import shutil

    path = ckpt.save_checkpoint(tmp_path / "run", 3, {"w": torch.ones(2)}, {}, {}, {}, {})
    copy = shutil.copytree(path, tmp_path / "best")
    assert torch.equal(ckpt.load_checkpoint(copy).tensors["w"], torch.ones(2))
    (copy / "rng.pt").unlink()
    with pytest.raises(ValueError, match="missing rng.pt"):
        ckpt.load_checkpoint(copy)


def test_cuda_generators_are_restored_for_the_devices_visible_now(monkeypatch):
    """A run saved with 8 GPUs visible resumes with 1 (CUDA_VISIBLE_DEVICES): one generator to restore, not 8."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    state = {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
             "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    ckpt.restore_rng(state)
    assert restored == [(0, 0)]


@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_a_diverged_step_stops_the_run_before_any_checkpoint_of_it(tmp_path, monkeypatch, worker, broken):
    """A NaN loss, or a finite loss with an infinite gradient (clipping makes it NaN weights), stops the run before
    the step is taken or checkpointed (pruning would delete the good checkpoints)."""
    from lincompile.train import trainer

    if broken == "loss":
        run_step = trainer._run_step
        monkeypatch.setattr(trainer, "_run_step", lambda stage, blocks, indices, config, parallel, lr: (
            [float("nan")] + run_step(stage, blocks, indices, config, parallel, lr)[1:]
            if stage.number == 2 else run_step(stage, blocks, indices, config, parallel, lr)))
    else:
        clip, calls = torch.nn.utils.clip_grad_norm_, []
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: (
            calls.append(1), torch.tensor(float("inf")) if len(calls) == 4 else clip(params, norm))[1])
    linear, blocks, held = worker.build()
    with pytest.raises(FloatingPointError,
                       match=r"step 4: the loss or its gradient is not finite.*resume from .*step-00000003"):
        train(linear, blocks, worker.config(), tmp_path, eval_blocks=held, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002", "step-00000003"]


def test_a_warm_up_longer_than_a_stage_is_named(tmp_path, worker):
    from lincompile.diagnostics import LincompileWarning

    linear, blocks, _ = worker.build()
    with pytest.warns(LincompileWarning, match="warmup_steps 5 is longer than stage 1's 1 and stage 2's 2 steps"):
        train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=2, warmup_steps=5), tmp_path, progress=False)
