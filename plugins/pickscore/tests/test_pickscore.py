"""Tests of the ``pickscore`` reward on a tiny random-init transformers CLIPModel, loaded from disk.

Run: cd /work/main && PYTHONPATH=/work/main .venv/bin/python -m pytest plugins/pickscore -q --import-mode=importlib
"""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night",
           "a very long prompt " + "with many many words " * 12]  # > 77 tokens: must be truncated
LOGIT_SCALE = 4.6052  # exp = 100, as in trained CLIP / PickScore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, helpers):
    root = tmp_path_factory.mktemp("pickscore")
    model, processor = helpers.save_tiny_clip(root / "model", root / "processor", logit_scale_init_value=LOGIT_SCALE)
    return {"model": model, "processor": processor, "root": root}


@pytest.fixture(scope="module")
def reward(tiny):
    from alignprop_core import plugins

    return plugins.build("reward", "pickscore", {"model": tiny["model"], "processor": tiny["processor"]})


def _reference(tiny_model, tiny_processor, images, prompts, helpers, pil=True):
    """Independent computation as in PickScore's README: CLIPModel forward on the processor's tokens and pixels,
    logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T (full matrix), pixels."""
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_model).eval()
    processor = AutoProcessor.from_pretrained(tiny_processor)  # transformers' default backend
    image_processor = helpers.pil_clip_processor(tiny_processor) if pil else processor.image_processor
    pixels = image_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return out.logits_per_image, pixels


def test_entry_point_registers_pickscore():
    from alignprop_reward_pickscore import PickScoreReward

    from alignprop_core import plugins

    registration = plugins.registrations("reward")["pickscore"]
    assert registration.package == "alignprop-reward-pickscore"
    assert registration.factory == PickScoreReward.from_options
    assert registration.plugin == "pickscore"


def test_score_is_the_diagonal_of_clipmodel_logits(tiny, reward, helpers):
    """224x224 images need no resize/crop: we must equal diag(logits_per_image) of CLIPModel's own forward."""
    images = [helpers.uint8_image(224, 224, seed) for seed in range(3)]
    logits, _ = _reference(tiny["model"], tiny["processor"], images, PROMPTS, helpers)
    with torch.no_grad():
        got = reward(helpers.to_tensor(images), PROMPTS, [{}] * 3)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, logits.diagonal(), atol=1e-4, rtol=1e-5)
    # the pairing matters: row 0 (every image against prompt 0) or column 0 would give other numbers
    assert (logits.diagonal() - logits[:, 0]).abs().max() > 1e-2
    assert (logits.diagonal() - logits[0, :]).abs().max() > 1e-2
    # and scoring each pair alone gives the same as the batch
    with torch.no_grad():
        alone = torch.cat([reward(helpers.to_tensor(i), [p], [{}]) for i, p in zip(images, PROMPTS)])
    torch.testing.assert_close(alone, got, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("pil", [True, False], ids=["pil", "torchvision"])
@pytest.mark.parametrize("shape", [(256, 256), (299, 224), (224, 301), (512, 512), (640, 1024), (1024, 1024)])
def test_preprocessing_parity_with_clip_image_processor(tiny, reward, shape, pil, helpers):
    """Tensor path vs transformers' CLIPImageProcessor (PIL backend = the reference PickScore was trained with;
    torchvision backend = transformers 5's default) on the same uint8 image.

    Measured (these images; transformers 5.24, Pillow 13, torch 2.13 CPU): max |pixel diff| 0.0156 (PIL) /
    0.0160 (torchvision) in normalised units, i.e. about 1/255 (both references round to uint8 after each resize
    pass), mean <= 0.0045; exactly 0 for the crop-only shapes (299x224, 224x301). Score diff <= 0.019 on the tiny
    model with PickScore's logit scale (100), scores 3-13 for these images. With torchvision's round-half-even crop
    offset instead, the 299x224 image is off by 0.81 per pixel and 1.67 in score: caught here.
    """
    h, w = shape
    img = helpers.uint8_image(h, w, seed=h + w)
    logits, ref_pixels = _reference(tiny["model"], tiny["processor"], [img], PROMPTS[:1], helpers, pil=pil)
    pixels = reward.preprocess(helpers.to_tensor(img))
    assert pixels.shape == ref_pixels.shape == (1, 3, 224, 224)
    diff = (pixels - ref_pixels).abs()
    assert diff.max() < 0.025 and diff.mean() < 0.006, (diff.max().item(), diff.mean().item())
    with torch.no_grad():
        got = reward(helpers.to_tensor(img), PROMPTS[:1], [{}])
    assert abs(got.item() - logits.item()) < 0.05, (got.item(), logits.item())


def test_preprocessing_is_read_from_the_processor_folder(tmp_path, helpers):
    """A processor that says shortest side 80, crop 64, other mean/std (with a 64-px vision tower)."""
    from alignprop_reward_pickscore import PickScoreReward

    processor = dict(size={"shortest_edge": 80}, crop_size={"height": 64, "width": 64},
                     image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    model_dir, processor_dir = helpers.save_tiny_clip(tmp_path / "m", tmp_path / "p", image_size=64,
                                                      processor_kwargs=processor, seed=3,
                                                      logit_scale_init_value=LOGIT_SCALE)
    reward = PickScoreReward.from_options(model=model_dir, processor=processor_dir)
    img = helpers.uint8_image(130, 200, seed=7)
    logits, ref_pixels = _reference(model_dir, processor_dir, [img], PROMPTS[:1], helpers)
    pixels = reward.preprocess(helpers.to_tensor(img))
    assert pixels.shape == ref_pixels.shape == (1, 3, 64, 64)
    assert (pixels - ref_pixels).abs().max() < 0.025
    with torch.no_grad():
        assert abs(reward(helpers.to_tensor(img), PROMPTS[:1], [{}]).item() - logits.item()) < 0.05


def test_gradient_reaches_images_and_reward_stays_frozen(reward, helpers):
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    helpers.assert_gradient_reaches_images_never_weights(reward, images, PROMPTS[:2], [{}, {}])


def test_dtype_option_runs_the_model_in_bfloat16(tiny, reward):
    from alignprop_reward_pickscore import PickScoreReward

    half = PickScoreReward.from_options(model=tiny["model"], processor=tiny["processor"], dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    scores = half(images, PROMPTS[:2], [{}, {}])
    assert scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():  # measured difference to float32: about 0.2 on a scale of 100
        torch.testing.assert_close(scores.detach(), reward(images.detach(), PROMPTS[:2], [{}, {}]), atol=1.0, rtol=0)


def test_text_embeddings_are_cached_per_prompt(tiny):
    from alignprop_reward_pickscore import PickScoreReward

    reward = PickScoreReward.from_options(model=tiny["model"], processor=tiny["processor"])
    encoded: list[int] = []
    original = reward.model.get_text_features

    def counting(*args, **kwargs):
        encoded.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    reward.model.get_text_features = counting
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        first = reward(images, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [{}] * 3)
        assert encoded == [2]  # one batch with the two distinct prompts
        second = reward(images, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [{}] * 3)
        assert encoded == [2]  # cache hit: nothing re-encoded
        reward(images, [PROMPTS[2], PROMPTS[1], PROMPTS[0]], [{}] * 3)
        assert encoded == [2, 1]  # only the new prompt
    torch.testing.assert_close(first, second)
    fresh = PickScoreReward.from_options(model=tiny["model"], processor=tiny["processor"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.text_embeds([PROMPTS[1]]), reward.text_embeds([PROMPTS[1]]))


def test_missing_local_folders_are_clear_errors(tiny, tmp_path):
    from alignprop_reward_pickscore import PickScoreReward

    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match=r"model folder .*no_model.* does not exist.*'model' option") as info:
        PickScoreReward.from_options(model=str(tmp_path / "no_model"), processor=tiny["processor"])
    assert "\n" not in str(info.value)
    with pytest.raises(AlignPropError, match=r"processor folder .*no_proc.* does not exist.*'processor' option"):
        PickScoreReward.from_options(model=tiny["model"], processor=str(tmp_path / "no_proc"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlignPropError, match=r"could not load CLIPModel local folder .*empty.*options\.model"):
        PickScoreReward.from_options(model=str(empty), processor=tiny["processor"])


def test_bad_inputs_are_clear_errors(reward):
    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 64, 64), ["one"], [{}])
    with pytest.raises(AlignPropError, match="a single string"):
        reward(torch.rand(1, 3, 64, 64), "one", [{}])
    with pytest.raises(AlignPropError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(1, 64, 64), ["one"], [{}])


def test_two_step_training_with_the_pickscore_reward(tiny, train_two_steps):
    out = train_two_steps("pickscore", {"model": tiny["model"], "processor": tiny["processor"]})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("options, parts", [
    ({"model": 1.5}, ["option 'model' must be a hub id or a local copy of yuvalkirstain/PickScore_v1", "got 1.5"]),
    ({"model": ""}, ["option 'model' must be", "got ''"]),
    ({"model": "{file}"}, ["model folder '{file}' is a file, not a folder; set the 'model' option"]),
    ({"model": "a b"}, ["got 'a b' (neither an existing folder nor a valid hub id)"]),
    ({"processor": None}, ["option 'processor' must be a hub id or a local copy of", "got None"]),
    ({"processor": "{file}"}, ["processor folder '{file}' is a file, not a folder; set the 'processor' option"]),
    ({"processor": "./{missing}"}, ["processor folder './{missing}' does not exist"]),
    ({"dtype": True}, ["option 'dtype' must be one of float32, float16, bfloat16 (or null), got True (a bool)"]),
])
def test_bad_options_are_one_line_errors_before_loading(tiny, tmp_path, monkeypatch, options, parts):
    import alignprop_reward_pickscore as module

    from alignprop_core import plugins
    from alignprop_core.plugin_api import PluginError

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(module, "_load", fail)
    (tmp_path / "file").write_bytes(b"\x00")
    names = {"{file}": str(tmp_path / "file"), "{missing}": "no-such-folder-here/x/y"}

    def fill(value):
        if isinstance(value, str):
            for key, path in names.items():
                value = value.replace(key, path)
        return value

    with pytest.raises(PluginError) as info:
        plugins.build("reward", "pickscore", {"model": tiny["model"], "processor": tiny["processor"],
                                              **{k: fill(v) for k, v in options.items()}})
    message = str(info.value)
    assert message.startswith("reward 'pickscore': ") and "\n" not in message
    for part in parts:
        assert fill(part) in message, (fill(part), message)
