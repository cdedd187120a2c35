"""Shared fixtures: the real SmolLM2 model (loaded once per session) and real held-out text."""
import pytest
import torch


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
