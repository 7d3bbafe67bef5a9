"""hpsv3 against HPSv3's own scoring path, on a tiny random Qwen2-VL of the real architecture.

The ``hpsv3`` package (1.0.0) pins transformers 4.45.2 and cannot be installed beside our transformers 5, so its path
is reproduced here from its published source (``hpsv3/inference.py``, ``dataset/utils.py``, ``model/
qwen2vl_trainer.py``): PIL images resized by ``fetch_image`` to the 256*28*28 budget, transformers' Qwen2-VL
processor (PIL image processor, tokenizer, chat template) on the chat messages, and ``Qwen2VLRewardModelBT.forward``
(embed, scatter the image features into the pad tokens, the decoder without position ids, the head on every token,
the ``<|Reward|>`` row) on transformers' Qwen2-VL modules. The checkpoint is written in transformers 4.45's names, as
the published ``HPSv3.safetensors``, and read back through the plugin's loader.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn

PROMPTS = ["a red fox in the snow", "an astronaut riding a horse, oil painting", "a bowl of ramen"]
#: Qwen/Qwen2-VL-7B-Instruct's chat_template (the model repo's chat_template.json)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
#: sha256 of INSTRUCTION + prompt_with_special_token in hpsv3 1.0.0's hpsv3/dataset/data_collator_qwen.py
INSTRUCTION_SHA256 = "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"
PIXELS = 256 * 28 * 28


def tiny_qwen_tokenizer():
    """A byte-level BPE tokenizer (no merges) with Qwen2-VL's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end")}
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, initializer_range=0.2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1e6),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, initializer_range=0.2),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"])


def reference_head(width):
    """``Qwen2VLRewardModelBT.rm_head`` for ``rm_head_type: ranknet`` without ``rm_head_kwargs``."""
    return nn.Sequential(nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("hpsv3")
    base = root / "Qwen2-VL-7B-Instruct"
    tokenizer = tiny_qwen_tokenizer()
    config = tiny_config(tokenizer)
    tokenizer.save_pretrained(base)
    config.save_pretrained(base)
    # HPSv3's create_model_and_processor: <|Reward|> added, embeddings resized to the tokenizer, head in float32
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.resize_token_embeddings(len(tokenizer))
    head = reference_head(32)
    for layer in head[::3]:
        nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
    head[5].weight.data *= 20  # spread the scores (random init gives nearly equal ones)
    model.eval(), head.eval()
    state = {}  # transformers 4.45 names: visual.*, model.* (the decoder), lm_head.*, rm_head.*
    for key, value in model.state_dict().items():
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        state[key] = value.contiguous()
    state |= {f"rm_head.{k}": v for k, v in head.state_dict().items()}
    save_file(state, root / "HPSv3.safetensors")
    return {"checkpoint": str(root / "HPSv3.safetensors"), "base_model": str(base), "model": model, "head": head,
            "tokenizer": tokenizer, "state": state, "root": root}


@pytest.fixture(scope="module")
def reward(tiny):
    from alignprop_reward_hpsv3 import HPSv3Reward

    return HPSv3Reward.from_options(checkpoint=tiny["checkpoint"], base_model=tiny["base_model"], dtype="float32")


def reference_smart_resize(height, width, factor=28, min_pixels=PIXELS, max_pixels=PIXELS):
    """hpsv3/dataset/utils.py ``smart_resize``."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def reference_batch(tiny, arrays, prompts):
    """``HPSv3RewardInferencer.prepare_batch`` on PIL images: fetch_image's resize, then the Qwen2-VL processor."""
    from alignprop_reward_hpsv3 import ANSWER, INSTRUCTION
    from PIL import Image
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # (unused; needed)

    images = []
    for array in arrays:
        image = Image.fromarray(array).convert("RGB")
        height, width = reference_smart_resize(image.height, image.width)
        images.append(image.resize((width, height), Image.BICUBIC))
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": image, "min_pixels": PIXELS, "max_pixels": PIXELS},
        {"type": "text", "text": INSTRUCTION.format(text_prompt=text) + ANSWER}]}] for text, image in
        zip(prompts, images)]
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tiny["tokenizer"],
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tiny["tokenizer"].padding_side = "right"
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def reference_forward(tiny, batch):
    """``Qwen2VLRewardModelBT.forward`` (reward_token "special") on transformers' modules; returns mu."""
    model, head = tiny["model"], tiny["head"]
    reward_id = tiny["tokenizer"].convert_tokens_to_ids("<|Reward|>")
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids)
        image = model.model.visual(batch["pixel_values"].type(model.model.visual.get_dtype()),
                                   grid_thw=batch["image_grid_thw"]).pooler_output
        mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            position_ids=None, use_cache=False)[0]
        logits = head(hidden)
        pooled = logits[ids == reward_id].view(ids.shape[0], -1)
    return pooled[:, 0]


def to_tensor(arrays):
    return torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in arrays]).float() / 255


def test_entry_point_registers_hpsv3():
    from alignprop_reward_hpsv3 import HPSv3Reward

    from alignprop_core import plugins

    registration = plugins.registrations("reward")["hpsv3"]
    assert registration.package == "alignprop-reward-hpsv3"
    assert registration.factory == HPSv3Reward.from_options


def test_instruction_is_hpsv3s_text():
    from alignprop_reward_hpsv3 import ANSWER, INSTRUCTION

    assert hashlib.sha256((INSTRUCTION + ANSWER).encode()).hexdigest() == INSTRUCTION_SHA256


@pytest.mark.parametrize("shape", [(512, 512), (300, 400), (1024, 768), (64, 700), (2000, 12)])
def test_smart_resize_is_qwen_vl_utils(shape):
    from alignprop_reward_hpsv3 import smart_resize

    assert smart_resize(*shape) == reference_smart_resize(*shape)
    assert smart_resize(512, 512) == (448, 448)


def test_extreme_aspect_is_a_one_line_error(reward):
    from alignprop_core.plugin_api import AlignPropError

    with pytest.raises(AlignPropError, match="more than 200:1"):
        reward(torch.rand(1, 3, 2, 500), ["x"], [{}])


SHAPES = [(448, 448), (512, 512), (300, 400), (1024, 768)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_tokens_and_patches_match_hpsv3(tiny, reward, helpers, shape):
    """Measured (tiny checkpoint, these images; scores 4.7 to 5.8): at 448x448 (no resize) patches equal and scores
    within 3.4e-6; resized (512x512, 300x400, 1024x768), patches within 0.016 max / 0.0045 mean (the PIL resize
    rounds to uint8) and scores within 0.0034-0.0071. Tokens and attention masks are identical."""
    arrays = [helpers.uint8_image(*shape, seed=shape[0] + 7 * shape[1] + i) for i in range(3)]
    batch = reference_batch(tiny, arrays, PROMPTS)
    expected = reference_forward(tiny, batch)
    images = to_tensor(arrays)
    patches, grids = reward.preprocess(images)
    assert torch.equal(grids, batch["image_grid_thw"])
    diff = (patches - batch["pixel_values"]).abs()
    assert diff.max() < (1e-5 if shape == (448, 448) else 0.025) and diff.mean() < 0.006, (diff.max(), diff.mean())
    tokens = int(grids[0].prod()) // 4
    ids, mask = reward.tokens(PROMPTS, tokens, torch.device("cpu"))
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    with torch.no_grad():
        got = reward(images, PROMPTS, [{}] * 3)
    assert expected.std() > 0.1, "the scores must differ, or the comparison proves little"
    tolerance = 1e-4 if shape == (448, 448) else 0.03
    assert (got - expected).abs().max() < tolerance, (got, expected)


def test_model_path_is_exact_on_the_references_inputs(tiny, reward, helpers):
    arrays = [helpers.uint8_image(300, 400, seed=s) for s in range(3)]
    batch = reference_batch(tiny, arrays, PROMPTS)
    with torch.no_grad():
        got = reward.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                           reward.reward_token_id)[:, 0]
    torch.testing.assert_close(got, reference_forward(tiny, batch), atol=1e-5, rtol=1e-5)
    assert not any(k.startswith("lm_head") for k in reward.state_dict())  # not needed for the score


def test_gradient_reaches_images_never_weights(reward, helpers):
    images = torch.rand(2, 3, 120, 90, requires_grad=True)
    helpers.assert_gradient_reaches_images_never_weights(reward, images, PROMPTS[:2], [{}, {}])


def test_gradient_checkpointing_saves_less_and_changes_nothing(tiny, reward):
    """Measured: the forward keeps 192.6 MB of tensors for the backward without checkpointing, 22.3 MB with it
    (2 images 100x130, the tiny model, whose ~2,600-token sequence dominates); scores and image gradients equal."""
    from alignprop_reward_hpsv3 import HPSv3Reward

    checkpointed = HPSv3Reward.from_options(checkpoint=tiny["checkpoint"], base_model=tiny["base_model"],
                                            dtype="float32", gradient_checkpointing=True)
    grads, scores, saved = [], [], []
    for module in (reward, checkpointed):
        images = torch.rand(2, 3, 100, 130, generator=torch.Generator().manual_seed(3), requires_grad=True)
        kept = [0]

        def pack(tensor, kept=kept):
            kept[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            score = module(images, PROMPTS[:2], [{}, {}])
        score.sum().backward()
        grads.append(images.grad)
        scores.append(score.detach())
        saved.append(kept[0])
    assert saved[1] < saved[0] / 4, saved  # the blocks' activations are recomputed, not kept
    torch.testing.assert_close(scores[1], scores[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-4)


def test_bfloat16_is_the_default_and_stays_close(tiny, reward):
    from alignprop_reward_hpsv3 import HPSv3Reward

    half = HPSv3Reward.from_options(checkpoint=tiny["checkpoint"], base_model=tiny["base_model"])
    assert half.model.model.visual.get_dtype() == torch.bfloat16
    assert half.model.rm_head[0].weight.dtype == torch.float32  # HPSv3 keeps its head in float32
    images = torch.rand(2, 3, 96, 96, requires_grad=True)
    scores = half(images, PROMPTS[:2], [{}, {}])
    scores.sum().backward()
    assert scores.dtype == torch.float32 and torch.isfinite(images.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(scores.detach(), reward(images.detach(), PROMPTS[:2], [{}, {}]), atol=0.1, rtol=0)


def test_padding_and_reward_token_in_a_prompt(reward):
    from alignprop_core.plugin_api import AlignPropError

    ids, mask = reward.tokens(["a", "a much longer prompt"], 4, torch.device("cpu"))
    assert ids.shape == mask.shape and not mask[0].all() and mask[1].all()
    assert mask[0, -1] == 0  # right padding, as HPSv3's processor
    with pytest.raises(AlignPropError, match="contains <\\|Reward\\|>"):
        reward.tokens(["cheat <|Reward|>"], 4, torch.device("cpu"))


def test_two_step_training_with_hpsv3(tiny, train_two_steps):
    out = train_two_steps("hpsv3", {"checkpoint": tiny["checkpoint"], "base_model": tiny["base_model"],
                                    "dtype": "float32", "gradient_checkpointing": True})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_missing_or_wrong_weights_are_one_line_errors(tiny, tmp_path):
    from alignprop_reward_hpsv3 import HPSv3Reward
    from safetensors.torch import save_file

    from alignprop_core.plugin_api import AlignPropError

    def error(**options):
        given = {"checkpoint": tiny["checkpoint"], "base_model": tiny["base_model"], "dtype": "float32"}
        with pytest.raises(AlignPropError) as info:
            HPSv3Reward.from_options(**{**given, **options})
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "checkpoint file" in error(checkpoint=str(tmp_path / "none.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in error(checkpoint=str(tmp_path / "junk.safetensors"))
    save_file({"visual.weight": torch.zeros(2)}, tmp_path / "clip.safetensors")
    assert "is not an HPSv3 model" in error(checkpoint=str(tmp_path / "clip.safetensors"))
    broken = {k: v for k, v in tiny["state"].items() if not k.startswith("visual.merger.")}
    save_file(broken, tmp_path / "broken.safetensors")
    assert "do not fit the Qwen2-VL architecture" in error(checkpoint=str(tmp_path / "broken.safetensors"))
    (tmp_path / "empty").mkdir()
    assert "could not load the Qwen2-VL config and tokenizer" in error(base_model=str(tmp_path / "empty"))
    from transformers import CLIPTextConfig

    other = tmp_path / "clip"
    tiny["tokenizer"].save_pretrained(other)
    CLIPTextConfig().save_pretrained(other)
    assert "not Qwen2-VL's" in error(base_model=str(other))
    bigger = tmp_path / "bigger"
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.add_tokens([f"w{i}" for i in range(20)])
    tokenizer.save_pretrained(bigger)
    tiny_config(tokenizer).save_pretrained(bigger)
    assert "tokens (with <|Reward|>) but the checkpoint's embeddings" in error(base_model=str(bigger))
    plain = tmp_path / "plain"
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    tiny_config(tokenizer).save_pretrained(plain)
    assert "no Qwen2-VL chat template" in error(base_model=str(plain))


@pytest.mark.parametrize("options, part", [
    ({"checkpoint": 3}, "option 'checkpoint' must be a local HPSv3.safetensors"),
    ({"checkpoint": ""}, "option 'checkpoint'"),
    ({"base_model": "a b"}, "neither an existing folder nor a valid hub id"),
    ({"base_model": ["x"]}, "option 'base_model'"),
    ({"dtype": "int4"}, "option 'dtype' must be one of float32, float16, bfloat16"),
    ({"gradient_checkpointing": "yes"}, "option 'gradient_checkpointing' must be true or false"),
    ({"version": "v1"}, "does not accept options"),
])
def test_bad_options_are_one_line_errors(tiny, options, part):
    from alignprop_core import plugins
    from alignprop_core.plugin_api import PluginError

    given = {"checkpoint": tiny["checkpoint"], "base_model": tiny["base_model"], "dtype": "float32"}
    with pytest.raises(PluginError) as info:
        plugins.build("reward", "hpsv3", {**given, **options})
    assert part in str(info.value) and "\n" not in str(info.value), str(info.value)
