"""alignprop_core/model_setup.py: channels_last, attention_backend and vae_tile_size act where they are set, change
images and gradients only as documented, and are one-line errors where they cannot act. Their cost is measured in
benchmarks (docs/benchmarks.md, "The levers"), not here."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from alignprop_core import AlignPropConfig, AlignPropTrainer
from alignprop_core.errors import ConfigError
from alignprop_core.families import FAMILIES, family_of
from alignprop_core.model_setup import attention_backend_names, set_attention_backend
from alignprop_core.sampler import encode_prompts, sample_images

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family.name: family.build_tiny(root / family.name) for family in FAMILIES if family.tiny_id}


@pytest.fixture
def default_attention_backend():
    """set_attention_backend also changes diffusers' process-wide default: put it back after the test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def load(path):
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    family_of(pipe).prepare(pipe, "auto", CPU, torch.float32)
    return pipe


def decode_with_grad(pipe, seed=0):
    """The family's decode of random latents for a 64x64 image: (image, gradient of its mean w.r.t. the latents, the
    number of decoder calls)."""
    family = family_of(pipe)  # the chain's latents, as the sampler hands them to decode
    latents = family.initial_latents(pipe, 1, 64, 64, torch.float32, CPU, torch.Generator().manual_seed(seed))
    latents.requires_grad_()
    calls = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda *args: calls.append(1))
    image = family.decode(pipe, latents)
    image.mean().backward()
    hook.remove()
    return image.detach(), latents.grad, len(calls)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "flux2-klein", "qwen-image", "z-image"])
def test_vae_tiles_decode_in_tiles_with_gradients(tiny_paths, name):
    """A 64 px image in 32 px tiles (a quarter overlapping): 3 x 3 decoder calls, the image's shape, a finite
    gradient to every latent; tiles as large as the image decode exactly as without tiling."""
    pipe = load(tiny_paths[name])
    family = family_of(pipe)
    plain, plain_grad, plain_calls = decode_with_grad(pipe)
    family.enable_vae_tiling(pipe, 64)
    whole, whole_grad, _ = decode_with_grad(pipe)
    assert torch.equal(whole, plain) and torch.equal(whole_grad, plain_grad)
    family.enable_vae_tiling(pipe, 32)
    tiled, tiled_grad, tiled_calls = decode_with_grad(pipe)
    assert (plain_calls, tiled_calls) == (1, 9)
    assert tiled.shape == plain.shape and not torch.equal(tiled, plain)  # blended seams: close, not equal
    assert torch.isfinite(tiled_grad).all() and (tiled_grad != 0).float().mean() > 0.9


def test_trainer_and_sample_pipeline_decode_in_the_configured_tiles(tiny_config):
    from alignprop_core.pipelines import load_inference_pipeline

    with pytest.raises(ConfigError, match=r"^vae_tile_size: got 32, which in training saves memory only with "
                                          r"vae_checkpointing true"):
        AlignPropTrainer(tiny_config(vae_tile_size=32))
    config = tiny_config(vae_tile_size=32, vae_checkpointing=True, resolution=64, num_epochs=1)
    trainer = AlignPropTrainer(config)
    assert trainer.pipe.vae.use_tiling and trainer.pipe.vae.tile_sample_min_size == 32
    assert torch.isfinite(torch.tensor(trainer.train_step()["reward_mean"]))
    pipe, _ = load_inference_pipeline(config)  # eval and sample decode as training does
    assert pipe.vae.use_tiling and pipe.vae.tile_latent_min_size == 4
    assert not load_inference_pipeline(tiny_config())[0].vae.use_tiling


def assert_same_images_and_gradients(got, want, grad_atol):
    """``(images, LoRA gradients)`` of a lever's run equal the default's within float rounding, and the gradients
    are not all zero."""
    (images, grads), (want_images, want_grads) = got, want
    torch.testing.assert_close(images, want_images, atol=1e-5, rtol=0)
    for grad, want_grad in zip(grads, want_grads):
        torch.testing.assert_close(grad, want_grad, atol=grad_atol, rtol=1e-3)
    assert any(g.abs().sum() > 0 for g in want_grads)


def test_channels_last_gives_the_same_images_and_gradients(make_lora_pipe):
    """K=2 of 4 steps with the UNet and VAE in channels_last: images and LoRA gradients equal the default layout's
    within float rounding (the convolutions sum in another order)."""
    from alignprop_core.model_setup import apply_model_settings

    results = []
    for channels_last in (False, True):
        pipe = make_lora_pipe()
        apply_model_settings(pipe, pipe.unet, family_of(pipe), AlignPropConfig(channels_last=channels_last))
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, CPU)
        images = sample_images(pipe, embeddings, num_steps=4, guidance_scale=5.0, eta=1.0, height=64, width=64,
                               grad_steps=2, generator=torch.Generator().manual_seed(0))
        images.mean().backward()
        results.append((images.detach(), [p.grad.clone() for p in pipe.lora_params]))
    assert_same_images_and_gradients(results[1], results[0], grad_atol=1e-7)


def test_channels_last_training_keeps_lora_factors_in_the_default_layout(tiny_config, tmp_path):
    """The trainer applies the layout before the LoRA is attached: UNet and VAE convolutions are channels_last, the
    LoRA factors (a convolution targeted too) are not, and the exported LoRA loads with load_lora_weights."""
    config = tiny_config(channels_last=True, lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    trainer = AlignPropTrainer(config)
    assert trainer.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    lora = {n: p for n, p in trainer.unet.named_parameters() if "lora_" in n}
    assert any(p.dim() == 4 for p in lora.values()) and all(p.is_contiguous() for p in lora.values())
    trainer.train()
    fresh = DiffusionPipeline.from_pretrained(config.pretrained_model, local_files_only=True)
    fresh.load_lora_weights(config.output_dir)
    assert any("conv1" in name for name, _ in fresh.unet.named_modules() if "lora" in name)


def test_channels_last_full_fine_tuning_exports_the_unet(tiny_config, tmp_path):
    trainer = AlignPropTrainer(tiny_config(channels_last=True, use_lora=False, num_epochs=1))
    trainer.train()
    unet = type(trainer.pipe.unet).from_pretrained(tmp_path / "out" / "unet")
    torch.testing.assert_close(unet.conv_in.weight, trainer.accelerator.unwrap_model(trainer.unet).conv_in.weight)


def flux_images_and_grads(path, backend=None):
    from alignprop_core.lora import add_lora

    pipe = load(path)
    family = family_of(pipe)
    if backend is not None:
        set_attention_backend(pipe.transformer, backend)
    torch.manual_seed(0)
    params = add_lora(pipe.transformer, 4, 4.0, list(family.lora_target_modules))
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 3.5, CPU)
    images = sample_images(pipe, embeddings, num_steps=3, guidance_scale=3.5, eta=1.0, height=32, width=32,
                           grad_steps=2, generator=torch.Generator().manual_seed(0))
    images.mean().backward()
    return pipe, images.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("name", ["flux", "z-image"])
def test_attention_backend_routes_the_transformers_attention_with_the_same_results(tiny_paths, name,
                                                                                   default_attention_backend):
    """torch's math kernel instead of its fused CPU kernel: every attention processor uses it, and images and LoRA
    gradients equal the default within float rounding."""
    _, images, grads = flux_images_and_grads(tiny_paths[name])
    pipe, math_images, math_grads = flux_images_and_grads(tiny_paths[name], "_native_math")
    backends = {str(m.processor._attention_backend) for m in pipe.transformer.modules()
                if hasattr(getattr(m, "processor", None), "_attention_backend")}
    assert backends == {"AttentionBackendName._NATIVE_MATH"}
    assert_same_images_and_gradients((math_images, math_grads), (images, grads), grad_atol=1e-6)


def test_attention_backend_where_it_cannot_act_is_one_line(tiny_paths, tiny_config, tmp_path,
                                                           default_attention_backend):
    with pytest.raises(ConfigError, match=r"^attention_backend: this model's denoiser \(UNet2DConditionModel\) calls "
                                          r"torch's scaled_dot_product_attention itself.*leave attention_backend "
                                          r"empty$"):
        AlignPropTrainer(tiny_config(attention_backend="native"))
    flux = load(tiny_paths["flux"])
    for backend, reason in (("_native_cudnn", "No viable backend"), ("flash", "install `flash-attn")):
        with pytest.raises(ConfigError, match=rf"^attention_backend: '{backend}' cannot run on cpu in float32 "
                                              rf"\(RuntimeError: .*{reason}.*\); choose another backend"):
            set_attention_backend(flux.transformer, backend)
    assert not (tmp_path / "out").exists()


def test_model_setting_fields_are_validated():
    assert AlignPropConfig(vae_tile_size=512, attention_backend="native", channels_last=True).validate()
    assert "native" in attention_backend_names() and not any("hub" in n for n in attention_backend_names())
    for value in (0, 16, 48, -32):
        with pytest.raises(ConfigError, match=r"^vae_tile_size: got .*, allowed: empty \(decode in one pass\) or a "
                                              r"multiple of 32 pixels"):
            AlignPropConfig(vae_tile_size=value).validate()
    with pytest.raises(ConfigError, match=r"^attention_backend: got 'flash_hub', which downloads and runs kernel code"):
        AlignPropConfig(attention_backend="flash_hub").validate()
    with pytest.raises(ConfigError, match=r"^attention_backend: got 'natve', allowed: .*\(did you mean 'native'\?\)$"):
        AlignPropConfig(attention_backend="natve").validate()
