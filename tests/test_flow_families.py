"""SD3 and FLUX (flow-matching transformers) on their tiny pipelines: sampling equals the pipelines' own
``__call__``, truncation, a float64 finite-difference check of the gradient, LoRA files that the pipelines' own
``load_lora_weights`` reproduce, CLI runs and an exact resume."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from alignprop_core import AlignPropConfig, AlignPropTrainer
from alignprop_core.cli import main
from alignprop_core.families import FAMILIES, FLUX, FLUX2_KLEIN, QWEN_IMAGE, SD3, Z_IMAGE, family_of
from alignprop_core.lora import add_lora
from alignprop_core.sampler import encode_prompts, sample_images

PROMPTS = ["a cat", "a dog"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def flow_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {family.name: family.build_tiny(root / family.name) for family in (SD3, FLUX, FLUX2_KLEIN, QWEN_IMAGE,
                                                                                Z_IMAGE)}


def load(path, scheduler="auto", dtype=torch.float32):
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    family_of(pipe).prepare(pipe, scheduler, CPU, dtype)
    return pipe


def with_lora(pipe, seed=0):
    """A rank-4 LoRA on the family's default targets with every factor non-zero (so each gets a gradient)."""
    family = family_of(pipe)
    torch.manual_seed(seed)
    params = add_lora(family.denoiser(pipe), 4, 4.0, list(family.lora_target_modules))
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    return params


def assert_every_lora_factor_has_a_gradient(pipe):
    """Each LoRA factor got a non-zero gradient, except the text stream's output side of the last joint block when
    no single-stream block follows (SD3, Qwen-Image): its context queries and output projection cannot reach the
    image, since that block's text output is dropped."""
    transformer = pipe.transformer
    dropped = set()
    if hasattr(transformer, "transformer_blocks") and not len(getattr(transformer, "single_transformer_blocks", [])):
        last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}.attn"
        dropped = {f"{last}.add_q_proj", f"{last}.to_add_out"}
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            unused = any(name.startswith(prefix + ".") for prefix in dropped)
            assert (p.grad is not None and p.grad.abs().sum() > 0) != unused, name


def ours(pipe, guidance, negative=None, true_cfg=1.0, steps=4, grad_steps=0, eta=1.0, height=64, width=48,
         checkpointing=True, seed=0):
    embeddings = encode_prompts(pipe, PROMPTS, negative, guidance, CPU, true_cfg)
    return sample_images(pipe, embeddings, num_steps=steps, guidance_scale=guidance, eta=eta, height=height,
                         width=width, grad_steps=grad_steps, generator=torch.Generator().manual_seed(seed),
                         gradient_checkpointing=checkpointing)


def theirs(pipe, guidance, negative=None, true_cfg=1.0, steps=4, height=64, width=48, seed=0):
    kwargs = family_of(pipe).pipeline_call_kwargs(PROMPTS, steps, guidance, height, width, negative_prompt=negative,
                                                  true_cfg_scale=true_cfg)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


# (family, guidance_scale, negative prompt, true_cfg_scale): SD3 with and without CFG (and a negative prompt);
# FLUX with embedded guidance alone and with true CFG (a second, negative pass); Z-Image without guidance (its
# Turbo setting, guidance 0) and with its CFG.
GUIDANCE = [("sd3", 5.0, None, 1.0), ("sd3", 4.0, "blurry", 1.0), ("sd3", 1.0, None, 1.0),
            ("flux", 3.5, None, 1.0), ("flux", 3.5, "blurry", 2.5), ("flux", 3.5, "", 2.5),
            ("z-image", 0.0, None, 1.0), ("z-image", 4.0, None, 1.0), ("z-image", 4.0, "blurry", 1.0),
            ("flux2-klein", 1.0, None, 1.0), ("flux2-klein", 4.0, None, 1.0),
            ("qwen-image", 5.0, None, 1.0), ("qwen-image", 5.0, "blurry", 4.0), ("qwen-image", 5.0, "", 4.0)]


def test_pipeline_call_kwargs_name_what_each_pipeline_takes():
    """The arguments written out per family: eta only for the DDIM-sampled UNets, true_cfg_scale only for the two
    pipelines that have it, an empty negative prompt kept (FLUX.1 and Qwen-Image then run true CFG against it), and
    no negative prompt for FLUX.2 [klein], whose pipeline has no such argument."""
    base = dict(num_inference_steps=4, guidance_scale=3.0, height=64, width=48, output_type="pt")
    got = {family.name: family.pipeline_call_kwargs(["a", "b"], 4, 3.0, 64, 48, negative_prompt="", eta=0.5,
                                                    true_cfg_scale=2.0)
           for family in FAMILIES if family is not FLUX2_KLEIN}
    negative = {"prompt": ["a", "b"], "negative_prompt": ["", ""], **base}
    assert got == {"sd": {**negative, "eta": 0.5}, "sdxl": {**negative, "eta": 0.5}, "sd3": negative,
                   "flux": {**negative, "true_cfg_scale": 2.0}, "qwen-image": {**negative, "true_cfg_scale": 2.0},
                   "z-image": negative}
    assert FLUX2_KLEIN.pipeline_call_kwargs(["a"], 4, 3.0, 64, 48, negative_prompt=None) == {"prompt": ["a"], **base}
    with pytest.raises(ValueError, match="takes no negative prompt"):
        FLUX2_KLEIN.pipeline_call_kwargs(["a"], 4, 3.0, 64, 48, negative_prompt="blurry")


@pytest.mark.parametrize("name,guidance,negative,true_cfg", GUIDANCE)
def test_no_grad_sampling_equals_the_pipelines_own_call(flow_paths, name, guidance, negative, true_cfg):
    reference = DiffusionPipeline.from_pretrained(flow_paths[name], local_files_only=True)  # diffusers' scheduler
    reference.set_progress_bar_config(disable=True)
    expected = theirs(reference, guidance, negative, true_cfg)
    got = ours(load(flow_paths[name]), guidance, negative, true_cfg)
    assert got.shape == expected.shape == (2, 3, 64, 48)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,guidance,negative,true_cfg,passes", [("sd3", 5.0, None, 1.0, 1),
                                                                     ("flux", 3.5, None, 1.0, 1),
                                                                     ("flux", 3.5, "blurry", 2.5, 2),
                                                                     ("z-image", 4.0, None, 1.0, 1),
                                                                     ("flux2-klein", 4.0, None, 1.0, 2),
                                                                     ("qwen-image", 5.0, "blurry", 4.0, 2)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_gradients_flow_through_exactly_the_last_k_transformer_calls(flow_paths, name, guidance, negative, true_cfg,
                                                                      passes, k):
    pipe = load(flow_paths[name])
    with_lora(pipe)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    images = ours(pipe, guidance, negative, true_cfg, steps=5, grad_steps=k, checkpointing=False)
    handle.remove()
    assert calls == [False] * passes * (5 - k) + [True] * passes * k
    images.mean().backward()
    assert_every_lora_factor_has_a_gradient(pipe)


@pytest.mark.parametrize("name,guidance", [("sd3", 3.0), ("flux", 3.5), ("z-image", 3.0), ("flux2-klein", 3.0),
                                           ("qwen-image", 3.0)])
def test_float64_full_backprop_gradient_matches_finite_differences(flow_paths, name, guidance):
    """Autograd's directional derivative along random directions of the whole LoRA equals central differences.

    Random directions rather than single entries, and eps 3e-3: these models are not fp64 throughout even in fp64
    (Z-Image applies RoPE in complex64; diffusers' RMSNorm computes its variance in fp32), which puts ~4e-6 of noise
    into the loss, ~7e-4 in the difference quotient at eps 3e-3. Along a random direction the signal is 0.1-0.2, and
    central differences agreed with autograd to 1e-5 and 1.3e-3 (relative; two directions) on Z-Image, 1.5e-3 on
    Qwen-Image, within 1e-3 on SD3 and both FLUX: the tolerance is 1e-3, and 1e-2 for Z-Image's and Qwen-Image's
    complex64 RoPE."""
    pipe = load(flow_paths[name], dtype=torch.float64)
    params = with_lora(pipe)
    for p in params:
        p.data = p.data.double()
    weights = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss() -> torch.Tensor:
        images = ours(pipe, guidance, steps=3, grad_steps=3, height=32, width=32)
        return (images * weights).sum()

    loss().backward()
    generator = torch.Generator().manual_seed(5)
    eps = 3e-3
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        norm = torch.sqrt(sum((d * d).sum() for d in direction))
        direction = [d / norm for d in direction]
        # factors that cannot reach the image have no gradient (see assert_every_lora_factor_has_a_gradient)
        analytic = sum((p.grad * d).sum() for p, d in zip(params, direction) if p.grad is not None).item()
        values = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
                values.append(loss().item())
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(numeric) > 1e-4  # a real derivative (measured 4e-4 to 0.2 over the families), not a zero
        tolerance = 1e-2 if name in ("z-image", "qwen-image") else 1e-3
        assert abs(analytic - numeric) <= tolerance * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_checkpointing_gives_the_same_gradients(flow_paths, name):
    grads = []
    for checkpointing in (False, True):
        pipe = load(flow_paths[name])
        params = with_lora(pipe)
        ours(pipe, 3.0, steps=4, grad_steps=2, checkpointing=checkpointing).mean().backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_flow_sde_is_seeded_noisy_and_reduces_to_euler_at_eta_zero(flow_paths):
    euler = ours(load(flow_paths["flux"]), 3.5)
    sde = load(flow_paths["flux"], scheduler="flow_sde")
    first, again = ours(sde, 3.5, eta=0.7), ours(sde, 3.5, eta=0.7)
    other_seed = ours(sde, 3.5, eta=0.7, seed=1)
    assert torch.equal(first, again)
    assert (first - euler).abs().max() > 1e-3 and (first - other_seed).abs().max() > 1e-3
    torch.testing.assert_close(ours(sde, 3.5, eta=0.0), euler, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_draft_lv_renoises_with_the_flow_forward_process(flow_paths, name):
    pipe = load(flow_paths[name])
    with_lora(pipe)
    embeddings = encode_prompts(pipe, PROMPTS, None, 3.0, CPU)
    images = sample_images(pipe, embeddings, num_steps=4, guidance_scale=3.0, eta=1.0, height=32, width=32,
                           grad_steps=1, generator=torch.Generator().manual_seed(0), draft_lv_n=3)
    assert images.shape == (6, 3, 32, 32)
    images.mean().backward()
    assert_every_lora_factor_has_a_gradient(pipe)
    scheduler = pipe.scheduler
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sigma = scheduler.sigmas[2]
    torch.testing.assert_close(scheduler.add_noise(x0, noise, scheduler.timesteps[2:3]),
                               sigma * noise + (1 - sigma) * x0)


def flow_config(path, out, **overrides):
    # 128 px: the tiny models' size (the tiny Qwen-Image VAE has no sample_size, so its pipeline's default is 1024 px:
    # 22 s per step there against 0.6 s at 128)
    values = dict(pretrained_model=str(path), rewards="saturation", num_epochs=2, sample_num_steps=4, resolution=128,
                  train_batch_size=2, truncation="fixed", truncation_k=2, mixed_precision="no", eval_num_samples=0,
                  output_dir=str(out), save_freq=1, train_learning_rate=0.01)
    values.update(overrides)
    return AlignPropConfig(**values)


@pytest.mark.parametrize("name,pipeline_class", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline"),
                                                 ("z-image", "ZImagePipeline"), ("flux2-klein", "Flux2KleinPipeline"),
                                                 ("qwen-image", "QwenImagePipeline")])
def test_exported_lora_loads_with_the_pipelines_loader_and_reproduces_the_trainers_samples(flow_paths, tmp_path,
                                                                                          name, pipeline_class):
    trainer = AlignPropTrainer(flow_config(flow_paths[name], tmp_path / "out"))
    result = trainer.train()
    lora_file = result.output_dir / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4
    assert sorted(adapter["transformer.target_modules"]) == sorted(family_of(trainer.pipe).lora_target_modules)
    assert metadata["alignprop_family"] == name  # so that mix names this pipeline class
    if name in ("sd3", "flux", "flux2-klein", "qwen-image"):
        assert any(".add_q_proj." in k for k in keys)  # the joint blocks' context projections are adapted too
    in_memory = ours(trainer.pipe, 3.0, steps=4)

    import diffusers

    fresh = getattr(diffusers, pipeline_class).from_pretrained(flow_paths[name], local_files_only=True)
    fresh.set_progress_bar_config(disable=True)
    base = theirs(fresh, 3.0, steps=4)
    fresh.load_lora_weights(str(result.output_dir))
    loaded = theirs(fresh, 3.0, steps=4)
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-4  # the LoRA changed something


@pytest.mark.parametrize("name", ["sd3", "flux", "z-image", "flux2-klein", "qwen-image"])
def test_two_step_cli_training_run(flow_paths, tmp_path, name, capsys):
    out = tmp_path / "run"
    status = main(["train", "--preset", "tiny", "--pretrained_model", str(flow_paths[name]), "--num_epochs", "2",
                   "--sample_num_steps", "4", "--truncation_max", "4", "--eval_num_samples", "2", "--resolution", "128",
                   "--output_dir", str(out)])
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert status == 0, err
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "reward_mean" in row] == [1, 2]
    assert "eval after:" in err and f"{family_of_name(name)}.load_lora_weights" in err


def family_of_name(name):
    return {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "z-image": "ZImagePipeline",
            "flux2-klein": "Flux2KleinPipeline", "qwen-image": "QwenImagePipeline"}[name]


@pytest.mark.parametrize("name", ["sd3", "flux", "z-image", "flux2-klein", "qwen-image"])
def test_resume_is_bitwise_exact(flow_paths, tmp_path, name):
    straight = flow_config(flow_paths[name], tmp_path / "straight", num_epochs=3)
    AlignPropTrainer(straight).train()
    AlignPropTrainer(flow_config(flow_paths[name], tmp_path / "resumed", num_epochs=1)).train()
    AlignPropTrainer(flow_config(flow_paths[name], tmp_path / "resumed", num_epochs=3, resume_from="latest")).train()
    name_ = "pytorch_lora_weights.safetensors"
    assert (tmp_path / "straight" / name_).read_bytes() == (tmp_path / "resumed" / name_).read_bytes()


def test_tiny_pipeline_command_builds_each_family(tmp_path, capsys):
    for family in ("sd3", "flux", "z-image", "flux2-klein", "qwen-image"):
        assert main(["tiny-pipeline", str(tmp_path / family), "--family", family]) == 0
        index = json.loads((tmp_path / family / "model_index.json").read_text())
        assert index["_class_name"] == family_of_name(family)
    assert "tiny FLUX pipeline written to" in capsys.readouterr().out


def count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    return calls


def test_block_and_vae_checkpointing_recompute_in_backward_and_keep_the_gradients(flow_paths):
    """Per-block checkpointing inside the transformer runs each block once more during backward, VAE checkpointing
    runs the decoder's up blocks again during backward; neither changes the LoRA gradients."""
    from alignprop_core.model_setup import enable_inner_checkpointing

    results = []
    for extra in (False, True):
        pipe = load(flow_paths["flux"])
        params = with_lora(pipe)
        enable_inner_checkpointing(pipe, pipe.transformer, blocks=extra, vae=extra)
        block_calls = count_calls(pipe.transformer.transformer_blocks[0])
        up_block_calls = count_calls(pipe.vae.decoder.up_blocks[0])
        embeddings = encode_prompts(pipe, PROMPTS, None, 3.5, CPU)
        images = sample_images(pipe, embeddings, num_steps=4, guidance_scale=3.5, eta=1.0, height=32, width=32,
                               grad_steps=2, generator=torch.Generator().manual_seed(0))
        forward_blocks, forward_up_blocks = len(block_calls), len(up_block_calls)
        images.mean().backward()
        results.append(([p.grad.clone() for p in params], len(block_calls) - forward_blocks,
                        len(up_block_calls) - forward_up_blocks))
    (plain, plain_blocks, plain_up), (checkpointed, blocks, up) = results
    assert (plain_blocks, plain_up) == (2, 0)  # per-call checkpointing: each of the K=2 calls recomputed
    assert (blocks, up) == (4, 1)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_vae_checkpointing_on_a_vae_without_it_is_one_line(flow_paths, tmp_path):
    from alignprop_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^vae_checkpointing: this model's VAE \(AutoencoderKLQwenImage\) does not "
                                          r"support gradient checkpointing; set vae_checkpointing false$"):
        AlignPropTrainer(flow_config(flow_paths["qwen-image"], tmp_path / "out", vae_checkpointing=True))
    assert not (tmp_path / "out").exists()


def test_full_fine_tuning_exports_the_transformer_folder(flow_paths, tmp_path):
    from diffusers import FluxTransformer2DModel

    trainer = AlignPropTrainer(flow_config(flow_paths["flux"], tmp_path / "full", num_epochs=1, use_lora=False))
    result = trainer.train()
    assert not (result.output_dir / "pytorch_lora_weights.safetensors").exists()
    loaded = FluxTransformer2DModel.from_pretrained(result.output_dir, subfolder="transformer")
    trained = dict(trainer.pipe.transformer.named_parameters())
    assert all(torch.equal(p, trained[n].detach()) for n, p in loaded.named_parameters())


def test_eval_sample_and_mix_work_on_flux_loras(flow_paths, tmp_path, capsys):
    import diffusers

    path = str(flow_paths["flux"])
    for seed, out in ((0, "a"), (1, "b")):
        AlignPropTrainer(flow_config(path, tmp_path / out, num_epochs=1, seed=seed)).train()
    base = ["--pretrained_model", path, "--rewards", "saturation", "--sample_num_steps", "4"]
    assert main(["eval", *base, "--eval_num_samples", "2", "--lora", str(tmp_path / "a"), "-o",
                 str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(json.dumps(report)) > 100 and (tmp_path / "eval" / "grid.png").is_file()
    assert main(["sample", *base, "--prompt", "a cat", "--lora", str(tmp_path / "a"), "-o",
                 str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    capsys.readouterr()
    assert main(["mix", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.5", "0.5", "-o",
                 str(tmp_path / "mix")]) == 0
    assert "load it with FluxPipeline.load_lora_weights" in capsys.readouterr().out
    pipe = diffusers.FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "mix"))
    assert len(pipe.transformer.peft_config) == 1  # the mix loaded as one adapter


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_trl_style_callables_on_a_ready_pipeline(flow_paths, tmp_path, name):
    """TRL's trainer interface (prompt_function, reward_function, a ready pipeline, step, _generate_samples)."""
    pipe = DiffusionPipeline.from_pretrained(flow_paths[name], local_files_only=True)

    def reward(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    trainer = AlignPropTrainer(flow_config(flow_paths[name], tmp_path / "out"), reward, lambda: ("a cat", {}), pipe)
    samples = trainer._generate_samples(2, with_grad=True)
    assert tuple(samples["images"].shape) == (2, 3, 128, 128) and samples["images"].requires_grad
    loss = trainer.calculate_loss(trainer.compute_rewards(samples))
    assert torch.isfinite(loss)
    global_step = 0
    for epoch in range(2):
        global_step = trainer.step(epoch, global_step)
    assert global_step == 2
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2


def test_precision_rules_of_the_flow_families(flow_paths):
    """A force_upcast VAE stays fp32 under an explicit fp16 (and decodes outside fp16 autocast); bf16 casts every
    frozen model; the flow families default to bf16 on a GPU (tests/test_config.py)."""
    from diffusers import AutoencoderKL

    for name in ("sd3", "flux"):
        pipe = DiffusionPipeline.from_pretrained(flow_paths[name], local_files_only=True)
        pipe.vae = AutoencoderKL.from_config({**pipe.vae.config, "force_upcast": True})
        family_of(pipe).prepare(pipe, "auto", CPU, torch.float16)
        assert pipe.vae.dtype == torch.float32 and pipe.transformer.dtype == torch.float16
        family_of(pipe).prepare(pipe, "auto", CPU, torch.bfloat16)
        assert pipe.vae.dtype == pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16
        latents = torch.randn(1, pipe.vae.config.latent_channels, 4, 4)
        pipe.vae.to(torch.float32)
        with torch.autocast("cpu", dtype=torch.float16):
            decoded = family_of(pipe).decode(pipe, latents)
        assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


def test_lora_files_of_transformer_families_are_told_apart():
    """mix writes and names the pipeline class of a LoRA from its module names (every flow family adapts a
    ``transformer``)."""
    from alignprop_core.families import family_for_lora

    def family(*names):
        return family_for_lora({"transformer": list(names)}).name

    assert family("transformer_blocks.0.attn.to_q") == "sd3"
    assert family("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q") == "flux"
    assert family("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_qkv_mlp_proj") == \
        "flux2-klein"
    assert family("layers.0.attention.to_q", "context_refiner.0.attention.to_k") == "z-image"
    assert family_for_lora({"unet": ["down_blocks.0.attentions.0"]}).name == "sd"
    # what a file records wins: Qwen-Image's attention names are SD3's
    assert family_for_lora({"transformer": ["transformer_blocks.0.attn.to_q"]}, "qwen-image").name == "qwen-image"
