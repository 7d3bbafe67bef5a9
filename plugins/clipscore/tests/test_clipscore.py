"""Tests of the ``clip_score`` reward on a tiny random-init transformers CLIPModel, loaded from disk, against
torchmetrics' CLIPScore on the same model folder.

Run: cd /work/main && .venv/bin/python -m pytest plugins/clipscore -q
"""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night", "two dogs playing in the snow"]
SHAPES = [(224, 224), (512, 512), (512, 768), (768, 512), (333, 517)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, helpers):
    root = tmp_path_factory.mktemp("clipscore")
    model, _ = helpers.save_tiny_clip(root / "model", seed=1)
    return model


@pytest.fixture(scope="module")
def reward(tiny):
    from alignprop_core import plugins

    return plugins.build("reward", "clip_score", {"model": tiny})


class Transformers4Features(torch.nn.Module):
    """torchmetrics 1.9 expects ``get_image_features``/``get_text_features`` to return tensors (transformers 4);
    transformers 5 returns output objects with the projection in ``pooler_output``, and torchmetrics then fails with
    "'BaseModelOutputWithPooling' object has no attribute 'norm'". This adapter hands it the same tensors; everything
    else (the processor call, normalisation, 100 x, clamp) is torchmetrics' own code."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def torchmetrics_scores(folder, images, prompts, helpers, pil=True):
    """torchmetrics' CLIPScore, one (image, prompt) pair per call (it clamps the batch mean), on ``folder`` loaded
    as torchmetrics loads an openai model: ``CLIPModel`` + ``CLIPProcessor`` from the folder. ``pil``: the processor
    with transformers' PIL image backend (the reference CLIP preprocessing); else transformers 5's default."""
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    model = Transformers4Features(CLIPModel.from_pretrained(folder).eval())
    processor = CLIPProcessor.from_pretrained(folder)
    if pil:
        processor.image_processor = helpers.pil_clip_processor(folder)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            chw = torch.from_numpy(image).permute(2, 0, 1)  # uint8 [3, H, W], torchmetrics' documented input
            scores.append(clip_score(chw, prompt, model_name_or_path=lambda: (model, processor)).item())
    return torch.tensor(scores)


def test_entry_point_registers_clip_score():
    from alignprop_reward_clipscore import CLIPScoreReward

    from alignprop_core import plugins

    registration = plugins.registrations("reward")["clip_score"]
    assert registration.package == "alignprop-reward-clipscore"
    assert registration.factory == CLIPScoreReward.from_options
    assert dict(registration.details)["source"] == "openai/clip-vit-large-patch14"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_match_torchmetrics_clipscore(tiny, reward, helpers, shape):
    """Measured (tiny model, these images, scores 0-10.6 of 100, one pair clamped to 0 per shape): max |diff| 1e-5 at
    224x224 (no resize), 0.011-0.022 on the resized shapes (the PIL resize rounds to uint8); tolerance 0.06."""
    h, w = shape
    images = [helpers.uint8_image(h, w, seed=h + w + i) for i in range(3)]
    expected = torchmetrics_scores(tiny, images, PROMPTS, helpers)
    with torch.no_grad():
        got = reward(torch.cat([helpers.to_tensor(i) for i in images]), PROMPTS, [{}] * 3)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert (expected > 0).any(), "the tiny model must give some positive cosines, or the test compares zeros"
    tolerance = 1e-3 if shape == (224, 224) else 0.06
    assert (got - expected).abs().max() < tolerance, (got, expected)


def test_preprocessing_matches_the_pil_processor_pixels(tiny, reward, helpers):
    pil = helpers.pil_clip_processor(tiny)
    from PIL import Image

    for h, w in SHAPES:
        image = helpers.uint8_image(h, w, seed=3 * h + w)
        expected = pil(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        got = reward.preprocess(helpers.to_tensor(image))
        diff = (got - expected).abs()
        assert got.shape == expected.shape == (1, 3, 224, 224)
        assert diff.max() < 0.025 and diff.mean() < 0.006, ((h, w), diff.max().item(), diff.mean().item())


def test_score_is_100_times_the_clamped_cosine_per_pair(tiny, reward, helpers):
    """Against CLIPModel's own forward: logits_per_image = exp(logit_scale) * cos; CLIPScore = 100 * max(cos, 0)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny).eval()
    images = torch.rand(3, 3, 224, 224)
    tokens = reward.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, pixel_values=reward.preprocess(images))
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
        got = reward(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(got, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5)


def test_gradient_reaches_images_never_weights_and_the_clamp_stops_it(reward, helpers):
    images = torch.rand(4, 3, 96, 128, requires_grad=True)
    prompts = [PROMPTS[i % 3] for i in range(4)]
    scores, image_grad = helpers.assert_gradient_reaches_images_never_weights(reward, images, prompts, [{}] * 4)
    per_image = image_grad.flatten(1).abs().sum(dim=1)
    for score, grad in zip(scores, per_image):
        assert (grad > 0) == (score > 0), (score, grad)  # a clamped (cos < 0) pair gets no gradient


def test_long_prompts_are_truncated_keeping_the_end_token(reward):
    long = "a very long prompt " + "with many many words " * 20
    tokens = reward.tokenizer([long], padding=True, truncation=True, max_length=77)["input_ids"][0]
    assert len(tokens) == 77 and tokens[-1] == reward.tokenizer.eos_token_id
    with torch.no_grad():
        assert torch.isfinite(reward(torch.rand(1, 3, 64, 64), [long], [{}])).all()


def test_text_embeddings_are_cached(tiny):
    from alignprop_reward_clipscore import CLIPScoreReward

    reward = CLIPScoreReward.from_options(model=tiny)
    calls = []
    original = reward.model.get_text_features
    reward.model.get_text_features = lambda *a, **k: (calls.append(k["input_ids"].shape[0]), original(*a, **k))[1]
    with torch.no_grad():
        reward(torch.rand(3, 3, 64, 64), [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [{}] * 3)
        reward(torch.rand(2, 3, 64, 64), [PROMPTS[1], PROMPTS[2]], [{}] * 2)
    assert calls == [2, 1]


def test_embed_images_is_the_normalised_image_embedding(reward):
    with torch.no_grad():
        embeds = reward.embed_images(torch.rand(2, 3, 80, 100))
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))


def test_bfloat16_is_close_to_float32(tiny, reward):
    from alignprop_reward_clipscore import CLIPScoreReward

    half = CLIPScoreReward.from_options(model=tiny, dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    images = torch.rand(2, 3, 96, 96, requires_grad=True)
    scores = half(images, PROMPTS[:2], [{}] * 2)
    scores.sum().backward()
    assert scores.dtype == torch.float32 and torch.isfinite(images.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(scores.detach(), reward(images.detach(), PROMPTS[:2], [{}] * 2), atol=1.5, rtol=0)


def test_two_step_training_with_clip_score(tiny, train_two_steps):
    out = train_two_steps("clip_score", {"model": tiny})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_missing_or_wrong_weights_are_one_line_errors(tiny, tmp_path):
    from alignprop_reward_clipscore import CLIPScoreReward

    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match=r"model folder .*nothing.* does not exist") as info:
        CLIPScoreReward.from_options(model=str(tmp_path / "nothing"))
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlignPropError, match=r"could not load CLIPModel local folder .*empty.*options\.model") as info:
        CLIPScoreReward.from_options(model=str(empty))
    assert "\n" not in str(info.value)
    with pytest.raises(AlignPropError, match=r"could not load the tokenizer from local folder .*options\.processor"):
        CLIPScoreReward.from_options(model=tiny, processor=str(empty))


@pytest.mark.parametrize("options, part", [
    ({"model": 3}, "option 'model' must be a hub id or a local copy of openai/clip-vit-large-patch14"),
    ({"model": ""}, "option 'model' must be"),
    ({"model": "a b"}, "neither an existing folder nor a valid hub id"),
    ({"processor": 7}, "option 'processor' must be a hub id or a local folder"),
    ({"dtype": "int8"}, "option 'dtype' must be one of float32, float16, bfloat16"),
    ({"scale": 2}, "does not accept options"),
])
def test_bad_options_are_one_line_errors(tiny, options, part):
    from alignprop_core import plugins
    from alignprop_core.plugin_api import PluginError

    with pytest.raises(PluginError) as info:
        plugins.build("reward", "clip_score", {"model": tiny, **options})
    assert part in str(info.value) and "\n" not in str(info.value)


def test_bad_inputs_are_clear_errors(reward):
    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 64, 64), ["one"], [{}])
    with pytest.raises(AlignPropError, match="a single string"):
        reward(torch.rand(1, 3, 64, 64), "one", [{}])
