"""Continuing a trained linearization: the cosine LR schedule and `train(init=...)` / `lincompile train --init`."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch

from lincompile.pretrained import ship, trained_tensors
from lincompile.train.checkpoint import load_checkpoint
from lincompile.train.trainer import TrainConfig, learning_rate, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_learning_rate_schedules():
    assert [learning_rate(1.0, 4, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [learning_rate(1.0, 4, s, "cosine", 14) for s in range(14)]
    assert cosine[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]  # warm-up, then the decay starts from the base LR
    assert cosine[9] == pytest.approx(0.5)  # half way through the 10 decay steps
    assert all(a > b for a, b in itertools.pairwise(cosine[4:])) and 0 < cosine[-1] < 0.03
    assert learning_rate(2.0, 0, 5, "cosine", 10) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 2)))
    with pytest.raises(ValueError, match="lr_schedule 'linear' is not one of"):
        TrainConfig(lr_schedule="linear")


def test_cosine_runs_refuse_a_changed_length_and_old_checkpoints_resume(tmp_path, worker):
    linear, blocks, _ = worker.build()
    train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=1, lr_schedule="cosine"), tmp_path / "cos",
          progress=False)
    with pytest.raises(ValueError, match=r"changed in \['stage2_steps'\]"):
        train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=2, lr_schedule="cosine"), tmp_path / "cos",
              resume=True, progress=False)
    linear, blocks, _ = worker.build()  # a fresh graph for each run: LoRA adapters stay in the trained one
    result = train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=1), tmp_path / "old", progress=False)
    config_file = result.checkpoint / "train_config.json"  # as written before lr_schedule existed
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "lr_schedule"}))
    linear, blocks, _ = worker.build()
    resumed = train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=2), tmp_path / "old", resume=True,
                    progress=False)
    assert len(resumed.history) == 3


def test_init_continues_a_checkpoint_exactly_where_it_stopped(reference_run, worker, tmp_path):
    """Step 0 of a run started from the reference run's last checkpoint scores what that run ended with, and the
    tensors it starts from are the checkpoint's: method parameters, LoRA adapters and norms."""
    reference, _ = reference_run
    checkpoint = load_checkpoint(reference.checkpoint)
    linear, blocks, held = worker.build()
    seen = {}

    def on_step(step: int, record: dict) -> None:
        seen.update({n: p.detach().clone() for n, p in linear.graph.named_parameters() if n in checkpoint.tensors})

    config = worker.config(stage1_steps=0, stage2_steps=1, kl_weight=0.0, lr=0.0, warmup_steps=0)
    result = train(linear, blocks, config, tmp_path, eval_blocks=held, progress=False, on_step=on_step,
                   init=checkpoint.tensors)
    assert result.evals[0]["step"] == 0 and reference.evals[-1]["step"] == 7
    assert result.evals[0]["ppl"] == pytest.approx(reference.evals[-1]["ppl"], rel=1e-6)
    assert set(seen) == set(checkpoint.tensors)
    for name, tensor in checkpoint.tensors.items():  # lr 0: the one step leaves them as loaded
        torch.testing.assert_close(seen[name], tensor, rtol=0, atol=0, msg=name)


def test_init_errors_name_the_problem(reference_run, worker, tmp_path):
    reference, _ = reference_run
    tensors = load_checkpoint(reference.checkpoint).tensors
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match="another LoRA rank"):
        train(linear, blocks, worker.config(stage1_steps=0, stage2_steps=1, lora_rank=2), tmp_path / "a",
              progress=False, init=tensors)
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match="holds LoRA adapters .*which stage 2 adds, and this run has no stage 2"):
        train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=0), tmp_path / "b", progress=False,
              init=tensors)  # no stage 2: the LoRA tensors have nowhere to go
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match="this run trains 0 steps"):
        train(linear, blocks, worker.config(stage1_steps=0, stage2_steps=0), tmp_path / "c", progress=False,
              init=tensors)
    shipped = ship(reference.checkpoint, tmp_path / "shipped", {"command": "tests"})
    for source in (shipped, reference.checkpoint):
        loaded, recipe = trained_tensors(source, "tiny", worker.METHOD)
        assert recipe["lora"]["rank"] == worker.config().lora_rank
        assert all(torch.equal(loaded[n], tensors[n]) for n in tensors) and set(loaded) == set(tensors)
    with pytest.raises(ValueError, match="holds a augmented linearization, not linear-elu"):
        trained_tensors(reference.checkpoint, "tiny", "linear-elu")
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match=r"init: tensors \['model.layers.9.bogus'\] match no parameter"):
        train(linear, blocks, worker.config(stage1_steps=2, stage2_steps=1), tmp_path / "d", progress=False,
              init={**tensors, "model.layers.9.bogus": torch.zeros(3)})
    assert not list((tmp_path / "d").rglob("step-*"))  # refused before stage 1 trained anything


def test_a_checkpoint_from_before_stage_2_holds_no_adapters(worker, tmp_path):
    """Its recipe says so, so a run without LoRA may start from it and a shipped copy loads without adapters."""
    linear, blocks, _ = worker.build()
    result = train(linear, blocks, worker.config(stage1_steps=2, stage2_steps=0), tmp_path / "run", progress=False)
    tensors, recipe = trained_tensors(result.checkpoint, "tiny", worker.METHOD)
    assert recipe["lora"] is None and tensors
    shipped = ship(result.checkpoint, tmp_path / "shipped", {"command": "tests"})
    assert trained_tensors(shipped, "tiny", worker.METHOD)[1]["lora"] is None


@pytest.mark.parametrize("stage1,step", [(2, 1), (2, 3), (2, 4), (0, 1)])  # stage 1; stage 2; finished; no stage 1
def test_a_run_started_from_init_resumes_from_any_checkpoint_exactly(reference_run, worker, tmp_path, stage1, step):
    """A checkpoint holds only what was trained so far: the init's other tensors (LoRA adapters after stage 1,
    norms) must still arrive, or the resumed run trains from other weights (silently); the KL teacher is the
    original model either way, not the init's norms."""
    import shutil

    init = load_checkpoint(reference_run[0].checkpoint).tensors
    config = worker.config(stage1_steps=stage1, stage2_steps=2, checkpoint_every=1, keep_checkpoints=10)
    linear, blocks, _ = worker.build()
    train(linear, blocks, config, tmp_path / "whole", progress=False, init=init)
    whole = {n: p.detach().clone() for n, p in linear.graph.named_parameters()}
    name = f"step-{step:08d}"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / name, tmp_path / "part" / "checkpoints" / name)
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match="started from .* init tensors .*same --init"):
        train(linear, blocks, config, tmp_path / "part", resume=True, progress=False)
    other = {name: value + 1 if name == min(init) else value for name, value in init.items()}
    with pytest.raises(ValueError, match="same names but other values; resume it with the same --init"):
        train(linear, blocks, config, tmp_path / "part", resume=True, progress=False, init=other)
    linear, blocks, _ = worker.build()
    train(linear, blocks, config, tmp_path / "part", resume=True, progress=False, init=init)
    resumed = dict(linear.graph.named_parameters())
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_resume_refuses_a_run_shorter_than_its_checkpoint(worker, tmp_path):
    linear, blocks, _ = worker.build()
    train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=2), tmp_path, progress=False)
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match="is at step 3, past this run's 2 steps"):
        train(linear, blocks, worker.config(stage1_steps=1, stage2_steps=1), tmp_path, resume=True, progress=False)


def test_resume_refuses_other_tokens_or_another_model(worker, tmp_path):
    import lincompile
    from lincompile.testing.tiny import tiny_model

    config = worker.config(stage1_steps=1, stage2_steps=1)
    linear, blocks, _ = worker.build()
    train(linear, blocks, dataclasses.replace(config, stage2_steps=0), tmp_path, progress=False)
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match="other training tokens"):
        train(linear, blocks[:-4], config, tmp_path, resume=True, progress=False)
    other = lincompile.optimize(tiny_model("llama", seed=1), worker.METHOD)
    with pytest.raises(ValueError, match="other model weights"):
        train(other, blocks, config, tmp_path, resume=True, progress=False)
    linear, blocks, _ = worker.build()
    with pytest.raises(ValueError, match="started without init tensors"):
        train(linear, blocks, config, tmp_path, resume=True, progress=False, init={"x": torch.zeros(1)})
    linear, blocks, _ = worker.build()
    assert len(train(linear, blocks, config, tmp_path, resume=True, progress=False).history) == 2
