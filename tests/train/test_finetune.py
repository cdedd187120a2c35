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


def test_a_long_sequence_trains_in_segments_through_the_state(linearize):
    """Training a sequence in two segments, the second starting from the first's state with the gradient kept,
    gives every parameter the gradient of the whole sequence in one call (truncated backprop without the cut)."""
    from lincompile.testing.tiny import perturb_new_parameters

    linear = perturb_new_parameters(linearize("augmented"), 0.1)
    params = [p for p in linear.graph.parameters() if p.requires_grad]
    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(0))  # 70 + 10: a chunked call

    def grads(segments: list[int]) -> list[torch.Tensor]:
        state, logits, start = None, [], 0
        for end in segments:
            out = linear(ids[:, start:end], past_state=state)
            state, start = out.past_state, end
            logits.append(out.logits)
        return torch.autograd.grad(torch.cat(logits, 1).float().square().mean(), params)

    whole, split = grads([80]), grads([70, 80])
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in split)
