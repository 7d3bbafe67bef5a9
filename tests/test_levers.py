"""The performance levers of issue 18 change cost, never results: each is checked against the path without it.

Their cost is measured in benchmarks (bench/limits.py --compare), not here.
"""

from __future__ import annotations

import torch

from alignprop_core.lora import fused_lora
from alignprop_core.sampler import encode_prompts, sample_images


def base_weights(unet):
    return {name: p.detach().clone() for name, p in unet.named_parameters() if "lora_" not in name}


def sample(pipe, grad_steps, fuse, steps=6, seed=0):
    embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, torch.device("cpu"))
    return sample_images(pipe, embeddings, num_steps=steps, guidance_scale=5.0, eta=1.0, height=64, width=64,
                         grad_steps=grad_steps, generator=torch.Generator().manual_seed(seed), fuse_lora=fuse)


def test_fused_lora_gives_the_lora_models_output_and_restores_the_base_bit_for_bit(make_lora_pipe):
    pipe = make_lora_pipe()
    unet = pipe.unet
    before = base_weights(unet)
    sample_input = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unfused = unet(sample_input, 10, encoder_hidden_states=context).sample
        with fused_lora(unet) as fused_layers:
            fused = unet(sample_input, 10, encoder_hidden_states=context).sample
            changed = [n for n, p in unet.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert fused_layers > 0 and changed  # the LoRA really was folded into the base weights
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    after = base_weights(unet)
    assert all(torch.equal(after[n], before[n]) for n in before)  # restored bit for bit, not by subtraction
    with torch.no_grad():
        again = unet(sample_input, 10, encoder_hidden_states=context).sample
    assert torch.equal(again, unfused)  # and the adapter is active again (not left marked as merged)


def test_fused_prefix_keeps_the_gradient_and_the_frozen_weights(make_lora_pipe):
    """K=2 of 6 steps: the 4 calls without a graph fused or not give the same images and LoRA gradients (within
    float rounding of the merged matmul), and after many steps the base weights are exactly the original ones."""
    results = []
    for fuse in (False, True):
        pipe = make_lora_pipe()
        before = base_weights(pipe.unet)
        images = sample(pipe, grad_steps=2, fuse=fuse)
        images.mean().backward()
        results.append((images.detach(), [p.grad.clone() for p in pipe.lora_params]))
        for _ in range(3):
            sample(pipe, grad_steps=2, fuse=fuse).mean().backward()
        after = base_weights(pipe.unet)
        assert all(torch.equal(after[n], before[n]) for n in before)
    (plain_images, plain_grads), (fused_images, fused_grads) = results
    torch.testing.assert_close(fused_images, plain_images, atol=1e-5, rtol=0)
    for fused, plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-3)
    assert any(g.abs().sum() > 0 for g in fused_grads)


def test_no_fusing_without_grad_or_without_a_prefix(make_lora_pipe, monkeypatch):
    import alignprop_core.sampler as sampler

    entered = []
    real = sampler.fused_lora

    def spy(denoiser):
        entered.append(1)
        return real(denoiser)

    monkeypatch.setattr(sampler, "fused_lora", spy)
    pipe = make_lora_pipe()
    with torch.no_grad():
        sample(pipe, grad_steps=0, fuse=True)  # eval / sample: the pipeline's own path, unfused
    sample(pipe, grad_steps=6, fuse=True)  # K = all: no call without a graph
    assert entered == []
    sample(pipe, grad_steps=1, fuse=True)
    assert entered == [1]


def test_training_with_and_without_the_fused_prefix(tiny_config, tmp_path):
    """Two optimizer steps of the trainer, fuse_lora_prefix on (the default) and off: the same K and rewards, and
    LoRA weights equal within rounding."""
    from alignprop_core import AlignPropTrainer

    loras, rewards = [], []
    for fuse in (True, False):
        trainer = AlignPropTrainer(tiny_config(fuse_lora_prefix=fuse, output_dir=str(tmp_path / f"fuse-{fuse}")))
        metrics = [trainer.train_step() for _ in range(2)]
        rewards.append([m["reward_mean"] for m in metrics])
        loras.append({n: p.detach().clone() for n, p in trainer.unet.named_parameters() if "lora_" in n})
    assert AlignPropTrainer(tiny_config()).config.fuse_lora_prefix is True
    torch.testing.assert_close(torch.tensor(rewards[0]), torch.tensor(rewards[1]), atol=1e-5, rtol=0)
    for name in loras[0]:
        torch.testing.assert_close(loras[0][name], loras[1][name], atol=1e-5, rtol=1e-4)


def grads_and_checkpointed_calls(pipe, monkeypatch, budget_gb, steps=6):
    import alignprop_core.sampler as sampler

    checkpointed = []
    real = sampler.checkpoint

    def spy(*args, **kwargs):
        checkpointed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler, "checkpoint", spy)
    for p in pipe.lora_params:
        p.grad = None
    embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, torch.device("cpu"))
    images = sample_images(pipe, embeddings, num_steps=steps, guidance_scale=5.0, eta=1.0, height=64, width=64,
                           grad_steps=steps, generator=torch.Generator().manual_seed(0), gradient_checkpointing=True,
                           checkpoint_memory_budget_gb=budget_gb)
    images.mean().backward()
    monkeypatch.setattr(sampler, "checkpoint", real)
    return [p.grad.clone() for p in pipe.lora_params], len(checkpointed)


def per_call_bytes(pipe):
    """What the budget counts for one call with gradients: the bytes autograd saves, frozen weights excluded."""
    from alignprop_core.families import family_of
    from alignprop_core.sampler import _evaluator

    family = family_of(pipe)
    evaluate = _evaluator(family, pipe.unet, True, memory_budget_bytes=10**15)
    embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, torch.device("cpu"))
    kwargs = family.denoiser_kwargs(pipe, embeddings, 64, 64)
    latents = torch.randn(4, 4, 8, 8)
    evaluate(latents, torch.tensor(10), kwargs)
    return evaluate.kept["per_call"]


def test_memory_budget_keeps_as_many_calls_as_fit_with_the_same_gradients(make_lora_pipe, monkeypatch):
    """K = all of 6 steps: no budget recomputes all 6 calls; a budget of 2.5 calls keeps 2 and recomputes 4; a
    budget of 100 GB keeps all 6. The LoRA gradients are the same in all three."""
    pipe = make_lora_pipe()
    per_call = per_call_bytes(pipe)
    assert per_call > 10_000  # activations, not nothing
    reference, recomputed = grads_and_checkpointed_calls(pipe, monkeypatch, None)
    assert recomputed == 6
    for budget_gb, expected in ((2.5 * per_call / 1e9, 4), (100.0, 0)):
        grads, recomputed = grads_and_checkpointed_calls(pipe, monkeypatch, budget_gb)
        assert recomputed == expected, budget_gb
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in reference)


def test_memory_budget_is_validated():
    import pytest

    from alignprop_core import AlignPropConfig
    from alignprop_core.errors import ConfigError

    assert AlignPropConfig(checkpoint_memory_budget_gb=4).validate().checkpoint_memory_budget_gb == 4
    for value in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="checkpoint_memory_budget_gb"):
            AlignPropConfig(checkpoint_memory_budget_gb=value).validate()
    with pytest.raises(ConfigError, match="empty when gradient_checkpointing is false"):
        AlignPropConfig(checkpoint_memory_budget_gb=4, gradient_checkpointing=False).validate()


def test_compiled_denoiser_gives_the_same_images_and_gradients(tmp_path):
    """compile_prefix and compile_grad_calls (with the fused prefix), on the tiny SD3 transformer, which compiles in
    ~40 s on the CPU machine where the tiny UNet takes ~3 min (the sampler's compile path is the same for every
    family): compile_prefix alone compiles the 2 calls without a graph; with compile_grad_calls the 2 with gradients
    run through torch.compile too, forward and backward, with full checkpointing (their forward runs without a
    graph, then again with one in backward) and with a memory budget (they keep their activations). Same images and
    LoRA gradients as eager within float rounding; three graphs in all (fused prefix, no-graph forward, forward with
    gradients)."""
    from diffusers import DiffusionPipeline

    from alignprop_core.families import SD3
    from alignprop_core.lora import add_lora
    from alignprop_core.sampler import _COMPILED
    from alignprop_core.schedulers import make_scheduler

    folder = SD3.build_tiny(tmp_path / "sd3")

    def make_pipe():
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.scheduler = make_scheduler("flow_euler", pipe.scheduler.config)
        torch.manual_seed(0)
        pipe.lora_params = add_lora(pipe.transformer, 4, 4.0, list(SD3.lora_target_modules))
        for param in pipe.lora_params:
            torch.nn.init.normal_(param, std=0.02)
        return pipe

    def run(pipe, budget_gb, compile_flags):
        for param in pipe.lora_params:
            param.grad = None
        embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, torch.device("cpu"))
        images = sample_images(pipe, embeddings, num_steps=4, guidance_scale=5.0, eta=0.0, height=64, width=64,
                               grad_steps=2, generator=torch.Generator().manual_seed(0), fuse_lora=True,
                               checkpoint_memory_budget_gb=budget_gb, **compile_flags)
        images.mean().backward()
        assert (pipe.transformer in _COMPILED) == bool(compile_flags)
        return images.detach(), [param.grad.clone() for param in pipe.lora_params]

    plain_images, plain_grads = run(make_pipe(), None, {})
    assert any(grad.abs().sum() > 0 for grad in plain_grads)
    pipe = make_pipe()  # one pipeline for all compiled runs: its transformer is compiled once
    torch._dynamo.utils.counters.clear()
    # compile_prefix alone first: only the fused prefix's graph, the calls with gradients stay eager
    for budget_gb, flags, graphs in ((None, {"compile_prefix": True}, 1),
                                     (None, {"compile_prefix": True, "compile_grad_calls": True}, 3),
                                     (100.0, {"compile_prefix": True, "compile_grad_calls": True}, 3)):
        images, grads = run(pipe, budget_gb, flags)
        torch.testing.assert_close(images, plain_images, atol=1e-4, rtol=0)
        for got, want in zip(grads, plain_grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-3)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
