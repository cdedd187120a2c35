"""Shared fixtures: the real SmolLM2 model (loaded once per session) and real held-out text."""
import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (`make test`) each test process gets its share of the cores, so that processes do
    not oversubscribe them; subprocesses the tests start inherit the share through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture
def usual_umask():
    """umask 022, under which written files are 0644 and directories 0755 (what permission checks expect)."""
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M, fp32, sdpa attention."""
    from lincompile.assets import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def heldout_batch(smollm2):
    """Two rows of 64 real held-out tokens; the second row is left-padded on its first 8 tokens."""
    from lincompile.train.data import heldout_blocks

    _, tokenizer = smollm2
    ids = heldout_blocks(tokenizer, block_size=64, max_blocks=2)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    ids = ids.clone()
    ids[1, :8] = tokenizer.pad_token_id
    return ids, mask


@pytest.fixture
def refuse_named_dims(monkeypatch):
    """`torch.export.export` refusing every call given named `Dim`s, as torch 2.11 refuses a GQA model's (its
    constraint solver cannot prove Min(64*seq, 192*seq) == 64*seq): what `export_dynamic` retries. Yields the
    calls, "refused" or "retried" (an export given `Dim.DYNAMIC`), so a test can check that the retry ran."""
    from torch._dynamo.exc import UserError, UserErrorType

    export = torch.export.export
    calls: list[str] = []

    def refusing(module, args, kwargs=None, **options):
        leaves = torch.utils._pytree.tree_leaves(options.get("dynamic_shapes"))
        if any(isinstance(d, torch.export.Dim) for d in leaves):
            calls.append("refused")
            raise UserError(UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated (seq)! (simulated)")
        calls.append("retried" if torch.export.Dim.DYNAMIC in leaves else "other")
        return export(module, args, kwargs, **options)

    monkeypatch.setattr(torch.export, "export", refusing)
    return calls
