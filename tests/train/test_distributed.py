"""Two gloo processes (torchrun-style environment) compute the same losses as one process on the same batches."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lincompile.train.trainer import Distributed

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_without_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parallel = Distributed.from_env("cpu")
    assert (parallel.rank, parallel.world, parallel.device.type, parallel.is_main) == (0, 1, "cpu", True)


def test_two_gloo_ranks_match_one_process(request, tmp_path, worker):
    """Global batch 4 with grad_accum 2: one process runs micro-batches of 2, each of 2 ranks micro-batches of 1."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(worker.WORKER), "run", str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    reference, _ = request.getfixturevalue("reference_run")  # computed while the ranks run
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    histories = [json.loads((tmp_path / f"history-rank{r}.json").read_text()) for r in range(2)]
    assert histories[0] == histories[1], "every rank reports the all-reduced loss"
    assert [(r["step"], r["stage"]) for r in histories[0]] == [(r["step"], r["stage"]) for r in reference.history]
    for key in ("loss", "site_mse", "ce", "kl"):
        got = [r[key] for r in histories[0] if key in r]
        expected = [r[key] for r in reference.history if key in r]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0, msg=key)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006", "step-00000007"]
