"""Fixtures of the training tests: one torch thread, a shared tiny capture, and the reference training run."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("train_worker.py")


def load_worker():
    """The `train_worker` module (tests run with --import-mode=importlib, so it is loaded by path)."""
    if "lincompile_train_worker" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lincompile_train_worker", WORKER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.WORKER = WORKER
        sys.modules["lincompile_train_worker"] = module
    return sys.modules["lincompile_train_worker"]


@pytest.fixture(scope="session")
def worker():
    """The `train_worker` module: `build()`, `config()` and its path (`WORKER`)."""
    return load_worker()


@pytest.fixture
def one_thread():
    """Single-threaded torch: far faster than oversubscribed threads on a shared machine, and reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama_capture():
    """(tiny Llama, its captured graph): `optimize(model, m, captured=...)` is cheap and shares the weights."""
    import lincompile
    from lincompile.testing.tiny import tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("llama", seed=0)
        return model, lincompile.api.capture_model(model)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def linearize(llama_capture, one_thread):
    """`linearize(method)` -> a LinearizedModel of the shared tiny Llama; base weights are restored afterwards."""
    import lincompile

    model, captured = llama_capture
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    yield lambda method: lincompile.optimize(model, method, captured=captured)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, worker):
    """History and final trained tensors of one uninterrupted single-process run of `train_worker.config()`."""
    from lincompile.train.trainer import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        linear, blocks, held = worker.build()
        result = train(linear, blocks, worker.config(), tmp_path_factory.mktemp("reference"), eval_blocks=held,
                       progress=False)
    finally:
        torch.set_num_threads(before)
    params = {n: p.detach().clone() for n, p in linear.graph.named_parameters()}
    return result, params
