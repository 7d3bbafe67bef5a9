"""Tests of the ``aesthetic`` reward on tiny random-init models of the real architectures, loaded from disk.

Run: cd /work/main && PYTHONPATH=/work/main .venv/bin/python -m pytest plugins/aesthetic -q --import-mode=importlib
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest
import torch

PROJ_DIM = 16
MLP_DIMS = (PROJ_DIM, 24, 12, 8, 4)  # the real predictor is 768-1024-128-64-16(-1)


def _bytes_to_unicode() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _char_tokenizer():
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _save_tiny_clip(path, image_size=224, processor_kwargs=None, seed=0):
    """A tiny transformers CLIPModel (real architecture) + CLIPProcessor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _char_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=32),
        projection_dim=PROJ_DIM,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(**(processor_kwargs or {}))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _tiny_mlp_state(seed=1):
    """A random LAION-predictor state dict with the real key layout and structure, tiny widths."""
    from alignprop_reward_aesthetic import AestheticMLP

    torch.manual_seed(seed)
    mlp = AestheticMLP(MLP_DIMS)
    for p in mlp.parameters():  # spread the scores out so that differences are visible
        torch.nn.init.normal_(p, std=0.5)
    return {k: v.detach().clone() for k, v in mlp.state_dict().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    clip_dir = _save_tiny_clip(root / "clip")
    state = _tiny_mlp_state()
    torch.save(state, root / "predictor.pth")
    return {"clip_model": str(clip_dir), "predictor": str(root / "predictor.pth"), "state": state, "root": root}


@pytest.fixture(scope="module")
def reward(tiny):
    from alignprop_core import plugins

    return plugins.build("reward", "aesthetic", {"clip_model": tiny["clip_model"], "predictor": tiny["predictor"]})


def _uint8_image(h, w, seed):
    """Smooth random colour field plus fine noise (uint8 HWC), like a photo with texture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255


def _pil_processor(folder):
    """The reference PIL pipeline: transformers' CLIPImageProcessor (PIL backend) read from the saved folder."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(folder)


def _reference_scores(folder, state, images):
    """Independent computation: transformers CLIPModel.get_image_features on the image processor's pixels,
    L2-normalised, then the predictor's five affine layers applied by hand from the state dict."""
    from PIL import Image
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = _pil_processor(folder)(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1), pixels


def test_entry_point_registers_aesthetic():
    from alignprop_core import plugins
    from alignprop_reward_aesthetic import AestheticReward

    registration = plugins.registrations("reward")["aesthetic"]
    assert registration.package == "alignprop-reward-aesthetic"
    assert registration.factory == AestheticReward.from_options
    assert registration.plugin == "aesthetic"


def test_score_matches_transformers_clip_and_laion_mlp(tiny, reward):
    """224x224 images need no resize or crop: only float rounding separates us from the reference."""
    images = [_uint8_image(224, 224, seed) for seed in range(3)]
    expected, _ = _reference_scores(tiny["clip_model"], tiny["state"], images)
    with torch.no_grad():
        got = reward(torch.cat([_to_tensor(i) for i in images]), ["p"] * 3, [{}] * 3)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert expected.std() > 0.05  # the images score differently, so the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(256, 256), (299, 224), (224, 301), (512, 512), (640, 1024), (1024, 1024)])
def test_preprocessing_parity_with_pil_image_processor(tiny, reward, shape):
    """Tensor path vs transformers' CLIPImageProcessor (PIL) on the same uint8 image.

    Measured (these images; transformers 5.24, Pillow 13, torch 2.13 CPU): max |pixel diff| 0.0156 in normalised
    units (about 1.1/255: PIL rounds to uint8 after each of its two resize passes), mean <= 0.0045; exactly 0 for
    the crop-only shapes (299x224, 224x301). Score diff <= 3.4e-3 here (<= 5.6e-3 over more shapes) on the tiny
    model whose scores span 7.4-8.2 across images. With alignprop_core.preprocess.clip_preprocess (round-half-even
    crop offset, one-pass resize) the 299x224 image is off by 0.81 per pixel and 0.078 in score: caught here.
    """
    h, w = shape
    img = _uint8_image(h, w, seed=h + w)
    expected, ref_pixels = _reference_scores(tiny["clip_model"], tiny["state"], [img])
    pixels = reward.preprocess(_to_tensor(img))
    assert pixels.shape == ref_pixels.shape == (1, 3, 224, 224)
    diff = (pixels - ref_pixels).abs()
    assert diff.max() < 0.025 and diff.mean() < 0.006, (diff.max().item(), diff.mean().item())
    with torch.no_grad():
        got = reward(_to_tensor(img), ["p"], [{}])
    assert abs(got.item() - expected.item()) < 0.01, (got.item(), expected.item())


def test_preprocessing_is_read_from_the_clip_folder(tmp_path, tiny):
    """A folder whose processor says shortest side 80, crop 64, other mean/std (and a 64-px vision tower)."""
    from alignprop_reward_aesthetic import AestheticReward

    processor = dict(size={"shortest_edge": 80}, crop_size={"height": 64, "width": 64},
                     image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    folder = _save_tiny_clip(tmp_path / "clip64", image_size=64, processor_kwargs=processor, seed=3)
    reward = AestheticReward.from_options(clip_model=str(folder), predictor=tiny["predictor"])
    img = _uint8_image(200, 130, seed=7)
    expected, ref_pixels = _reference_scores(str(folder), tiny["state"], [img])
    pixels = reward.preprocess(_to_tensor(img))
    assert pixels.shape == ref_pixels.shape == (1, 3, 64, 64)
    assert (pixels - ref_pixels).abs().max() < 0.025
    with torch.no_grad():
        assert abs(reward(_to_tensor(img), ["p"], [{}]).item() - expected.item()) < 0.01


def test_gradient_reaches_images_and_reward_stays_frozen(reward):
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    reward.train()  # must not unfreeze (dropout on would make the score random)
    assert not reward.training and not reward.mlp.layers[1].training
    assert all(not p.requires_grad for p in reward.parameters())
    scores = reward(images, ["a", "b"], [{}, {}])
    assert scores.grad_fn is not None
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    again = reward(images.detach(), ["a", "b"], [{}, {}])
    torch.testing.assert_close(again, scores.detach())  # deterministic: dropout is off


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
    from safetensors.torch import save_file

    from alignprop_reward_aesthetic import AestheticReward

    path = tiny["root"] / "predictor.safetensors"
    save_file({k: v.contiguous() for k, v in tiny["state"].items()}, str(path))
    other = AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(path))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(images, ["a", "b"], [{}, {}]), reward(images, ["a", "b"], [{}, {}]))


def test_missing_predictor_file_is_a_clear_error(tiny, tmp_path):
    from alignprop_core.errors import AlignPropError
    from alignprop_reward_aesthetic import AestheticReward

    missing = tmp_path / "nope" / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(AlignPropError, match=r"predictor file .*nope.* does not exist.*options\.predictor") as info:
        AestheticReward.from_options(clip_model=tiny["clip_model"], predictor=str(missing))
    assert "\n" not in str(info.value)


def test_missing_clip_folder_is_a_clear_error(tiny, tmp_path):
    from alignprop_core.errors import AlignPropError
    from alignprop_reward_aesthetic import AestheticReward

    with pytest.raises(AlignPropError, match=r"clip_model folder .*missing_clip.* does not exist.*options\.clip_model"):
        AestheticReward.from_options(clip_model=str(tmp_path / "missing_clip"), predictor=tiny["predictor"])


def test_wrong_checkpoints_are_clear_errors(tiny, tmp_path):
    from alignprop_core.errors import AlignPropError
    from alignprop_reward_aesthetic import AestheticReward

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
    from alignprop_core.errors import AlignPropError

    with pytest.raises(AlignPropError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(3, 64, 64), ["a"], [{}])


@pytest.mark.skipif(importlib.util.find_spec("alignprop_core.trainer") is None,
                    reason="alignprop_core.trainer does not exist yet")
def test_two_step_training_with_the_aesthetic_reward(tiny, tmp_path):
    from alignprop_core import AlignPropConfig, AlignPropTrainer
    from alignprop_core.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "out"
    options = {"clip_model": tiny["clip_model"], "predictor": tiny["predictor"]}
    AlignPropTrainer(AlignPropConfig(
        pretrained_model=str(path), rewards=[{"name": "aesthetic", "weight": 1.0, "options": options}],
        num_epochs=2, sample_num_steps=2, train_batch_size=1, eval_num_samples=0, mixed_precision="no",
        output_dir=str(out))).train()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
