"""Tests for the FLAVA-VQA reward plugin on a tiny random-init FlavaForPreTraining (the real architecture).

The tiny model and its FlavaProcessor (FlavaImageProcessor with flava-full's settings + a BertTokenizer on a small
WordPiece vocab written here) are saved with save_pretrained and loaded back through the plugin's factory.
The reference computations run the full ``FlavaForPreTraining.forward`` (``itm_logits``, ``mmm_text_logits``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    BertTokenizer,
    FlavaConfig,
    FlavaForPreTraining,
    FlavaImageProcessor,
    FlavaProcessor,
)

from alignprop_core import plugins  # noqa: E402
from alignprop_core.plugin_api import AlignPropError  # noqa: E402

WORDS = (
    "how many cats dogs are there in this image what animal is cat dog a an photo of the on red blue car cars "
    "color two three painting lighthouse at night"
).split()
HIDDEN = 32
COUNTING = {  # what ddpo-pytorch's `counting` prompt source emits
    "questions": ["How many cats are there in this image?", "What animal is in this image?"],
    "answers": ["3", "cat"],
}
PROMPTS = ["3 cats", "a red car", "an oil painting of a lighthouse at night"]
METADATA = [COUNTING, {"questions": ["What color is the car?"], "answers": ["red"]}, {}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flava")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab += list(characters + "?.,!'") + [f"##{c}" for c in characters]
    vocab = list(dict.fromkeys(vocab + WORDS))  # "a" is both a letter and a word
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(root))  # the vocab_file constructor misbehaves in transformers 5
    assert len(tokenizer) == len(vocab)
    init = 0.2  # larger than FLAVA's 0.02 so that random scores differ visibly between texts and images
    small = dict(
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, initializer_range=init
    )
    config = FlavaConfig(
        text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=64),
        image_config=dict(small, image_size=224, patch_size=32, vocab_size=64),  # real 224 input, 7x7 patches
        multimodal_config=dict(small),
        hidden_size=HIDDEN,
        projection_dim=HIDDEN,
        initializer_range=init,
        # flava-full ships its image codebook; a tiny one here so the loader must skip its weights
        image_codebook_config=dict(hidden_size=8, num_groups=4, num_blocks_per_group=1, vocab_size=64),
    )
    torch.manual_seed(0)
    FlavaForPreTraining(config).eval().save_pretrained(str(root))
    # flava-full's preprocessor settings: size 224, crop 224, bicubic, CLIP mean/std
    image_processor = FlavaImageProcessor(size=224, crop_size=224, resample=3, do_center_crop=True)
    FlavaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def reference(model_dir):
    model = FlavaForPreTraining.from_pretrained(str(model_dir), local_files_only=True).eval()
    processor = FlavaProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor


def build(model_dir, **options):
    return plugins.build("reward", "flava_vqa", {"model": str(model_dir), **options})


def uint8_images(batch, height=224, width=224, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(batch)]


def reference_itm(model, processor, pil_images, texts_per_image):
    """Mean ITM match probability per image, from FlavaForPreTraining.forward on the processor's inputs."""
    images = [img for img, texts in zip(pil_images, texts_per_image) for _ in texts]
    texts = [t for ts in texts_per_image for t in ts]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs, input_ids_masked=inputs["input_ids"], return_loss=False)
    match = out.itm_logits.softmax(-1)[:, 1]
    scores, start = [], 0
    for ts in texts_per_image:
        scores.append(match[start:start + len(ts)].mean())
        start += len(ts)
    return torch.stack(scores)


def test_entry_point_is_installed():
    found = plugins.registrations("reward")
    assert "flava_vqa" in found
    assert found["flava_vqa"].package == "alignprop-reward-flava-vqa"


def test_itm_score_matches_flava_forward_with_and_without_questions(model_dir, reference, helpers):
    model, processor = reference
    reward = build(model_dir)
    assert model.image_codebook is not None and reward.model.image_codebook is None  # not needed by any score
    arrays = uint8_images(3)  # 224x224: the image processor only rescales and normalises
    scores = reward(helpers.to_tensor(arrays), PROMPTS, METADATA)
    assert scores.shape == (3,)
    texts = [
        ["How many cats are there in this image? 3", "What animal is in this image? cat"],
        ["What color is the car? red"],
        [PROMPTS[2]],  # no questions: the prompt itself is the text
    ]
    expected = reference_itm(model, processor, [Image.fromarray(a) for a in arrays], texts)
    torch.testing.assert_close(scores.detach(), expected, atol=1e-5, rtol=1e-5)
    assert ((scores > 0) & (scores < 1)).all()
    # the score really depends on the metadata: other answers give other scores
    wrong = [{"questions": COUNTING["questions"], "answers": ["7", "dog"]}, METADATA[1], {}]
    assert not torch.allclose(reward(helpers.to_tensor(arrays), PROMPTS, wrong)[0], scores[0], atol=1e-4)
    # and on the image
    flipped = reward(helpers.to_tensor(arrays).flip(-1), PROMPTS, METADATA)
    assert not torch.allclose(flipped, scores, atol=1e-4)


def test_answer_likelihood_matches_flava_mmm_text_head(model_dir, reference, helpers):
    model, processor = reference
    reward = build(model_dir, score="answer_likelihood")
    arrays = uint8_images(2, seed=3)
    metadata = [COUNTING, {}]
    prompts = ["3 cats", "a red car on the night"]
    scores = reward(helpers.to_tensor(arrays), prompts, metadata)

    tokenizer = processor.tokenizer
    expected = []
    for array, (questions, answers) in zip(
        arrays, [(COUNTING["questions"], COUNTING["answers"]), ([""], [prompts[1]])]
    ):
        pair_scores = []
        for question, answer in zip(questions, answers):
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            masked_text = f"{question} {' '.join(['[MASK]'] * len(answer_ids))}".strip()
            inputs = processor(text=[masked_text], images=[Image.fromarray(array)], return_tensors="pt")
            positions = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero().squeeze(1)
            assert len(positions) == len(answer_ids)
            with torch.no_grad():
                out = model(**inputs, input_ids_masked=inputs["input_ids"], return_loss=False)
            log_probs = out.mmm_text_logits[0].log_softmax(-1)[positions, torch.tensor(answer_ids)]
            pair_scores.append(log_probs.mean())
        expected.append(torch.stack(pair_scores).mean())
    torch.testing.assert_close(scores.detach(), torch.stack(expected), atol=1e-4, rtol=1e-5)
    assert (scores < 0).all()


def test_gradient_reaches_images_and_reward_is_frozen(model_dir, helpers):
    for score in ("itm", "answer_likelihood"):
        reward = build(model_dir, score=score)
        images = torch.rand(2, 3, 160, 256).requires_grad_(True)  # non-square, resized in the graph
        helpers.assert_gradient_reaches_images_never_weights(reward, images, PROMPTS[:2], METADATA[:2])


@pytest.mark.parametrize(
    "height,width,kind",
    [(512, 512, "smooth"), (1024, 1024, "smooth"), (300, 200, "smooth"), (333, 1000, "smooth"), (512, 768, "noise")],
)
def test_preprocessing_matches_the_flava_image_processor(model_dir, reference, height, width, kind, helpers):
    model, processor = reference
    reward = build(model_dir)
    if kind == "smooth":
        array = helpers.smooth_uint8(height, width, seed=height + width)
    else:
        array = uint8_images(1, height, width)[0]
    ours = reward.preprocess(helpers.to_tensor([array]))
    from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil

    pil_processor = FlavaImageProcessorPil(**processor.image_processor.to_dict())
    # FlavaProcessor's default image processor (torchvision backend) and the PIL backend
    for image_processor in (processor.image_processor, pil_processor):
        ref = image_processor(Image.fromarray(array), return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        # measured (normalised units) for both backends: mean |diff| 0.0038-0.0045, max |diff| 0.014-0.016,
        # i.e. about one uint8 level (0.015): the processors round the resized image to uint8; rounded to uint8
        # levels as well, 82-92% of the values are identical and the rest one level apart
        helpers.assert_within_one_uint8_level(ours, ref, reward.image_mean, reward.image_std)
        with torch.no_grad():
            reference_score = reward.model.itm_head(
                _multimodal(reward, ref, "How many cats are there in this image? 3")
            ).softmax(-1)[0, 1]
            question = {"questions": ["How many cats are there in this image?"], "answers": ["3"]}
            our_score = reward(helpers.to_tensor([array]), ["x"], [question])
        # measured |ITM probability diff| on the tiny model (init std 0.2, very sensitive to pixel changes):
        # 1.6e-4 .. 1.2e-3 (333x1000: 1.14e-3 torchvision / 1.19e-3 PIL backend; 512x768 noise: 6.8e-4 / 5.4e-4)
        assert (our_score - reference_score).abs().max() < 3e-3


def test_preprocessing_follows_a_shortest_edge_processor_config(reference, helpers):
    """Processor configs with ``shortest_edge`` resize the short side and center crop (floored offsets)."""
    from alignprop_reward_flava_vqa import FlavaVQAReward

    model, processor = reference
    image_processor = FlavaImageProcessor(size={"shortest_edge": 224}, crop_size=224, resample=3)
    reward = FlavaVQAReward(model, FlavaProcessor(image_processor=image_processor, tokenizer=processor.tokenizer))
    # resized to 227x224 and 224x623: margins 3 and 399, where floor(margin / 2) != round(margin / 2)
    for height, width in ((203, 200), (200, 557)):
        array = helpers.smooth_uint8(height, width, seed=height)
        ref = image_processor(Image.fromarray(array), return_tensors="pt")["pixel_values"]
        ours = reward.preprocess(helpers.to_tensor([array]))
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        # measured mean |diff| 0.0036-0.0045, max 0.016 (one uint8 level); the crop shifted by one pixel (rounded
        # instead of floored offsets) gives 0.041 / 0.012
        assert (ours - ref).abs().mean() < 0.008


def _multimodal(reward, pixel_values, text):
    """Multimodal states of FlavaModel (the library's own forward) for one image/text pair."""
    inputs = reward.tokenizer([text], return_tensors="pt")
    out = reward.model.flava(pixel_values=pixel_values, **inputs, skip_multimodal_encoder=False, return_dict=True)
    return out.multimodal_embeddings


def test_text_states_are_cached(model_dir, monkeypatch, helpers):
    reward = build(model_dir)
    text_model = reward.model.flava.text_model
    calls = []
    original = text_model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(text_model, "forward", spy)
    images = helpers.to_tensor(uint8_images(3))
    first = reward(images, PROMPTS, METADATA)
    assert calls == [4]  # 2 + 1 question texts + 1 prompt
    second = reward(images, PROMPTS, METADATA)
    assert calls == [4]  # cache hit: no text re-encoding
    torch.testing.assert_close(first, second)
    new_question = {"questions": ["What animal is in this image?"], "answers": ["dog"]}
    reward(images, PROMPTS, [METADATA[0], METADATA[1], new_question])
    assert calls == [4, 1]


def test_clear_errors(model_dir, tmp_path):
    missing = tmp_path / "no" / "flava"
    with pytest.raises(AlignPropError, match="does not exist.*'model'"):
        build(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlignPropError, match="could not load FlavaForPreTraining.*'model'"):
        build(empty)
    with pytest.raises(AlignPropError, match="score.*itm, answer_likelihood"):
        build(model_dir, score="vqa")
    reward = build(model_dir)
    with pytest.raises(AlignPropError, match="2 questions but 1 answers"):
        reward(torch.rand(1, 3, 224, 224), ["p"], [{"questions": ["a?", "b?"], "answers": ["x"]}])


def test_two_step_training_run_with_flava_vqa(model_dir, train_two_steps):
    out = train_two_steps("flava_vqa", {"model": str(model_dir)})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("options, parts", [
    ({"model": []}, ["option 'model' must be a hub id such as facebook/flava-full or a local FlavaForPreTraining "
                     "folder", "got [] (a list)"]),
    ({"model": ""}, ["option 'model' must be", "got ''"]),
    ({"model": "{file}"}, ["model folder '{file}' is a file, not a folder; set the 'model' option"]),
    ({"model": "bad id!"}, ["got 'bad id!' (neither an existing folder nor a valid hub id)"]),
    ({"score": 1}, ["option 'score' must be one of itm, answer_likelihood, got 1"]),
    ({"score": ""}, ["option 'score' must be one of itm, answer_likelihood, got ''"]),
])
def test_bad_options_are_one_line_errors_before_loading(model_dir, tmp_path, monkeypatch, options, parts):
    import alignprop_reward_flava_vqa as module

    from alignprop_core.plugin_api import PluginError

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(module, "_load", fail)
    (tmp_path / "file").write_bytes(b"\x00")
    options = {k: str(tmp_path / "file") if v == "{file}" else v for k, v in options.items()}
    with pytest.raises(PluginError) as info:
        build(model_dir, **options)
    message = str(info.value)
    assert message.startswith("reward 'flava_vqa': ") and "\n" not in message
    for part in parts:
        part = part.replace("{file}", str(tmp_path / "file"))
        assert part in message, (part, message)
