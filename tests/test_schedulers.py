"""Every supported scheduler in the differentiable sampler, and DRaFT-LV, on the tiny SD-1.x pipeline."""

import pytest
import torch

from alignprop_core import AlignPropConfig, AlignPropTrainer
from alignprop_core.errors import ConfigError
from alignprop_core.models import SCHEDULERS, make_scheduler
from alignprop_core.sampler import encode_prompts, sample_images
from alignprop_core.schedulers import FLOW_SCHEDULERS

NAMES = [name for name in SCHEDULERS if name not in FLOW_SCHEDULERS]  # the SD family's; flow: test_flow_families
STEPS = 4


@pytest.fixture(scope="module")
def pipe(make_lora_pipe):
    return make_lora_pipe()


def use(pipe, name):
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe


def sample(pipe, grad_steps, seed=0, draft_lv_n=0, guidance=5.0, size=64):
    embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, guidance, torch.device("cpu"))
    return sample_images(pipe, embeddings, num_steps=STEPS, guidance_scale=guidance, eta=1.0, height=size,
                         width=size, grad_steps=grad_steps, generator=torch.Generator().manual_seed(seed),
                         gradient_checkpointing=False, draft_lv_n=draft_lv_n)


def grad_flags(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    return calls, handle


def lora_grad(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def zero(params):
    for p in params:
        p.grad = None


@pytest.mark.parametrize("name", NAMES)
def test_one_unet_evaluation_per_step(pipe, name):
    """Truncation counts UNet evaluations of the chain = len(scheduler.timesteps); for every supported scheduler
    that is the configured step count (Heun/KDPM2 would give 2N-1 and are not offered)."""
    scheduler = make_scheduler(name, pipe.scheduler.config)
    for steps in (1, 4, 7, 50):
        scheduler.set_timesteps(steps)
        assert len(scheduler.timesteps) == steps


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_fixed_k_grads_flow_through_exactly_the_last_k_unet_calls(pipe, name, k):
    use(pipe, name)
    zero(pipe.lora_params)
    calls, handle = grad_flags(pipe)
    try:
        images = sample(pipe, grad_steps=k)
    finally:
        handle.remove()
    assert calls == [False] * (STEPS - k) + [True] * k
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    images.mean().backward()  # multistep history from no-grad steps must not break backward
    grads = [p.grad for p in pipe.lora_params]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_sampler_matches_the_diffusers_pipeline_and_resets_state(pipe, name):
    """Plain sampling equals StableDiffusionPipeline.__call__ with the same scheduler and seed (scale_model_input,
    init_noise_sigma, eta and the multistep history included); a second run gives the same images, so the
    per-chain state (history, _step_index) is reset."""
    use(pipe, name)
    with torch.no_grad():
        ours = sample(pipe, grad_steps=0, seed=3)
        again = sample(pipe, grad_steps=0, seed=3)
    reference = pipe(["a cat", "a dog"], num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(ours, again)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert getattr(pipe.scheduler, "_step_index", None) in (None, STEPS)


def test_grad_run_leaves_no_stale_state(pipe):
    """A grad-enabled run (its multistep history holds graph tensors) followed by a plain run: the plain run is
    unaffected, and backward of the first still works afterwards."""
    use(pipe, "unipc")
    with torch.no_grad():
        clean = sample(pipe, grad_steps=0, seed=5)
    images = sample(pipe, grad_steps=2, seed=5)
    with torch.no_grad():
        after = sample(pipe, grad_steps=0, seed=5)
    assert torch.equal(clean, after)
    assert torch.allclose(images.detach(), clean, atol=1e-6)
    zero(pipe.lora_params)
    images.mean().backward()
    assert lora_grad(pipe.lora_params).abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_each_scheduler_trains_a_step(tiny_config, name):
    trainer = AlignPropTrainer(tiny_config(num_epochs=1, scheduler=name, truncation="fixed", truncation_k=2,
                                           resolution=64))
    assert type(trainer.pipe.scheduler).__name__ == SCHEDULERS[name][0]
    before = torch.cat([p.detach().flatten().clone() for p in trainer.trainable_params])
    metrics = trainer.train().history[0]
    after = torch.cat([p.detach().flatten() for p in trainer.trainable_params])
    assert metrics["grad_norm"] > 0 and not torch.equal(before, after)


def test_unknown_scheduler_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"^scheduler: got 'heun', allowed: auto or one of ddim, ddpm, dpm\+\+, "
                                          r".*unipc, flow_euler, flow_sde$"):
        AlignPropConfig(scheduler="heun").validate()
    with pytest.raises(ConfigError, match="scheduler: got 'lms'"):
        make_scheduler("lms", {})


# ---------------------------------------------------------------------------------------------- DRaFT-LV


@pytest.mark.parametrize("name", ["ddim", "unipc"])
def test_draft_lv_runs_the_chain_without_grad_then_one_batched_last_step(pipe, name):
    use(pipe, name)
    calls, handle = grad_flags(pipe)
    try:
        images = sample(pipe, grad_steps=1, draft_lv_n=3)
        with torch.no_grad():
            plain = sample(pipe, grad_steps=1, draft_lv_n=3)
    finally:
        handle.remove()
    # the whole chain without a graph, then one UNet call for all draws with one; no-grad sampling ignores LV
    assert calls == [False] * STEPS + [True] + [False] * STEPS
    assert images.shape == (6, 3, 64, 64) and plain.shape == (2, 3, 64, 64)
    draws = images.detach().view(3, 2, 3, 64, 64)
    assert not torch.allclose(draws[0], draws[1])  # fresh noise per draw
    # each draw is a re-noised copy of the same final sample: close to it, far closer than two prompts are
    assert (draws - plain).abs().mean() < 0.5 * (plain[0] - plain[1]).abs().mean()


@pytest.mark.parametrize("name", ["ddim", "unipc", "euler_a"])
def test_draft_lv_gradient_is_the_mean_over_its_draws(tiny_config, monkeypatch, name):
    """The trainer's DRaFT-LV gradient with n = 3 equals the mean of the three gradients obtained by running each
    draw alone (n = 1 with that draw's noise), through the trainer's own loss."""
    import alignprop_core.sampler as sampler

    # eta = 0: the final step is deterministic, so a draw computed alone sees exactly the same numbers
    trainer = AlignPropTrainer(tiny_config(truncation="draft_lv", draft_lv_n=3, scheduler=name, sample_eta=0.0,
                                           resolution=64))
    params = trainer.trainable_params
    for p in params:  # non-zero B so that every LoRA factor gets a gradient
        torch.nn.init.normal_(p.data, std=0.02)
    real = sampler.draw_lv_noise
    recorded = []

    def record(like, n, generator):
        recorded.extend(real(like, n, generator))
        return recorded[-n:]

    def run():
        zero(params)
        batch = trainer._train_micro_batch(0)
        return lora_grad(params), batch

    monkeypatch.setattr(sampler, "draw_lv_noise", record)
    combined, batch = run()
    assert len(recorded) == 3 and batch["images"].shape[0] == 6 and len(batch["prompts"]) == 6
    trainer.config.draft_lv_n = 1
    singles = []
    for i in range(3):
        monkeypatch.setattr(sampler, "draw_lv_noise", lambda like, n, generator, i=i: [recorded[i]])
        singles.append(run()[0])
    assert (singles[0] - singles[1]).norm() > 0.01 * singles[0].norm()  # the draws really differ
    mean = torch.stack(singles).mean(0)
    assert torch.allclose(combined, mean, rtol=1e-4, atol=1e-6 * mean.abs().max()), \
        (combined - mean).abs().max() / mean.abs().max()


def test_draft_lv_config():
    config = AlignPropConfig(truncation="draft_lv", sample_num_steps=50).validate()
    assert config.truncation_range == (1, 1) and config.draft_lv_n == 2
    with pytest.raises(ConfigError, match="draft_lv_n: got 0, allowed: an integer >= 1"):
        AlignPropConfig(truncation="draft_lv", draft_lv_n=0).validate()
