"""Tests for the HPS reward plugin on a tiny random-init open_clip model of the real CLIP architecture.

The tiny model is registered as an open_clip model config (JSON in tmp_path), saved in the real HPS checkpoint
format (``{"state_dict": ...}`` pickled with torch.save) and loaded back through the plugin's own factory.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from PIL import Image  # noqa: E402

from alignprop_core import plugins  # noqa: E402
from alignprop_core.plugin_api import AlignPropError  # noqa: E402

ARCH = "alignprop-tiny-hps-test"
TINY_CONFIG = {
    "embed_dim": 16,
    # real ViT-H-14 input size (224) so the real preprocessing geometry is exercised; tiny widths/depths
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny CLIP + its config file + checkpoints in the formats HPS files come in."""
    root = tmp_path_factory.mktemp("hps")
    config_path = root / f"{ARCH}.json"
    config_path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config_path))
    other_path = root / f"{ARCH}-wide.json"  # same family, different widths: the checkpoint does not fit it
    other_path.write_text(json.dumps({**TINY_CONFIG, "embed_dim": 24}))
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None).eval()
    state_dict = model.state_dict()
    paths = {
        "nested": root / "HPS_v2.1_compressed.pt",
        "plain": root / "plain.pt",
        "ddp": root / "ddp.pt",
    }
    torch.save({"epoch": 1, "name": "tiny", "state_dict": state_dict}, paths["nested"])
    torch.save(state_dict, paths["plain"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, paths["ddp"])
    return {"model": model, "config_path": config_path, "other_config_path": other_path, "paths": paths}


def build(tiny, kind="nested", **options):
    options = {"checkpoint": str(tiny["paths"][kind]), "architecture": str(tiny["config_path"]), **options}
    return plugins.build("reward", "hps", options)


def random_images(batch=2, height=224, width=224, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator)


def test_entry_point_is_installed():
    found = plugins.registrations("reward")
    assert "hps" in found
    assert found["hps"].package == "alignprop-reward-hps"
    assert found["hps"].plugin == "hps"


def test_score_is_open_clip_cosine_per_pair(tiny):
    reward = build(tiny)
    images = random_images()  # 224x224: preprocessing is only the CLIP normalisation
    scores = reward(images, PROMPTS, [{}, {}])
    assert scores.shape == (2,)

    # independent computation: open_clip's own forward on the original in-memory weights
    model = tiny["model"]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens = open_clip.get_tokenizer(ARCH)(PROMPTS)
    with torch.no_grad():
        out = model((images - mean) / std, tokens)
    image_features, text_features = out[0], out[1]  # open_clip returns L2-normalised features
    expected = torch.diagonal(image_features @ text_features.T)
    torch.testing.assert_close(scores.detach(), expected, atol=1e-5, rtol=1e-5)
    # the diagonal matters: the pairs are scored with their own prompt, not prompt 0
    swapped = reward(images, PROMPTS[::-1], [{}, {}]).detach()
    torch.testing.assert_close(swapped, torch.diagonal(image_features @ text_features.flip(0).T), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(swapped, scores.detach())


def test_checkpoint_formats_and_architecture_name_load_the_same_weights(tiny):
    images = random_images(seed=1)
    reference = build(tiny)(images, PROMPTS, [{}, {}]).detach()
    for kind in ("plain", "ddp"):
        torch.testing.assert_close(build(tiny, kind)(images, PROMPTS, [{}, {}]).detach(), reference)
    by_name = build(tiny, architecture=ARCH)  # a registered model-config name works as well as a JSON path
    torch.testing.assert_close(by_name(images, PROMPTS, [{}, {}]).detach(), reference)
    assert by_name.version == "v2.1"


def test_gradient_reaches_images_and_reward_is_frozen(tiny, helpers):
    images = random_images(height=200, width=300).requires_grad_(True)  # non-square: resize + pad in the graph
    helpers.assert_gradient_reaches_images_never_weights(build(tiny), images, PROMPTS, [{}, {}])


@pytest.mark.parametrize(
    "height,width,kind",
    [(512, 512, "smooth"), (1024, 1024, "smooth"), (300, 200, "smooth"), (333, 1000, "smooth"), (512, 768, "noise")],
)
def test_preprocessing_matches_open_clip_longest_side_transform(tiny, height, width, kind, helpers):
    reward = build(tiny)
    # the reference: open_clip's PIL transform for HPS (longest side to 224 bicubic, centred zero pad, CLIP norm)
    reference_transform = open_clip.image_transform(224, is_train=False, resize_mode="longest", fill_color=0)
    if kind == "smooth":
        array = helpers.smooth_uint8(height, width, seed=height + width)
    else:
        array = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    reference_pixels = reference_transform(Image.fromarray(array)).unsqueeze(0)
    images = helpers.to_tensor(array)
    ours = reward.preprocess(images)
    assert ours.shape == reference_pixels.shape == (1, 3, 224, 224)
    # same geometry (new size rounding and pad placement): the zero-padded border is identical
    pad_value = ((0 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)) / torch.tensor(open_clip.OPENAI_DATASET_STD))
    ref_pad = torch.isclose(reference_pixels, pad_value.view(1, 3, 1, 1), atol=1e-6).all(1)
    our_pad = torch.isclose(ours, pad_value.view(1, 3, 1, 1), atol=1e-6).all(1)
    if height != width:
        assert ref_pad.sum() > 0
    assert torch.equal(ref_pad, our_pad) or (ref_pad ^ our_pad).sum() < 4  # at most a stray black pixel
    # pixel differences come from PIL's uint8 rounding (and clipping between its two resize passes); measured
    # max |diff| in normalised units (0.015 ~ one uint8 level): smooth 512: 0.015, 1024: 0.014, 300x200: 0.015,
    # 333x1000: 0.013, white noise 512x768: 0.014; mean |diff| 0.001-0.004. PIL outputs uint8 levels: rounding our
    # image to uint8 levels makes 86-98% of the values identical and leaves the rest exactly one level apart (0.015)
    helpers.assert_within_one_uint8_level(ours, reference_pixels, open_clip.OPENAI_DATASET_MEAN,
                                          open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        text = reward.text_features([PROMPTS[0]])
        ref_score = (reward.model.encode_image(reference_pixels, normalize=True) * text).sum(-1)
        our_score = reward(images, [PROMPTS[0]], [{}])
    # measured |score diff| on the tiny model (scores ~ -0.25): smooth 8e-6 .. 9.2e-5, noise 512x768 1.9e-4
    assert (our_score - ref_score).abs().max() < 5e-4


def test_text_embeddings_are_cached_per_prompt(tiny, monkeypatch):
    reward = build(tiny)
    calls = []
    encode_text = reward.model.encode_text

    def spy(tokens, *args, **kwargs):
        calls.append(tokens.shape[0])
        return encode_text(tokens, *args, **kwargs)

    monkeypatch.setattr(reward.model, "encode_text", spy)
    images = random_images()
    first = reward(images, PROMPTS, [{}, {}])
    assert calls == [2]
    second = reward(images, PROMPTS, [{}, {}])
    assert calls == [2]  # cache hit: no re-encoding
    torch.testing.assert_close(first, second)
    reward(images, [PROMPTS[0], "a new prompt"], [{}, {}])
    assert calls == [2, 1]  # only the new prompt is encoded


def test_missing_local_checkpoint_is_a_clear_error(tiny, tmp_path):
    missing = tmp_path / "nope" / "HPS_v2.1_compressed.pt"
    with pytest.raises(AlignPropError, match="does not exist.*'checkpoint'") as info:
        build(tiny, checkpoint=str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_unreachable_hub_is_a_clear_error(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(AlignPropError, match=r"HPS_v2_compressed\.pt.*xswu/HPSv2.*'checkpoint'"):
        plugins.build("reward", "hps", {"version": "v2", "architecture": str(tiny["config_path"])})


def test_bad_options_are_clear_errors(tiny, tmp_path):
    with pytest.raises(AlignPropError, match="version.*v2, v2.1"):
        build(tiny, version="v3")
    with pytest.raises(AlignPropError, match="unknown open_clip architecture"):
        build(tiny, architecture="no-such-arch")
    with pytest.raises(AlignPropError, match="does not fit the open_clip architecture"):
        build(tiny, architecture=str(tiny["other_config_path"]))
    junk = tmp_path / "junk.pt"
    torch.save({"state_dict": {"a": "not a tensor"}}, junk)
    with pytest.raises(AlignPropError, match="no state dict"):
        build(tiny, checkpoint=str(junk))


def test_two_step_training_run_with_hps(tiny, train_two_steps):
    out = train_two_steps("hps", {"checkpoint": str(tiny["paths"]["nested"]), "architecture": str(tiny["config_path"])})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture
def bad_files(tmp_path):
    """Paths for the wrong things: a folder, a binary file, JSON that is not an open_clip config, broken JSON."""
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x01binary")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{nope")
    return tmp_path


@pytest.mark.parametrize("options, parts", [
    ({"version": 2.1}, ["option 'version' must be one of v2, v2.1, got 2.1"]),
    ({"version": None}, ["option 'version' must be one of v2, v2.1, got None"]),
    ({"checkpoint": 5}, ["option 'checkpoint' must be a local HPS_v2.1_compressed.pt file", "got 5"]),
    ({"checkpoint": ""}, ["option 'checkpoint' must be", "got ''"]),
    ({"checkpoint": "{folder.json}"}, ["checkpoint file '{folder.json}' is a folder, not a file; set the "
                                       "'checkpoint' option"]),
    ({"architecture": 7}, ["option 'architecture' must be an open_clip model-config name", "got 7"]),
    ({"architecture": ""}, ["option 'architecture' must be", "got ''"]),
    ({"architecture": "{folder.json}"}, ["architecture file '{folder.json}' is a folder, not a file"]),
    ({"architecture": "{missing.json}"}, ["architecture file '{missing.json}' does not exist; set the 'architecture'"]),
    ({"architecture": "{binary.json}"}, ["architecture file '{binary.json}' is a binary file, not text"]),
    ({"architecture": "{list.json}"}, ["'{list.json}' is not an open_clip model config (missing embed_dim, "
                                       "vision_cfg, text_cfg)"]),
    ({"architecture": "{broken.json}"}, ["architecture file '{broken.json}' is not valid JSON"]),
])
def test_bad_options_are_one_line_errors_before_loading(tiny, bad_files, monkeypatch, options, parts):
    import alignprop_reward_hps as module

    from alignprop_core.plugin_api import PluginError

    def fail(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the options were checked")

    monkeypatch.setattr(module, "_load_state_dict", fail)
    monkeypatch.setattr(module, "_create_model", fail)

    def fill(value):
        if isinstance(value, str):
            for name in ("folder.json", "binary.json", "list.json", "broken.json", "missing.json"):
                value = value.replace("{" + name + "}", str(bad_files / name))
        return value

    with pytest.raises(PluginError) as info:
        build(tiny, **{k: fill(v) for k, v in options.items()})
    message = str(info.value)
    assert message.startswith("reward 'hps': ") and "\n" not in message
    for part in parts:
        assert fill(part) in message, (fill(part), message)


def test_binary_checkpoint_is_a_short_one_line_error(tiny, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(AlignPropError, match=r"cannot read checkpoint .*\(not a torch.save file of tensors only\)"
                       ) as info:
        build(tiny, checkpoint=str(junk))
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
