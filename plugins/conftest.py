"""Helpers shared by the plugin tests, as fixtures: with ``--import-mode=importlib`` test files cannot import each
other. The root conftest.py provides ``tiny_sd_path`` and ``tiny_config``."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch


def save_tiny_clip(model_dir, processor_dir=None, image_size=224, processor_kwargs=None, seed=0, **config):
    """A tiny random transformers CLIPModel (the real architecture) saved to ``model_dir``, and a CLIPProcessor
    (character-level CLIP tokenizer + ``CLIPImageProcessor(**processor_kwargs)``) to ``processor_dir`` (default: the
    same folder). ``config``: more CLIPConfig arguments (projection_dim defaults to 16). Returns both folders."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from alignprop_core.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=32),
        **{"projection_dim": 16, **config},
    )
    torch.manual_seed(seed)
    CLIPModel(clip_config).save_pretrained(model_dir)
    processor_dir = processor_dir or model_dir
    CLIPProcessor(image_processor=CLIPImageProcessor(**(processor_kwargs or {})), tokenizer=tokenizer
                  ).save_pretrained(processor_dir)
    return str(model_dir), str(processor_dir)


def pil_clip_processor(folder):
    """transformers' CLIPImageProcessor with the PIL backend, read from ``folder``."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(folder)


def uint8_image(h, w, seed):
    """Smooth random colour field plus fine noise (uint8 HWC), like a photo with texture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def smooth_uint8(height, width, seed):
    """A smooth synthetic picture (gradients + blobs), closer to generated images than white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(1, 6, size=3)
        channels.append(0.5 + 0.25 * np.sin(a * 6.28 * x + b) * np.cos(c * 6.28 * y) + 0.2 * np.sin(9 * x * y + a))
    return (np.clip(np.stack(channels, -1), 0, 1) * 255).round().astype(np.uint8)


def to_tensor(images):
    """uint8 HWC array (or a list of them) -> float ``[B, 3, H, W]`` in [0, 1]."""
    arrays = [images] if isinstance(images, np.ndarray) else images
    return torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in arrays]).float() / 255


def assert_within_one_uint8_level(ours, reference, mean, std):
    """``ours`` vs a reference processor that rounds its resized image to uint8 (normalised with ``mean``/``std``):
    mean |diff| < 0.01; with ours rounded to uint8 levels too, > 80 % identical and none over one level (0.016) off."""
    assert (ours - reference).abs().mean() < 0.01
    std = torch.tensor(std).view(1, 3, 1, 1)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    quantised = ((((ours * std + mean) * 255).round() / 255) - mean) / std
    difference = (quantised - reference).abs()
    assert (difference < 1e-4).float().mean() > 0.8
    assert difference.max() < 0.016


def assert_gradient_reaches_images_never_weights(reward, images, prompts, metadata):
    """The frozen-reward contract on ``images`` (a leaf that requires grad): ``train()`` leaves every submodule in
    eval mode, no parameter requires grad, the scores are differentiable and their backward gives the images a
    finite, non-zero gradient and the weights none, and a second call scores the same (no dropout). Returns the
    scores (detached) and the image gradient, for a plugin's own checks on top."""
    reward.train()  # a reward stays in eval mode even if someone asks for train mode
    assert not any(module.training for module in reward.modules())
    assert not any(p.requires_grad for p in reward.parameters())
    scores = reward(images, prompts, metadata)
    assert scores.grad_fn is not None
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    torch.testing.assert_close(reward(images.detach(), prompts, metadata), scores.detach())
    return scores.detach(), images.grad


@pytest.fixture(scope="session")
def helpers():
    """The functions above."""
    return types.SimpleNamespace(save_tiny_clip=save_tiny_clip, pil_clip_processor=pil_clip_processor,
                                 uint8_image=uint8_image, smooth_uint8=smooth_uint8, to_tensor=to_tensor,
                                 assert_within_one_uint8_level=assert_within_one_uint8_level,
                                 assert_gradient_reaches_images_never_weights=assert_gradient_reaches_images_never_weights)


@pytest.fixture
def train_two_steps(tiny_sd_path, tmp_path):
    """``train_two_steps(reward_name, options)``: 2 epochs of 2 steps (batch 1) on the tiny pipeline with that one
    reward; returns the output folder."""

    def run(name, options):
        from alignprop_core import AlignPropConfig, AlignPropTrainer

        out = tmp_path / "out"
        AlignPropTrainer(AlignPropConfig(
            pretrained_model=str(tiny_sd_path), rewards=[{"name": name, "weight": 1.0, "options": options}],
            num_epochs=2, sample_num_steps=2, train_batch_size=1, eval_num_samples=0, mixed_precision="no",
            output_dir=str(out))).train()
        return out

    return run
