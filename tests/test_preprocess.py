"""alignprop_core.preprocess (exported by plugin_api) against PIL and transformers' CLIPImageProcessor (PIL path).

The plugin tests compare whole rewards; these test the functions alone. Image helpers are copied from
plugins/conftest.py (its fixtures are not visible from tests/).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop_core import plugin_api as api
from alignprop_core.errors import AlignPropError


def uint8_image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random colour field plus fine noise (uint8 HWC), like a photo with texture."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float ``[1, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255


def pil_clip_processor_class():
    """transformers' CLIPImageProcessor with the PIL backend."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as Processor
    return Processor


# ----------------------------------------------------------------------------------------------------- resize
@pytest.mark.parametrize("source, target", [
    ((64, 64), (32, 32)),      # square downscale
    ((512, 512), (224, 224)),  # SD output to CLIP size
    ((300, 200), (224, 149)),  # portrait, non-integer ratio (aspect kept, as resize_shortest_side does)
    ((48, 80), (96, 160)),     # upscale
    ((97, 131), (50, 70)),     # odd sizes
    ((90, 33), (224, 149)),    # both sides grow, by different factors
])
def test_resize_is_within_about_one_level_of_pil_bicubic(source, target):
    """PIL rounds to uint8 after each of its two passes; we do not, so we are at most ~1/255 off (measured: max
    1.09/255, mean 0.32/255) and, rounded to uint8 levels, never more than one level off."""
    (h, w), (height, width) = source, target
    image = uint8_image(h, w, seed=h + w)
    reference = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC)).astype(np.float64)
    ours = api.resize(to_tensor(image), height, width)[0].permute(1, 2, 0).double().numpy() * 255
    assert ours.shape == reference.shape
    difference = np.abs(ours - reference)
    assert difference.max() < 1.25 and difference.mean() < 0.4
    assert np.abs(ours.round() - reference).max() <= 1


@pytest.mark.parametrize("source, target", [((200, 300), (300, 200)), ((64, 64), (40, 72)), ((300, 200), (224, 224))])
def test_resize_growing_one_side_and_shrinking_the_other_is_within_a_few_levels(source, target):
    """PIL then sometimes runs the height pass first (300x200 -> 224x224 here), so its intermediate rounding differs
    from ours: measured up to 3.3/255 (mean < 0.5/255), the bound the docstring gives."""
    (h, w), (height, width) = source, target
    image = uint8_image(h, w, seed=h + w)
    reference = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC)).astype(np.float64)
    ours = api.resize(to_tensor(image), height, width)[0].permute(1, 2, 0).double().numpy() * 255
    difference = np.abs(ours - reference)
    assert difference.max() < 3.5 and difference.mean() < 0.5


@pytest.mark.parametrize("source, target", [((64, 48), (64, 20)), ((31, 64), (100, 64))])
def test_resize_along_one_axis_rounds_to_pil_exactly(source, target):
    """One pass only: nothing is rounded in between, so ours rounds to PIL's uint8 values exactly."""
    (h, w), (height, width) = source, target
    image = uint8_image(h, w, seed=3)
    reference = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
    ours = (api.resize(to_tensor(image), height, width)[0].permute(1, 2, 0).numpy() * 255).round()
    assert (ours == reference).all()


def test_resize_keeps_values_in_range_and_same_size_is_identity():
    images = torch.rand(2, 3, 40, 56)
    images[:, :, ::2] = 0.0  # hard edges make bicubic over- and undershoot before the clamp
    images[:, :, 1::2] = 1.0
    out = api.resize(images, 17, 91)
    assert out.shape == (2, 3, 17, 91) and out.min() >= 0 and out.max() <= 1
    assert api.resize(images, 40, 56) is images


@pytest.mark.parametrize("shape, size, expected", [
    ((224, 300), 224, (224, 300)),
    ((100, 150), 64, (64, 96)),
    ((150, 100), 64, (96, 64)),
    ((512, 512), 224, (224, 224)),
    ((299, 224), 224, (299, 224)),
    ((480, 640), 224, (224, 298)),  # int(224 * 640 / 480) = 298, as transformers/torchvision truncate
])
def test_resize_shortest_side_shapes(shape, size, expected):
    out = api.resize_shortest_side(torch.rand(1, 3, *shape), size)
    assert tuple(out.shape[-2:]) == expected


@pytest.mark.parametrize("shape, inner, top, left", [
    ((200, 300), (149, 224), 37, 0),   # landscape: padded above and below
    ((300, 200), (224, 149), 0, 37),   # portrait: padded left and right
    ((64, 64), (224, 224), 0, 0),      # square: no padding
    ((100, 401), (56, 224), 84, 0),    # odd padding: one more row below
])
def test_resize_longest_side_pad_shapes_and_offsets(shape, inner, top, left):
    fill = 0.25
    out = api.resize_longest_side_pad(torch.ones(1, 3, *shape), 224, fill=fill)
    assert out.shape == (1, 3, 224, 224)
    content = (out[0, 0] - 1).abs() < 1e-5  # a constant image stays constant under bicubic resizing
    rows, cols = content.any(dim=1).nonzero().squeeze(1), content.any(dim=0).nonzero().squeeze(1)
    assert (rows[0].item(), cols[0].item()) == (top, left)
    assert (len(rows), len(cols)) == inner
    assert ((out[0, 0] == fill) | content).all()  # everything else is the fill value


def test_normalize_uses_clip_statistics_by_default():
    images = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor(api.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(api.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(api.normalize(images), (images - mean) / std)
    torch.testing.assert_close(api.normalize(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), images * 2 - 1)


# -------------------------------------------------------------------------- transformers image processors
PROCESSOR_CASES = {
    "clip-224": ({}, [(256, 256), (299, 224), (224, 301), (480, 640), (100, 60)]),
    "small-crop": ({"size": {"shortest_edge": 64}, "crop_size": {"height": 56, "width": 48},
                    "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}, [(64, 64), (81, 120), (150, 97)]),
    "exact-size": ({"size": {"height": 40, "width": 72}, "do_center_crop": False}, [(90, 120), (30, 33)]),
    "crop-pads": ({"do_resize": False, "crop_size": {"height": 64, "width": 64}}, [(48, 40), (64, 90), (32, 70)]),
}


@pytest.mark.parametrize("case, shape", [(case, shape) for case, (_, shapes) in PROCESSOR_CASES.items()
                                         for shape in shapes])
def test_image_processor_preprocess_matches_clip_image_processor(case, shape, tmp_path):
    """Our tensor pipeline vs CLIPImageProcessor's PIL path, settings read back from its saved config: within one
    uint8 level (it rounds after resizing; we do not), and mostly identical once ours is rounded too."""
    kwargs = PROCESSOR_CASES[case][0]
    pil_class = pil_clip_processor_class()
    pil_class(**kwargs).save_pretrained(tmp_path)
    config = api.read_image_processor_config(str(tmp_path))
    processor = pil_class.from_pretrained(tmp_path)
    image = uint8_image(*shape, seed=sum(shape))
    reference = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    ours = api.image_processor_preprocess(to_tensor(image), config)
    assert ours.shape == reference.shape
    mean = torch.tensor(config["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["image_std"]).view(1, 3, 1, 1)
    level = 1 / 255 / std.min().item()  # one uint8 level in normalised units
    difference = (ours - reference).abs()
    assert difference.max() < 1.25 * level and difference.mean() < 0.4 * level
    quantised = (((ours * std + mean) * 255).round() / 255 - mean) / std
    assert ((quantised - reference).abs() < 1e-4).float().mean() > 0.75


def test_odd_centre_crop_padding_puts_the_extra_row_below_and_column_right():
    """A crop larger than the image pads with zeros; an odd margin's extra row/column goes below/right, as in
    transformers' default (torchvision) CLIPImageProcessor. Its PIL backend puts it above/left instead (one pixel
    apart; only configs with do_resize false or a crop larger than the resize reach this)."""
    config = {**api.CLIP_PROCESSOR_CONFIG, "do_resize": False, "crop_size": {"height": 64, "width": 64},
              "do_normalize": False}
    out = api.image_processor_preprocess(torch.ones(1, 3, 33, 51), config)
    content = out[0, 0] > 0.5
    rows, cols = content.any(dim=1).nonzero().squeeze(1), content.any(dim=0).nonzero().squeeze(1)
    assert (rows[0].item(), rows[-1].item(), cols[0].item(), cols[-1].item()) == (15, 47, 6, 56)
    pytest.importorskip("torchvision")
    from transformers import CLIPImageProcessor

    if pil_clip_processor_class() is CLIPImageProcessor:
        pytest.skip("transformers 4.x: CLIPImageProcessor is the PIL implementation")
    processor = CLIPImageProcessor(do_resize=False, crop_size={"height": 64, "width": 64})
    image = uint8_image(33, 51, seed=5)
    reference = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    ours = api.image_processor_preprocess(to_tensor(image), {**config, "do_normalize": True})
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_read_image_processor_config_fills_defaults_and_reads_nested_and_int_sizes(tmp_path):
    assert api.read_image_processor_config(str(tmp_path)) == api.CLIP_PROCESSOR_CONFIG  # nothing shipped
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"size": 96, "crop_size": 80, "image_mean": [0, 0, 0], "unrelated": 1}}))
    config = api.read_image_processor_config(str(tmp_path))
    assert config["size"] == {"shortest_edge": 96} and config["crop_size"] == {"height": 80, "width": 80}
    assert config["image_mean"] == [0, 0, 0] and config["image_std"] == api.CLIP_STD and "unrelated" not in config
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))  # preferred over the other
    with pytest.warns(UserWarning, match="resample=2; rewards resize bicubic"):
        assert api.read_image_processor_config(str(tmp_path))["size"] == {"shortest_edge": 224}


# ------------------------------------------------------------------------------------------ checks, gradients
@pytest.mark.parametrize("images, shown", [
    ([[0.5]], "got list"),
    (torch.rand(3, 8, 8), "got (3, 8, 8)"),
    (torch.rand(2, 4, 8, 8), "got (2, 4, 8, 8)"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "got dtype torch.uint8; convert with x / 255"),
])
def test_check_images_is_a_one_line_error_naming_the_reward(images, shown):
    with pytest.raises(AlignPropError) as info:
        api.check_images(images, "my_reward")
    message = str(info.value)
    assert message.startswith("my_reward: expected ") and shown in message and "\n" not in message
    api.check_images(torch.rand(2, 3, 5, 7), "my_reward")  # a good batch passes


@pytest.mark.parametrize("prompts, shown", [("a cat", "a single string"), (["a cat"], "1 prompts"),
                                            (["a", "b", "c"], "3 prompts")])
def test_check_prompts_wants_one_prompt_per_image(prompts, shown):
    with pytest.raises(AlignPropError) as info:
        api.check_prompts(prompts, 2, "my_reward")
    assert str(info.value) == f"my_reward: got 2 images but {shown}; pass one prompt per image (a list)"
    api.check_prompts(["a cat", "a dog"], 2, "my_reward")  # one per image passes
    api.check_prompts(("a cat", "a dog"), 2, "my_reward")  # a tuple too


@pytest.mark.parametrize("name, function", [
    ("resize", lambda x: api.resize(x, 24, 20)),
    ("resize_shortest_side", lambda x: api.resize_shortest_side(x, 16)),
    ("resize_longest_side_pad", lambda x: api.resize_longest_side_pad(x, 32, fill=0.5)),
    ("normalize", api.normalize),
    ("image_processor_preprocess", lambda x: api.image_processor_preprocess(x, {
        **api.CLIP_PROCESSOR_CONFIG, "size": {"shortest_edge": 20}, "crop_size": {"height": 18, "width": 18}})),
])
def test_gradients_flow_to_the_input(name, function):
    images = torch.rand(2, 3, 30, 45).clamp(0.05, 0.95).requires_grad_(True)  # away from the clamp's flat parts
    out = function(images)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad[0].abs().sum() > 0) and (images.grad[1].abs().sum() > 0), name
    assert images.grad.abs().sum() > 0
