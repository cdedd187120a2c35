"""Shared setup of the training tests, and their subprocess entry point.

    python train_worker.py kill OUT STEP   train, SIGKILL itself right after global step STEP
    python train_worker.py run OUT         train (under torchrun-style env vars: RANK, WORLD_SIZE, ...) and
                                           write OUT/history-rank{R}.json
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

METHOD = "augmented"  # alpha + conv_weight per site


def build():
    """(linear, train blocks, held-out blocks): a fresh tiny linearized Llama and fixed random token blocks."""
    import lincompile
    from lincompile.testing.tiny import tiny_model

    linear = lincompile.optimize(tiny_model("llama", seed=0), METHOD)
    gen = torch.Generator().manual_seed(1234)
    return linear, torch.randint(3, 128, (24, 16), generator=gen), torch.randint(3, 128, (2, 16), generator=gen)


def config(**changes):
    """Both stages, LoRA + norms + KL, two micro-batches, a checkpoint every 2 steps and at each stage end."""
    from lincompile.train.trainer import TrainConfig

    base = dict(stage1_steps=3, stage2_steps=4, batch_size=4, grad_accum=2, block_size=16, warmup_steps=2,
                checkpoint_every=2, eval_every=3, lora_rank=4, kl_weight=0.5, train_norms=True, stage1_lr=1e-2,
                lr=1e-2)
    return TrainConfig(**{**base, **changes})


def main(argv: list[str]) -> None:
    from lincompile.train.trainer import Distributed, train

    torch.set_num_threads(1)
    mode, out = argv[0], Path(argv[1])
    linear, blocks, held = build()
    if mode == "kill":
        kill_at = int(argv[2])

        def on_step(step: int, record: dict) -> None:
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        train(linear, blocks, config(), out, eval_blocks=held, progress=False, on_step=on_step)
        raise SystemExit("not killed")
    parallel = Distributed.from_env("cpu")
    try:
        result = train(linear, blocks, config(), out, eval_blocks=held, progress=False, parallel=parallel)
    finally:
        parallel.close()
    (out / f"history-rank{parallel.rank}.json").write_text(json.dumps(result.history))


if __name__ == "__main__":
    main(sys.argv[1:])
