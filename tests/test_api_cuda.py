"""`lincompile.optimize` on a model that lives on a GPU (marked `gpu`, skipped without CUDA): captured there, its
new parameters made there, its logits those of the same model linearized on the CPU, and a bf16-autocast
training step through the reference forms (the kernels have their own GPU tests in tests/kernels/cuda)."""
import copy

import pytest
import torch

import lincompile
from lincompile.testing.tiny import example_inputs, tiny_model
from lincompile.train.trainer import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["augmented", "softmax"])
def test_optimize_on_cuda_matches_the_cpu(method, monkeypatch, tmp_path):
    monkeypatch.setenv("LINCOMPILE_KERNELS", "reference")
    model = tiny_model("llama")
    on_cpu = lincompile.optimize(model, method)
    on_gpu = lincompile.optimize(copy.deepcopy(model).cuda(), method)
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    inputs = example_inputs("llama")
    expected = on_cpu(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    got = on_gpu(inputs["input_ids"].cuda(), attention_mask=inputs["attention_mask"].cuda()).logits
    assert torch.allclose(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    blocks = torch.randint(3, 100, (8, 16))
    config = TrainConfig(stage1_steps=1 if method == "augmented" else 0, stage2_steps=2, batch_size=2, block_size=16,
                         eval_every=0, checkpoint_every=0, keep_checkpoints=1, bf16=True)
    result = train(on_gpu, blocks, config, tmp_path, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_speculative_decoding_on_cuda_matches_plain_greedy(monkeypatch):
    """The verify calls take their ids and positions on the model's device; the tokens come back there too."""
    monkeypatch.setenv("LINCOMPILE_KERNELS", "reference")
    target = lincompile.optimize(tiny_model("llama").cuda(), "augmented")
    draft = lincompile.optimize(tiny_model("llama", num_layers=1).cuda(), "augmented")
    prompt = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0)).cuda()
    plain = target.generate(prompt, 16, eos_token_id=None)
    for candidate in ("prompt-lookup", draft):
        out = target.generate(prompt, 16, draft=candidate, num_draft_tokens=3, eos_token_id=None)
        assert out.device.type == "cuda" and torch.equal(out, plain)
    generator = torch.Generator(device="cuda").manual_seed(0)
    sampled = target.generate(prompt, 8, draft=draft, num_draft_tokens=3, do_sample=True, generator=generator,
                              eos_token_id=None)
    assert sampled.shape == (1, 16)
