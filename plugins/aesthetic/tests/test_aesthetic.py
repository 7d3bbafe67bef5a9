"""Tests of the ``aesthetic`` reward on tiny random-init models of the real architectures, loaded from disk.

Run: cd /work/main && PYTHONPATH=/work/main .venv/bin/python -m pytest plugins/aesthetic -q --import-mode=importlib
"""

from __future__ import annotations

import argparse

import pytest
import torch

PROJ_DIM = 16
MLP_DIMS = (PROJ_DIM, 24, 12, 8, 4)  # the real predictor is 768-1024-128-64-16(-1)


def _tiny_mlp_state(seed=1):
    """A random LAION-predictor state dict with the real key layout and structure, tiny widths."""
    from alignprop_reward_aesthetic import AestheticMLP

    torch.manual_seed(seed)
    mlp = AestheticMLP(MLP_DIMS)
    for p in mlp.parameters():  # spread the scores out so that differences are visible
        torch.nn.init.normal_(p, std=0.5)
    return {k: v.detach().clone() for k, v in mlp.state_dict().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, helpers):
    root = tmp_path_factory.mktemp("aesthetic")
    clip_dir, _ = helpers.save_tiny_clip(root / "clip", projection_dim=PROJ_DIM)
    state = _tiny_mlp_state()
    torch.save(state, root / "predictor.pth")
    return {"clip_model": clip_dir, "predictor": str(root / "predictor.pth"), "state": state, "root": root}


@pytest.fixture(scope="module")
def reward(tiny):
    from alignprop_core import plugins

    return plugins.build("reward", "aesthetic", {"clip_model": tiny["clip_model"], "predictor": tiny["predictor"]})


def _reference_scores(folder, state, images, helpers):
    """Independent computation: transformers CLIPModel.get_image_features on the image processor's pixels,
    L2-normalised, then the predictor's five affine layers applied by hand from the state dict."""
    from PIL import Image
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    processor = helpers.pil_clip_processor(folder)
    pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1), pixels


def test_entry_point_registers_aesthetic():
    from alignprop_reward_aesthetic import AestheticReward

    from alignprop_core import plugins

    registration = plugins.registrations("reward")["aesthetic"]
    assert registration.package == "alignprop-reward-aesthetic"
    assert registration.factory == AestheticReward.from_options
    assert registration.plugin == "aesthetic"


def test_score_matches_transformers_clip_and_laion_mlp(tiny, reward, helpers):
    """224x224 images need no resize or crop: only float rounding separates us from the reference."""
    images = [helpers.uint8_image(224, 224, seed) for seed in range(3)]
    expected, _ = _reference_scores(tiny["clip_model"], tiny["state"], images, helpers)
    with torch.no_grad():
        got = reward(helpers.to_tensor(images), ["p"] * 3, [{}] * 3)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert expected.std() > 0.05  # the images score differently, so the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(256, 256), (299, 224), (224, 301), (512, 512), (640, 1024), (1024, 1024)])
def test_preprocessing_parity_with_pil_image_processor(tiny, reward, shape, helpers):
    """Tensor path vs transformers' CLIPImageProcessor (PIL) on the same uint8 image.

    Measured (these images; transformers 5.24, Pillow 13, torch 2.13 CPU): max |pixel diff| 0.0156 in normalised
    units (about 1.1/255: PIL rounds to uint8 after each of its two resize passes), mean <= 0.0045; exactly 0 for
    the crop-only shapes (299x224, 224x301). Score diff <= 3.4e-3 here (<= 5.6e-3 over more shapes) on the tiny
    model whose scores span 7.4-8.2 across images. With torchvision's round-half-even crop offset and a one-pass
    resize instead, the 299x224 image is off by 0.81 per pixel and 0.078 in score: caught here.
    """
    h, w = shape
    img = helpers.uint8_image(h, w, seed=h + w)
    expected, ref_pixels = _reference_scores(tiny["clip_model"], tiny["state"], [img], helpers)
    pixels = reward.preprocess(helpers.to_tensor(img))
    assert pixels.shape == ref_pixels.shape == (1, 3, 224, 224)
    diff = (pixels - ref_pixels).abs()
    assert diff.max() < 0.025 and diff.mean() < 0.006, (diff.max().item(), diff.mean().item())
    with torch.no_grad():
        got = reward(helpers.to_tensor(img), ["p"], [{}])
    assert abs(got.item() - expected.item()) < 0.01, (got.item(), expected.item())


def test_preprocessing_is_read_from_the_clip_folder(tmp_path, tiny, helpers):
    """A folder whose processor says shortest side 80, crop 64, other mean/std (and a 64-px vision tower)."""
    from alignprop_reward_aesthetic import AestheticReward

    processor = dict(size={"shortest_edge": 80}, crop_size={"height": 64, "width": 64},
                     image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    folder, _ = helpers.save_tiny_clip(tmp_path / "clip64", image_size=64, processor_kwargs=processor, seed=3,
                                       projection_dim=PROJ_DIM)
    reward = AestheticReward.from_options(clip_model=folder, predictor=tiny["predictor"])
    img = helpers.uint8_image(200, 130, seed=7)
    expected, ref_pixels = _reference_scores(folder, tiny["state"], [img], helpers)
    pixels = reward.preprocess(helpers.to_tensor(img))
    assert pixels.shape == ref_pixels.shape == (1, 3, 64, 64)
    assert (pixels - ref_pixels).abs().max() < 0.025
    with torch.no_grad():
        assert abs(reward(helpers.to_tensor(img), ["p"], [{}]).item() - expected.item()) < 0.01


def test_gradient_reaches_images_and_reward_stays_frozen(reward, helpers):
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    helpers.assert_gradient_reaches_images_never_weights(reward, images, ["a", "b"], [{}, {}])
    assert not reward.mlp.layers[1].training  # the MLP's dropout stays off


def test_dtype_option_runs_the_clip_tower_in_bfloat16(tiny, reward):
    from alignprop_reward_aesthetic import AestheticReward

    half = AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=tiny["predictor"], dtype="bf16")
    assert {p.dtype for p in half.vision_model.parameters()} == {torch.bfloat16}
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    scores = half(images, ["a", "b"], [{}, {}])
    assert scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():  # measured difference to float32: about 0.03
        torch.testing.assert_close(scores.detach(), reward(images.detach(), ["a", "b"], [{}, {}]), atol=0.2, rtol=0)


def test_safetensors_predictor_gives_the_same_scores(tiny, reward):
    from alignprop_reward_aesthetic import AestheticReward
    from safetensors.torch import save_file

    path = tiny["root"] / "predictor.safetensors"
    save_file({k: v.contiguous() for k, v in tiny["state"].items()}, str(path))
    other = AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(path))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(images, ["a", "b"], [{}, {}]), reward(images, ["a", "b"], [{}, {}]))


def test_missing_predictor_file_is_a_clear_error(tiny, tmp_path):
    from alignprop_reward_aesthetic import AestheticReward

    from alignprop_core.plugin_api import AlignPropError

    missing = tmp_path / "nope" / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(AlignPropError, match=r"predictor file .*nope.* does not exist.*'predictor' option") as info:
        AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(missing))
    assert "\n" not in str(info.value)


def test_missing_clip_folder_is_a_clear_error(tiny, tmp_path):
    from alignprop_reward_aesthetic import AestheticReward

    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match=r"clip_model folder .*missing_clip.* does not exist.*'clip_model' option"):
        AestheticReward.from_options(clip_model=str(tmp_path / "missing_clip"), predictor=tiny["predictor"])


def test_wrong_checkpoints_are_clear_errors(tiny, tmp_path):
    from alignprop_reward_aesthetic import AestheticReward

    from alignprop_core.plugin_api import AlignPropError

    not_mlp = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, not_mlp)
    with pytest.raises(AlignPropError, match="not a LAION aesthetic predictor state dict"):
        AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(not_mlp))
    wide = {k: v for k, v in tiny["state"].items()}
    wide["layers.0.weight"] = torch.zeros(MLP_DIMS[1], 768)  # a real-width input layer vs a 16-d tiny CLIP
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(AlignPropError, match="expects 768-d CLIP embeddings .* produces 16-d"):
        AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(tmp_path / "wide.pth"))
    pickled_code = tmp_path / "code.pth"
    torch.save({"layers": argparse.Namespace(x=1)}, pickled_code)  # arbitrary object: weights_only must refuse it
    with pytest.raises(AlignPropError, match="could not read predictor"):
        AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(pickled_code))


def test_bad_images_are_a_clear_error(reward):
    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(3, 64, 64), ["a"], [{}])


def test_two_step_training_with_the_aesthetic_reward(tiny, train_two_steps):
    out = train_two_steps("aesthetic", {"clip_model": tiny["clip_model"], "predictor": tiny["predictor"]})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture
def no_loading(monkeypatch):
    """Loading anything is a test failure: bad options must be reported before any weights are read."""
    import alignprop_reward_aesthetic as module

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(module, "_load_clip_image_tower", fail)
    monkeypatch.setattr(module, "_load_predictor_state", fail)


@pytest.mark.parametrize("options, parts", [
    ({"clip_model": 123}, ["option 'clip_model' must be a hub id or a local folder", "got 123"]),
    ({"clip_model": ""}, ["option 'clip_model' must be", "got ''"]),
    ({"clip_model": "not a hub id"}, ["got 'not a hub id' (neither an existing folder nor a valid hub id)"]),
    ({"clip_model": "{file}"}, ["clip_model folder '{file}' is a file, not a folder; set the 'clip_model' option"]),
    ({"predictor": 123}, ["option 'predictor' must be a local copy of", "got 123"]),
    ({"predictor": ""}, ["option 'predictor' must be", "got ''"]),
    ({"predictor": ["a.pth"]}, ["got ['a.pth'] (a list)"]),
    ({"predictor": "{folder}"}, ["predictor file '{folder}' is a folder, not a file; set the 'predictor' option"]),
    ({"predictor": "{missing}"}, ["predictor file '{missing}' does not exist"]),
    ({"dtype": 16}, ["option 'dtype' must be one of float32, float16, bfloat16 (or null), got 16"]),
    ({"dtype": "fp8"}, ["option 'dtype' must be one of float32, float16, bfloat16 (or null), got 'fp8'"]),
])
def test_bad_options_are_one_line_errors_before_loading(tiny, tmp_path, no_loading, options, parts):
    from alignprop_core import plugins
    from alignprop_core.plugin_api import PluginError

    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"\x00\x01")
    paths = {"{file}": str(tmp_path / "file"), "{folder}": str(tmp_path / "folder"),
             "{missing}": str(tmp_path / "missing.pth")}
    options = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(PluginError) as info:
        plugins.build("reward", "aesthetic", {"clip_model": tiny["clip_model"], "predictor": tiny["predictor"],
                                              **options})
    message = str(info.value)
    assert message.startswith("reward 'aesthetic': ") and "\n" not in message
    for part in parts:
        for key, value in paths.items():
            part = part.replace(key, value)
        assert part in message, (part, message)


def test_binary_predictor_is_a_short_one_line_error(tiny, tmp_path):
    from alignprop_reward_aesthetic import AestheticReward

    from alignprop_core.plugin_api import AlignPropError

    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(AlignPropError, match=r"could not read predictor .* \(not a torch.save file of tensors only\)"
                       ) as info:
        AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(junk))
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_embed_images_gives_the_embedding_the_score_uses(reward):
    """``embed_images`` (the diversity features of eval_diversity_features: aesthetic) is what the MLP scores."""
    from alignprop_core.image_stats import diversity

    images = torch.rand(3, 3, 40, 56)
    embeds = reward.embed_images(images)
    assert embeds.shape[0] == 3 and torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(reward.mlp(embeds).squeeze(-1), reward(images, ["a"] * 3, [{}] * 3), atol=1e-6)
    measured = diversity(images, ["a", "a", "b"], reward.embed_images)
    assert measured["diversity_within_prompt"] > 0
