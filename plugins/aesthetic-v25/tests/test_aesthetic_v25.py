"""Tests of the ``aesthetic_v25`` reward on a tiny random-init SigLIP (the real architecture, shrunk) and a head of
the published layout, loaded from disk, against the ``aesthetic-predictor-v2-5`` package's own model and
processor (PIL path) on the same weights.

Run: cd /work/main && .venv/bin/python -m pytest plugins/aesthetic-v25 -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

IMAGE_SIZE = 56  # the tiny tower's input (the real one: 384); patch 14 as so400m
SHAPES = [(224, 224), (512, 512), (512, 768), (768, 512), (333, 517)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SiglipModel (text + vision, as google/siglip-so400m-patch14-384 ships) with its image processor, and a
    head state dict ``scoring_head.*`` for its width, with weights large enough that scores spread."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    root = tmp_path_factory.mktemp("aesthetic_v25")
    config = SiglipConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=14))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(root / "siglip")
    from alignprop_reward_aesthetic_v25 import AestheticV25Head

    head = AestheticV25Head(48)
    with torch.no_grad():  # default init gives scores within ~0.01 of each other: widen the spread to ~1, around 5
        for layer in head.scoring_head[:-1]:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(4.0)
        head.scoring_head[-1].bias.fill_(5.0)
    torch.save(head.state_dict(), root / "head.pth")
    return {"siglip": str(root / "siglip"), "head": str(root / "head.pth"), "root": root}


@pytest.fixture(scope="module")
def reward(tiny):
    from alignprop_core import plugins

    return plugins.build("reward", "aesthetic_v25", {"siglip": tiny["siglip"], "head": tiny["head"]})


def reference_scores(tiny, images):
    """The package's path: AestheticPredictorV2_5Model.from_pretrained(SigLIP) with the head loaded into
    ``model.layers`` (as convert_v2_5_from_siglip does, minus the download), AestheticPredictorV2_5Processor on PIL
    images, ``model(pixel_values).logits``."""
    from aesthetic_predictor_v2_5 import AestheticPredictorV2_5Model, AestheticPredictorV2_5Processor
    from PIL import Image

    model = AestheticPredictorV2_5Model.from_pretrained(tiny["siglip"])
    model.layers.load_state_dict(torch.load(tiny["head"], map_location="cpu", weights_only=True))
    model.eval()
    processor = AestheticPredictorV2_5Processor.from_pretrained(tiny["siglip"])
    pil = _pil_processor(tiny["siglip"])
    pixels = pil(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores = model(pixels).logits.squeeze(-1)
    return scores, pixels, processor


def _pil_processor(folder):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil.from_pretrained(folder)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def test_entry_point_registers_aesthetic_v25():
    from alignprop_reward_aesthetic_v25 import AestheticV25Reward

    from alignprop_core import plugins

    registration = plugins.registrations("reward")["aesthetic_v25"]
    assert registration.package == "alignprop-reward-aesthetic-v25"
    assert registration.factory == AestheticV25Reward.from_options
    assert "AGPL-3.0" in dict(registration.details)["license"]


def test_head_layout_is_the_packages(tiny):
    from aesthetic_predictor_v2_5 import AestheticPredictorV2_5Head
    from alignprop_reward_aesthetic_v25 import AestheticV25Head
    from transformers import SiglipVisionConfig

    theirs = AestheticPredictorV2_5Head(SiglipVisionConfig(hidden_size=1152)).state_dict()
    ours = AestheticV25Head(1152).state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_and_pixels_match_the_package_on_pil_images(tiny, reward, helpers, shape):
    """Measured (tiny tower, these images; scores 1.8-9.5): pixels max |diff| 0.0056-0.0066 in normalised units
    (std 0.5, so under 1/255 before normalising: PIL rounds each resize pass to uint8), scores 0.0035-0.027."""
    h, w = shape
    images = [helpers.uint8_image(h, w, seed=h + 2 * w + i) for i in range(3)]
    expected, ref_pixels, _ = reference_scores(tiny, images)
    batch = torch.cat([to_tensor(i) for i in images])
    pixels = reward.preprocess(batch)
    assert pixels.shape == ref_pixels.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    diff = (pixels - ref_pixels).abs()
    assert diff.max() < 0.025 and diff.mean() < 0.006, (diff.max().item(), diff.mean().item())
    with torch.no_grad():
        got = reward(batch, ["x"] * 3, [{}] * 3)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert expected.std() > 0.05, "scores must differ between images, or the comparison proves little"
    assert (got - expected).abs().max() < 0.06, (got, expected)


def test_model_path_is_exact_on_the_references_pixels(tiny, reward, helpers):
    images = [helpers.uint8_image(300, 400, seed=s) for s in range(2)]
    expected, ref_pixels, _ = reference_scores(tiny, images)
    with torch.no_grad():
        embeds = reward.vision(pixel_values=ref_pixels).pooler_output
        got = reward.head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_package_processor_resizes_without_crop(tiny, reward):
    """SigLIP squashes: a 100x300 picture's left third ends up in the left third of the input (no centre crop)."""
    image = torch.zeros(1, 3, 100, 300)
    image[..., :100] = 1.0
    pixels = reward.preprocess(image)
    third = IMAGE_SIZE // 3
    assert pixels[..., : third - 2].min() > 0.9 and pixels[..., third + 2:].max() < -0.9


def test_gradient_reaches_images_never_weights(reward, helpers):
    images = torch.rand(2, 3, 90, 120, requires_grad=True)
    helpers.assert_gradient_reaches_images_never_weights(reward, images, ["a", "b"], [{}, {}])


def test_embed_images_is_normalised(reward):
    with torch.no_grad():
        torch.testing.assert_close(reward.embed_images(torch.rand(2, 3, 64, 64)).norm(dim=-1), torch.ones(2))


def test_bfloat16_runs_and_stays_close(tiny, reward):
    from alignprop_reward_aesthetic_v25 import AestheticV25Reward

    half = AestheticV25Reward.from_options(siglip=tiny["siglip"], head=tiny["head"], dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores = half(images, ["a", "b"], [{}, {}])
    scores.sum().backward()
    assert scores.dtype == torch.float32 and torch.isfinite(images.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(scores.detach(), reward(images.detach()), atol=0.2, rtol=0)


def test_two_step_training_with_aesthetic_v25(tiny, train_two_steps):
    out = train_two_steps("aesthetic_v25", {"siglip": tiny["siglip"], "head": tiny["head"]})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_missing_or_wrong_weights_are_one_line_errors(tiny, tmp_path, helpers):
    from alignprop_reward_aesthetic_v25 import AestheticV25Head, AestheticV25Reward

    from alignprop_core.plugin_api import AlignPropError

    def error(**options):
        with pytest.raises(AlignPropError) as info:
            AestheticV25Reward.from_options(**{"siglip": tiny["siglip"], "head": tiny["head"], **options})
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "head file" in error(head=str(tmp_path / "none.pth")) and "does not exist" in error(
        head=str(tmp_path / "none.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x89PNG not a checkpoint")
    assert "cannot read the head" in error(head=str(junk))
    torch.save({"scoring_head.0.weight": 3}, tmp_path / "notensors.pth")
    assert "holds no state dict of tensors" in error(head=str(tmp_path / "notensors.pth"))
    torch.save(AestheticV25Head(1152).state_dict(), tmp_path / "wide.pth")  # the real head on the tiny tower
    assert "does not fit a 48-wide SigLIP" in error(head=str(tmp_path / "wide.pth"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    assert "does not fit" in error(head=str(tmp_path / "other.pth"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "could not load the SigLIP vision model from local folder" in error(siglip=str(empty))
    clip, _ = helpers.save_tiny_clip(tmp_path / "clip")  # another model's checkpoint: no SigLIP weights
    message = error(siglip=clip)
    assert "could not load the SigLIP" in message or "lacks" in message


@pytest.mark.parametrize("options, part", [
    ({"siglip": 3}, "option 'siglip' must be a hub id or a local copy of google/siglip-so400m-patch14-384"),
    ({"siglip": "a b"}, "neither an existing folder nor a valid hub id"),
    ({"head": 5}, "option 'head' must be a local aesthetic_predictor_v2_5.pth"),
    ({"head": ""}, "option 'head'"),
    ({"dtype": "float64"}, "option 'dtype' must be one of float32, float16, bfloat16"),
    ({"size": 384}, "does not accept options"),
])
def test_bad_options_are_one_line_errors(tiny, options, part):
    from alignprop_core import plugins
    from alignprop_core.plugin_api import PluginError

    with pytest.raises(PluginError) as info:
        plugins.build("reward", "aesthetic_v25", {"siglip": tiny["siglip"], "head": tiny["head"], **options})
    assert part in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_bad_inputs_are_one_line_errors(reward):
    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(3, 64, 64))
