"""Tests of the ``imagereward`` reward on a tiny random ImageReward checkpoint in the published layout (BLIP ViT +
"med" BERT names, ``ImageReward.pt`` + ``med_config.json`` + a BERT tokenizer folder), loaded through the plugin's
loader, against ImageReward's scoring path.

The ``image-reward`` package pins timm 0.6.13 and fairscale and cannot be installed beside our pins; its path
(``ImageReward.score``: torchvision transform on a PIL image, BLIP's ViT, BERT with cross-attention, MLP, mean/std) is
reproduced below from its published source as plain torch on the state dict, written independently of the plugin.

Run: cd /work/main && .venv/bin/python -m pytest plugins/imagereward -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

VISION_WIDTH, VISION_DEPTH, PATCH = 128, 2, 16  # 2 heads of 64, as BLIP; 224 px = 14 x 14 patches
TEXT_WIDTH, TEXT_DEPTH, TEXT_HEADS, TEXT_FF = 32, 2, 2, 64
WORDS = "a photo of the cat dog red blue sky at night painting two in snow".split()
PROMPTS = ["a photo of a cat", "a red dog in the snow at night", "two blue cats " * 20]  # the last is truncated
SHAPES = [(224, 224), (512, 512), (512, 768), (768, 512), (333, 517)]
MEAN, STD = 0.16717362830052426, 1.0333394966054072


def tiny_state(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of ImageReward.pt (BLIP ViT + med BERT + MLP), small but real."""
    g = torch.Generator().manual_seed(seed)
    d, h, f = VISION_WIDTH, TEXT_WIDTH, TEXT_FF

    def w(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + w(width, scale=0.1), f"{prefix}.bias": w(width, scale=0.05)}

    state = {"blip.visual_encoder.cls_token": w(1, 1, d, scale=0.5),
             "blip.visual_encoder.pos_embed": w(1, 197, d, scale=0.2),
             "blip.visual_encoder.patch_embed.proj.weight": w(d, 3, PATCH, PATCH, scale=0.05),
             "blip.visual_encoder.patch_embed.proj.bias": w(d),
             **norm("blip.visual_encoder.norm", d)}
    for i in range(VISION_DEPTH):
        p = f"blip.visual_encoder.blocks.{i}"
        state.update({**norm(f"{p}.norm1", d), **norm(f"{p}.norm2", d),
                      f"{p}.attn.qkv.weight": w(3 * d, d), f"{p}.attn.qkv.bias": w(3 * d),
                      f"{p}.attn.proj.weight": w(d, d), f"{p}.attn.proj.bias": w(d),
                      f"{p}.mlp.fc1.weight": w(4 * d, d), f"{p}.mlp.fc1.bias": w(4 * d),
                      f"{p}.mlp.fc2.weight": w(d, 4 * d), f"{p}.mlp.fc2.bias": w(d)})
    t = "blip.text_encoder"
    state.update({f"{t}.embeddings.word_embeddings.weight": w(vocab_size, h, scale=0.5),
                  f"{t}.embeddings.position_embeddings.weight": w(512, h, scale=0.2),
                  f"{t}.embeddings.position_ids": torch.arange(512)[None],
                  **norm(f"{t}.embeddings.LayerNorm", h)})
    for i in range(TEXT_DEPTH):
        p = f"{t}.encoder.layer.{i}"
        for block, kv_width in (("attention", h), ("crossattention", d)):
            state.update({f"{p}.{block}.self.query.weight": w(h, h), f"{p}.{block}.self.query.bias": w(h),
                          f"{p}.{block}.self.key.weight": w(h, kv_width), f"{p}.{block}.self.key.bias": w(h),
                          f"{p}.{block}.self.value.weight": w(h, kv_width), f"{p}.{block}.self.value.bias": w(h),
                          f"{p}.{block}.output.dense.weight": w(h, h), f"{p}.{block}.output.dense.bias": w(h),
                          **norm(f"{p}.{block}.output.LayerNorm", h)})
        state.update({f"{p}.intermediate.dense.weight": w(f, h), f"{p}.intermediate.dense.bias": w(f),
                      f"{p}.output.dense.weight": w(h, f), f"{p}.output.dense.bias": w(h),
                      **norm(f"{p}.output.LayerNorm", h)})
    state.update({"blip.vision_proj.weight": w(256, d), "blip.vision_proj.bias": w(256),  # unused by the score
                  "blip.text_proj.weight": w(256, h), "blip.text_proj.bias": w(256)})
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), [(h, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]):
        state[f"mlp.layers.{index}.weight"] = w(n_out, n_in, scale=1.5 / math.sqrt(n_in))
        state[f"mlp.layers.{index}.bias"] = w(n_out, scale=0.2)
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("imagereward")
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *(f"##{c}" for c in chars)]
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer.from_pretrained(root / "tokenizer").save_pretrained(root / "tokenizer")
    vocab_size = len(dict.fromkeys(vocab)) + 2  # BLIP adds [DEC] and [ENC]
    med = {"architectures": ["BertModel"], "hidden_size": TEXT_WIDTH, "num_hidden_layers": TEXT_DEPTH,
           "num_attention_heads": TEXT_HEADS, "intermediate_size": TEXT_FF, "vocab_size": vocab_size,
           "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "pad_token_id": 0,
           "add_cross_attention": True, "encoder_width": 768, "type_vocab_size": 2}
    (root / "med_config.json").write_text(json.dumps(med))
    state = tiny_state(vocab_size)
    torch.save(state, root / "ImageReward.pt")
    return {"checkpoint": str(root / "ImageReward.pt"), "med_config": str(root / "med_config.json"),
            "tokenizer": str(root / "tokenizer"), "state": state, "root": root}


@pytest.fixture(scope="module")
def reward(tiny):
    from alignprop_core import plugins

    return plugins.build("reward", "imagereward", {k: tiny[k] for k in ("checkpoint", "med_config", "tokenizer")})


# ---------------------------------------------------------------- ImageReward.score, reproduced from its source
def reference_transform(pil_image):
    """ImageReward's _transform(224): Resize(224, BICUBIC), CenterCrop(224), RGB, ToTensor, Normalize (CLIP)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                    lambda im: im.convert("RGB"), ToTensor(),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])(pil_image)


def _attention(q, k, v, heads, bias=None):
    b, n, width = q.shape
    split = [t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(width // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, n, width)


def reference_vit(s, pixels):
    """BLIP's VisionTransformer.forward (vit.py): patches + cls + pos, pre-norm blocks, final norm (eps 1e-6)."""
    p = "blip.visual_encoder"
    x = F.conv2d(pixels, s[f"{p}.patch_embed.proj.weight"], s[f"{p}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s[f"{p}.cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + s[f"{p}.pos_embed"]
    width = x.shape[-1]
    for i in range(VISION_DEPTH):
        b = f"{p}.blocks.{i}"
        y = F.layer_norm(x, (width,), s[f"{b}.norm1.weight"], s[f"{b}.norm1.bias"], 1e-6)
        q, k, v = F.linear(y, s[f"{b}.attn.qkv.weight"], s[f"{b}.attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(_attention(q, k, v, width // 64), s[f"{b}.attn.proj.weight"], s[f"{b}.attn.proj.bias"])
        y = F.layer_norm(x, (width,), s[f"{b}.norm2.weight"], s[f"{b}.norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(y, s[f"{b}.mlp.fc1.weight"], s[f"{b}.mlp.fc1.bias"])),
                         s[f"{b}.mlp.fc2.weight"], s[f"{b}.mlp.fc2.bias"])
    return F.layer_norm(x, (width,), s[f"{p}.norm.weight"], s[f"{p}.norm.bias"], 1e-6)


def reference_bert(s, ids, mask, image_tokens):
    """med.py's BertModel in multimodal mode: post-norm layers of self-attention (mask bias -10000), cross-attention
    to the image tokens, feed-forward; returns the last hidden state."""
    t = "blip.text_encoder"

    def lin(x, name):
        return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])

    def ln(x, name):
        return F.layer_norm(x, (TEXT_WIDTH,), s[f"{name}.weight"], s[f"{name}.bias"], 1e-12)

    x = s[f"{t}.embeddings.word_embeddings.weight"][ids] + s[f"{t}.embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = ln(x, f"{t}.embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(TEXT_DEPTH):
        p = f"{t}.encoder.layer.{i}"
        for block, source, block_bias in (("attention", None, bias), ("crossattention", image_tokens, None)):
            kv = x if source is None else source
            context = _attention(lin(x, f"{p}.{block}.self.query"), lin(kv, f"{p}.{block}.self.key"),
                                 lin(kv, f"{p}.{block}.self.value"), TEXT_HEADS, block_bias)
            x = ln(lin(context, f"{p}.{block}.output.dense") + x, f"{p}.{block}.output.LayerNorm")
        x = ln(lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


def reference_scores(tiny, images, prompts):
    """ImageReward.score per (PIL image, prompt): tokenizer(max_length 35), transform, ViT, BERT, MLP, (r-mean)/std."""
    from PIL import Image
    from transformers import BertTokenizer

    s = {k: v.double() if v.is_floating_point() else v for k, v in tiny["state"].items()}
    tokenizer = BertTokenizer.from_pretrained(tiny["tokenizer"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    scores, all_pixels = [], []
    for image, prompt in zip(images, prompts):
        text = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = reference_transform(Image.fromarray(image))[None]
        all_pixels.append(pixels)
        hidden = reference_bert(s, text.input_ids, text.attention_mask, reference_vit(s, pixels.double()))
        r = hidden[:, 0]
        for index in (0, 2, 4, 6, 7):
            r = F.linear(r, s[f"mlp.layers.{index}.weight"], s[f"mlp.layers.{index}.bias"])
        scores.append(((r - MEAN) / STD).item())
    return torch.tensor(scores), torch.cat(all_pixels)


def to_tensor(image):
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


# --------------------------------------------------------------------------------------------------- tests
def test_entry_point_registers_imagereward():
    from alignprop_reward_imagereward import ImageRewardReward

    from alignprop_core import plugins

    registration = plugins.registrations("reward")["imagereward"]
    assert registration.package == "alignprop-reward-imagereward"
    assert registration.factory == ImageRewardReward.from_options


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_and_pixels_match_imagereward_score(tiny, reward, helpers, shape):
    """Measured (tiny checkpoint, these images; scores -11.4 to -9.2): pixels max |diff| 0 at 224x224 and
    0.0147-0.0154 on resized shapes (the PIL resize rounds to uint8), scores < 1e-5 / 0.0013-0.0041."""
    h, w = shape
    images = [helpers.uint8_image(h, w, seed=h + 3 * w + i) for i in range(3)]
    expected, ref_pixels = reference_scores(tiny, images, PROMPTS)
    batch = torch.cat([to_tensor(i) for i in images])
    pixels = reward.preprocess(batch)
    diff = (pixels - ref_pixels).abs()
    assert pixels.shape == ref_pixels.shape == (3, 3, 224, 224)
    assert diff.max() < 0.025 and diff.mean() < 0.006, (diff.max().item(), diff.mean().item())
    with torch.no_grad():
        got = reward(batch, PROMPTS, [{}] * 3)
    assert expected.std() > 0.1, "the scores must differ, or the comparison proves little"
    tolerance = 1e-3 if shape == (224, 224) else 0.02
    assert (got - expected).abs().max() < tolerance, (got, expected)


def test_model_path_is_exact_on_the_references_pixels(tiny, reward, helpers):
    """Same pixels in, float64 reference vs our float32 transformers path: the layer mapping is exact."""
    from PIL import Image

    images = [helpers.uint8_image(300, 400, seed=s) for s in range(3)]
    expected, ref_pixels = reference_scores(tiny, images, PROMPTS)
    ids, mask = reward.tokens(PROMPTS, torch.device("cpu"))
    with torch.no_grad():
        tokens = reward.vision(pixel_values=ref_pixels).last_hidden_state
        hidden = reward.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens,
                             encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long)).last_hidden_state
        got = (reward.mlp(hidden[:, 0]).squeeze(-1) - MEAN) / STD
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-4, rtol=1e-5)
    assert Image  # PIL is the reference's input type


def test_prompts_are_padded_to_35_and_truncated(reward):
    ids, mask = reward.tokens(PROMPTS, torch.device("cpu"))
    assert ids.shape == mask.shape == (3, 35)
    assert mask[2].all() and not mask[0].all()  # the long prompt fills all 35, the short one is padded
    assert ids[0, 0] == reward.tokenizer.cls_token_id  # ImageReward.score keeps [CLS] (no [ENC] swap)
    assert "[ENC]" in reward.tokenizer.get_vocab() and "[DEC]" in reward.tokenizer.get_vocab()


def test_gradient_reaches_images_never_weights(reward, helpers):
    images = torch.rand(2, 3, 100, 140, requires_grad=True)
    helpers.assert_gradient_reaches_images_never_weights(reward, images, PROMPTS[:2], [{}, {}])


def test_bfloat16_runs_and_stays_close(tiny, reward):
    from alignprop_reward_imagereward import ImageRewardReward

    half = ImageRewardReward.from_options(**{k: tiny[k] for k in ("checkpoint", "med_config", "tokenizer")},
                                          dtype="bf16")
    images = torch.rand(2, 3, 96, 96, requires_grad=True)
    scores = half(images, PROMPTS[:2], [{}, {}])
    scores.sum().backward()
    assert scores.dtype == torch.float32 and torch.isfinite(images.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(scores.detach(), reward(images.detach(), PROMPTS[:2], [{}, {}]), atol=0.3, rtol=0)


def test_two_step_training_with_imagereward(tiny, train_two_steps):
    out = train_two_steps("imagereward", {k: tiny[k] for k in ("checkpoint", "med_config", "tokenizer")})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_missing_or_wrong_weights_are_one_line_errors(tiny, tmp_path):
    from alignprop_reward_imagereward import ImageRewardReward

    from alignprop_core.plugin_api import AlignPropError

    def error(**options):
        given = {k: tiny[k] for k in ("checkpoint", "med_config", "tokenizer")}
        with pytest.raises(AlignPropError) as info:
            ImageRewardReward.from_options(**{**given, **options})
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "checkpoint file" in error(checkpoint=str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in error(checkpoint=str(junk))
    torch.save({"visual.weight": torch.zeros(2)}, tmp_path / "clip.pt")
    assert "is not an ImageReward state dict" in error(checkpoint=str(tmp_path / "clip.pt"))
    broken = dict(tiny["state"])
    broken.pop("blip.visual_encoder.cls_token")
    torch.save(broken, tmp_path / "broken.pt")
    assert "lacks BLIP ViT weights" in error(checkpoint=str(tmp_path / "broken.pt"))
    bigger = json.loads(open(tiny["med_config"]).read()) | {"hidden_size": 48}
    (tmp_path / "med48.json").write_text(json.dumps(bigger))
    assert "do not fit" in error(med_config=str(tmp_path / "med48.json"))
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not valid JSON" in error(med_config=str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text('{"hidden_size": 32}')
    assert "is not a BERT config" in error(med_config=str(tmp_path / "other.json"))
    (tmp_path / "empty").mkdir()
    assert "has no vocabulary" in error(tokenizer=str(tmp_path / "empty"))
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                          + [f"w{i}" for i in range(200)]) + "\n")
    assert "has 207 tokens (with [DEC], [ENC]) but the text encoder" in error(tokenizer=str(tmp_path / "big"))


@pytest.mark.parametrize("options, part", [
    ({"checkpoint": 3}, "option 'checkpoint' must be a local ImageReward.pt"),
    ({"checkpoint": ""}, "option 'checkpoint'"),
    ({"med_config": ["x"]}, "option 'med_config' must be a local med_config.json"),
    ({"tokenizer": "a b"}, "neither an existing folder nor a valid hub id"),
    ({"dtype": "int4"}, "option 'dtype' must be one of float32, float16, bfloat16"),
    ({"version": "v1"}, "does not accept options"),
])
def test_bad_options_are_one_line_errors(tiny, options, part):
    from alignprop_core import plugins
    from alignprop_core.plugin_api import PluginError

    given = {k: tiny[k] for k in ("checkpoint", "med_config", "tokenizer")}
    with pytest.raises(PluginError) as info:
        plugins.build("reward", "imagereward", {**given, **options})
    assert part in str(info.value) and "\n" not in str(info.value), str(info.value)
