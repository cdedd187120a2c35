"""Stage 2: which parameters train, and a KL teacher that stays the original softmax model."""
from __future__ import annotations

import torch

from lincompile.train.attention_transfer import graph_inputs
from lincompile.train.finetune import FinetuneObjective, frozen_teacher, stage2_parameters
from lincompile.train.lora import apply_lora
from lincompile.train.trainer import TrainConfig, train


def _ids(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


def test_stage2_parameter_selection(linearize):
    linear = linearize("augmented")
    apply_lora(linear.graph, rank=2)
    lora_and_attention = set(stage2_parameters(linear, full=False))
    assert len(lora_and_attention) == 4 + 16  # alpha + conv per site, A + B on q/k/v/o of 2 layers
    extra = set(stage2_parameters(linear, full=False, norms=True, embeddings=True)) - lora_and_attention
    assert extra == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(stage2_parameters(linear, full=True)) == set(dict(linear.graph.named_parameters()))


def test_full_finetune_with_kl_keeps_the_teacher_original(linearize, llama_capture, tmp_path):
    model, _ = llama_capture
    linear = linearize("augmented")
    ids = _ids()
    with torch.no_grad():
        original = model(input_ids=ids).logits
    teacher = frozen_teacher(linear, set(stage2_parameters(linear, full=True)))
    name = "model.layers.0.mlp.up_proj.weight"
    before = linear.graph.get_parameter(name).detach().clone()
    config = TrainConfig(stage1_steps=0, stage2_steps=2, batch_size=2, block_size=16, lora_rank=0, full=True,
                         kl_weight=1.0, lr=1e-2, warmup_steps=0, checkpoint_every=0)
    result = train(linear, _ids(8, 1), config, tmp_path, progress=False)
    assert result.history[-1]["kl"] > 0
    assert not torch.equal(linear.graph.get_parameter(name), before), "full fine-tuning moves base weights"
    assert torch.equal(teacher.get_buffer(name), before), "the teacher keeps its own copy"
    with torch.no_grad():
        torch.testing.assert_close(teacher(*graph_inputs(linear, ids))[0], original, atol=1e-5, rtol=1e-5)
        loss, parts = FinetuneObjective(linear, 0.5, teacher)(ids)
    torch.testing.assert_close(loss, parts[0] + 0.5 * parts[1])
