"""SDXL: the tiny SDXL pipeline through the real loading, sampling, training and LoRA-export paths; rewards on
SDXL-sized, non-square images."""

import json

import pytest
import torch
from safetensors import safe_open

from alignprop_core import AlignPropTrainer
from alignprop_core.errors import AlignPropError, ConfigError
from alignprop_core.families import SD, SDXL, family_of, prepare_pipeline
from alignprop_core.lora import LORA_WEIGHTS_NAME, add_lora
from alignprop_core.sampler import encode_prompts, sample_images


@pytest.fixture(scope="module")
def tiny_sdxl_path(tmp_path_factory):
    from alignprop_core.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline")


@pytest.fixture
def sdxl_config(tiny_sdxl_path, tiny_config):
    """conftest's fast tiny_config, on the tiny SDXL pipeline."""
    def make(**overrides):
        return tiny_config(**{"pretrained_model": str(tiny_sdxl_path), **overrides})

    return make


def load_sdxl(path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sdxl_is_a_real_sdxl_pipeline_and_loads_by_its_class(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from alignprop_core.pipelines import load_pipeline, resolve_model_path

    monkeypatch.setenv("ALIGNPROP_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path("alignprop:tiny-sdxl")  # built on first use, like alignprop:tiny-sd
    assert json.loads((tmp_path / "cache" / "tiny-sdxl-v1" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionXLPipeline"
    pipe = load_pipeline(folder)
    assert type(pipe) is StableDiffusionXLPipeline and family_of(pipe) is SDXL
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae.config.force_upcast
    # the UNet's added-embedding width matches 6 time ids + the pooled projection (the pipeline checks it)
    pipe._get_add_time_ids((128, 128), (0, 0), (128, 128), torch.float32,
                           text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


def test_unsupported_pipeline_family_is_one_clear_error_before_loading(tiny_sdxl_path, sdxl_config, tmp_path,
                                                                       monkeypatch):
    import shutil

    import alignprop_core.trainer as trainer_module

    folder = tmp_path / "sana"
    shutil.copytree(tiny_sdxl_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "SanaPipeline"}))
    monkeypatch.setattr(trainer_module, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"^pretrained_model: '.*sana' is a SanaPipeline, which alignprop cannot "
                       r"train; supported: StableDiffusionPipeline \(SD 1.x/2.x\), StableDiffusionXLPipeline \(SDXL\), "
                       r"StableDiffusion3Pipeline \(SD3, SD3.5\), FluxPipeline \(FLUX.1\), "
                       r"Flux2KleinPipeline \(FLUX.2 \[klein\]\), QwenImagePipeline \(Qwen-Image\), "
                       r"ZImagePipeline \(Z-Image\)$"):
        AlignPropTrainer(sdxl_config(pretrained_model=str(folder)))
    with pytest.raises(AlignPropError, match="is a Module, which alignprop cannot train; supported:"):
        family_of(torch.nn.Module())


def test_two_step_training_run_completes_with_sdxl_conditioning_under_grad(sdxl_config):
    trainer = AlignPropTrainer(sdxl_config(num_epochs=2, gradient_checkpointing=False))  # one hook call per UNet call
    assert trainer.family is SDXL and (trainer.height, trainer.width) == (128, 128)  # unet.sample_size * 8
    calls = []

    def record(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append((torch.is_grad_enabled(), kwargs["encoder_hidden_states"].shape,
                      tuple(added.get("text_embeds", torch.empty(0)).shape), added.get("time_ids")))

    trainer.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.trainable_params])
    result = trainer.train()
    assert len(result.history) == 2 and all(h["grad_norm"] > 0 for h in result.history)
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in trainer.trainable_params]))
    assert [c[0] for c in calls] == ([False] * 2 + [True] * 2) * 2
    for _, context, pooled, time_ids in calls:
        # CFG batch of 2 prompts: both text encoders' hidden states (32 + 32), pooled projection, 6 time ids
        assert context == (4, 77, 64) and pooled == (4, 32)
        assert time_ids.tolist() == [[128, 128, 0, 0, 128, 128]] * 4
    assert all(p.dtype == torch.float32 for p in trainer.trainable_params)


def test_lora_gradient_flows_through_the_added_conditioning(tiny_sdxl_path):
    """The time ids and the pooled text embedding reach the UNet under grad: changing either changes the LoRA
    gradient; leaving time_ids unset equals passing the pipeline's default (H, W, 0, 0, H, W)."""
    pipe = load_sdxl(tiny_sdxl_path)
    prepare_pipeline(pipe, "euler", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    for p in params:
        torch.nn.init.normal_(p, std=0.02)
    base = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, torch.device("cpu"))
    assert base.pooled.shape == (2, 32) and base.negative_pooled.abs().sum() == 0  # SDXL's zeroed negative

    def grad(embeddings):
        for p in params:
            p.grad = None
        images = sample_images(pipe, embeddings, num_steps=3, guidance_scale=5.0, eta=1.0, height=64, width=96,
                               grad_steps=2, generator=torch.Generator().manual_seed(0), gradient_checkpointing=True)
        assert images.shape == (2, 3, 64, 96)
        images.mean().backward()
        return torch.cat([p.grad.flatten() for p in params])

    def relative(a, b):
        return ((a - b).norm() / a.norm()).item()

    default = grad(base)
    explicit = grad(type(base)(base.positive, base.negative, base.pooled, base.negative_pooled,
                               torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 2)))
    cropped = grad(type(base)(base.positive, base.negative, base.pooled, base.negative_pooled,
                              torch.tensor([[512.0, 512, 128, 64, 64, 96]] * 2)))
    pooled = grad(type(base)(base.positive, base.negative, base.pooled.flip(0), base.negative_pooled))
    assert relative(default, explicit) < 1e-5
    assert relative(default, cropped) > 1e-3
    assert relative(default, pooled) > 1e-3


def test_exported_lora_loads_into_a_fresh_sdxl_pipeline_and_reproduces_the_trainer(sdxl_config, tiny_sdxl_path):
    trainer = AlignPropTrainer(sdxl_config(num_epochs=3, train_learning_rate=5e-2, lora_rank=4, lora_alpha=8,
                                           scheduler="euler"))
    result = trainer.train()
    file = result.output_dir / LORA_WEIGHTS_NAME
    with safe_open(str(file), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("unet.") for k in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 8  # scale alpha/rank travels

    pipe = load_sdxl(tiny_sdxl_path)

    def sample(pipe, seed, **kwargs):
        return pipe(["a cat"], generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images

    base = sample(pipe, 0, num_inference_steps=4)
    pipe.load_lora_weights(str(result.output_dir))
    tuned = sample(pipe, 0, num_inference_steps=4)
    assert (tuned - base).abs().max() > 1e-4
    # diffusers' own SDXL loop with the same scheduler, seed, eta and guidance reproduces the trainer's sampler
    config = trainer.config
    reference = sample(pipe, 3, num_inference_steps=config.sample_num_steps, eta=config.sample_eta,
                       guidance_scale=config.sample_guidance_scale)
    ours = trainer.generate(["a cat"], generator=torch.Generator().manual_seed(3))
    assert ours.shape == reference.shape == (1, 3, 128, 128)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_sdxl_vae_decodes_in_fp32_under_fp16(tiny_sdxl_path):
    pipe = load_sdxl(tiny_sdxl_path)
    prepare_pipeline(pipe, "ddim", torch.device("cpu"), torch.float16)
    assert pipe.vae.dtype == torch.float32  # force_upcast VAE kept in fp32, the rest in fp16
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float16
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half().float()
    with torch.no_grad():
        exact = SDXL.decode(pipe, latents)
        with torch.autocast("cpu", dtype=torch.float16):
            upcast = SDXL.decode(pipe, latents.half())
            plain = SD.decode(pipe, latents.half())  # SD-1 behaviour: autocast decides
        assert torch.allclose(upcast, exact, atol=1e-6) and not torch.allclose(plain, exact, atol=1e-6)
        pipe.vae.to(torch.float16)  # an fp16 VAE (e.g. loaded by a caller) is upcast for the decode, then restored
        restored = SDXL.decode(pipe, latents.half())
        assert pipe.vae.dtype == torch.float16
        reference = SDXL.decode(pipe.__class__(**{**pipe.components, "vae": pipe.vae.float()}), latents)
    assert torch.allclose(restored, reference, atol=1e-6)


# ---------------------------------------------------------------------------------------------- rewards


def _smooth_images(batch, height, width, seed=0):
    """Smooth random colour fields in [0, 1], like generated pictures."""
    coarse = torch.rand(batch, 3, height // 64, width // 64, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1)


def _tiny_clip_folder(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from alignprop_core.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # resize shortest side 224, center crop 224, CLIP norm
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_saturation_reward_on_sdxl_sized_non_square_images():
    from alignprop_core import plugins

    reward = plugins.build("reward", "saturation", {})
    images = _smooth_images(2, 768, 1024).requires_grad_(True)
    scores = reward(images, ["a", "b"], [{}, {}])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("height,width", [(768, 1024), (1024, 768)])
def test_clip_based_reward_on_sdxl_sized_non_square_images(tmp_path, height, width):
    """The aesthetic reward (CLIP ViT tower + LAION MLP) scores 1024x768 and 768x1024 images as its reference
    image processor does (shortest side to 224, center crop), with gradients back to every pixel it looks at."""
    pytest.importorskip("alignprop_reward_aesthetic")
    from alignprop_reward_aesthetic import AestheticMLP
    from PIL import Image
    from transformers import CLIPModel

    from alignprop_core import plugins

    folder = _tiny_clip_folder(tmp_path / "clip")
    torch.manual_seed(1)
    mlp = AestheticMLP((16, 24, 12, 8, 4)).eval()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    torch.save(mlp.state_dict(), tmp_path / "predictor.pth")
    reward = plugins.build("reward", "aesthetic", {"clip_model": folder, "predictor": str(tmp_path / "predictor.pth")})

    images = _smooth_images(3, height, width, seed=2)
    images = (images * 255).round() / 255  # exactly representable as uint8 for the PIL reference
    pixels = images.detach().clone().requires_grad_(True)
    scores = reward(pixels, ["p"] * 3, [{}] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and scores.std() > 1e-3
    scores.sum().backward()
    assert pixels.grad.abs().sum() > 0

    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5: the PIL implementation
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    pil = [Image.fromarray((i.permute(1, 2, 0) * 255).round().byte().numpy()) for i in images]
    reference_pixels = Processor.from_pretrained(folder)(images=pil, return_tensors="pt")["pixel_values"]
    assert reference_pixels.shape == (3, 3, 224, 224)
    with torch.no_grad():
        ours_pixels = reward.preprocess(images)
        model = CLIPModel.from_pretrained(folder).eval()
        embeds = model.get_image_features(pixel_values=reference_pixels)
        embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
        expected = mlp(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert (ours_pixels - reference_pixels).abs().mean() < 0.01
    spread = scores.std().item()
    torch.testing.assert_close(scores.detach(), expected, atol=0.05 * spread, rtol=0)
    # what a reward that squashed the image to 224 x 224 instead would have scored: far off
    squashed = reward(torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", antialias=True),
                      ["p"] * 3, [{}] * 3)
    assert (squashed - expected).abs().max() > 0.2 * spread
