"""The per-prompt text-embedding cache on every family's tiny pipeline: a batch assembled from cached rows has the
layout of the batch encode (padding, masks, lengths) and its values within float rounding, each distinct prompt
runs the text encoders once, a prompt's embedding does not depend on its batch-mates, the cache is bounded, and
capacity 0 is the plain batch encode."""

import dataclasses

import pytest
import torch
from diffusers import DiffusionPipeline

from alignprop_core import AlignPropConfig
from alignprop_core.errors import ConfigError
from alignprop_core.families import FAMILIES, family_of
from alignprop_core.prompt_cache import PromptEmbeddingCache, cache_for, forget
from alignprop_core.sampler import encode_prompts, sample_images

CPU = torch.device("cpu")
# different token counts, so that the variable-length families (Qwen-Image, Z-Image) pad
PROMPTS = ["a cat", "a dog riding a very long bicycle through a small town", "owl"]
# (negative prompt, guidance scale, true-CFG scale) that give every family a negative pass
GUIDANCE = {"flux": (" ", 3.5, 4.0), "qwen-image": (" ", 1.0, 4.0), "flux2-klein": (None, 4.0, 1.0)}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    loaded = {}
    for family in FAMILIES:
        pipe = DiffusionPipeline.from_pretrained(family.build_tiny(root / family.name), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        family.prepare(pipe, "auto", CPU, torch.float32)
        loaded[family.name] = pipe
    return loaded


def guidance_of(name):
    return GUIDANCE.get(name, (None, 3.0, 1.0))


def text_encoder_calls(pipe):
    """Counts forward calls of every text encoder of ``pipe``; returns the counter list (one entry per call)."""
    calls = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def assert_same_layout_and_close(cached, batch):
    assert type(cached) is type(batch)
    for f in dataclasses.fields(batch):
        a, b = getattr(cached, f.name), getattr(batch, f.name)
        assert (a is None) == (b is None), f.name
        if b is None:
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f.name
        if not a.dtype.is_floating_point:  # masks and lengths: the same padding
            assert torch.equal(a, b), f.name
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f.name)


@pytest.mark.parametrize("name", [family.name for family in FAMILIES])
def test_cached_batch_has_the_batch_layout_and_values(pipes, name):
    pipe = pipes[name]
    negative, guidance, true_cfg = guidance_of(name)
    batch = encode_prompts(pipe, PROMPTS, negative, guidance, CPU, true_cfg)
    assert batch.guided, "the case must exercise the negative pass"
    cache = PromptEmbeddingCache(8)
    cached = cache.encode(pipe, PROMPTS, negative, guidance, CPU, true_cfg)
    assert_same_layout_and_close(cached, batch)
    # and the chain samples the same images from it (within rounding of the embeddings)
    kwargs = dict(num_steps=3, guidance_scale=guidance, eta=0.0, height=32, width=32, grad_steps=0)
    images = [sample_images(pipe, e, generator=[torch.Generator().manual_seed(i) for i in range(3)], **kwargs)
              for e in (batch, cached)]
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["sdxl", "qwen-image", "z-image"])
def test_each_distinct_prompt_is_encoded_once_and_alone(pipes, name):
    pipe = pipes[name]
    negative, guidance, true_cfg = guidance_of(name)
    cache = PromptEmbeddingCache(8)
    calls = text_encoder_calls(pipe)
    encode_prompts(pipe, ["owl"], negative, guidance, CPU, true_cfg)
    per_prompt = len(calls)
    calls.clear()
    first = cache.encode(pipe, ["a cat", "owl", "a cat"], negative, guidance, CPU, true_cfg)
    assert len(calls) == 2 * per_prompt  # "a cat" and "owl", once each
    assert (cache.misses, cache.hits, len(cache)) == (2, 1, 2)
    calls.clear()
    again = cache.encode(pipe, ["owl", "a cat"], negative, guidance, CPU, true_cfg)
    assert calls == [] and (cache.misses, cache.hits) == (2, 3)
    # a prompt's embedding is its lone encode, bitwise, whatever batch it arrives in
    alone = encode_prompts(pipe, ["owl"], negative, guidance, CPU, true_cfg)
    joined = family_of(pipe).join_embeddings([alone, encode_prompts(pipe, ["a cat"], negative, guidance, CPU,
                                                                      true_cfg)])
    for f in dataclasses.fields(again):
        value = getattr(again, f.name)
        if value is not None:
            assert torch.equal(value, getattr(joined, f.name)), f.name
    assert per_prompt >= 1 and first.positive.shape[0] == 3


def test_settings_are_part_of_the_key_and_the_cache_is_bounded(pipes):
    pipe = pipes["sd"]
    cache = PromptEmbeddingCache(2)
    with_cfg = cache.encode(pipe, ["a cat"], None, 3.0, CPU)
    without = cache.encode(pipe, ["a cat"], None, 1.0, CPU)
    assert with_cfg.guided and not without.guided and cache.misses == 2
    cache.encode(pipe, ["a cat"], "blurry", 3.0, CPU)  # a third entry pushes out the least recently used
    assert len(cache) == 2 and cache.misses == 3
    cache.encode(pipe, ["a cat"], None, 3.0, CPU)  # the first one, pushed out: encoded again
    assert cache.misses == 4


def test_capacity_zero_is_the_plain_batch_encode(pipes):
    pipe = pipes["qwen-image"]
    plain = encode_prompts(pipe, PROMPTS, " ", 1.0, CPU, 4.0)
    cache = PromptEmbeddingCache(0)
    off = cache.encode(pipe, PROMPTS, " ", 1.0, CPU, 4.0)
    assert len(cache) == 0
    for f in dataclasses.fields(plain):
        a, b = getattr(off, f.name), getattr(plain, f.name)
        assert (a is None and b is None) or torch.equal(a, b), f.name


def test_one_cache_per_pipeline_and_per_capacity(pipes):
    sd, sdxl = pipes["sd"], pipes["sdxl"]
    assert cache_for(sd, 4) is cache_for(sd, 4)
    assert cache_for(sd, 4) is not cache_for(sdxl, 4)
    assert cache_for(sd, 5).capacity == 5
    kept = cache_for(sd, 5)
    forget(sd)
    assert cache_for(sd, 5) is not kept


@pytest.mark.parametrize("value", [-1, "many", 2.5])
def test_prompt_cache_size_must_be_a_count(value):
    with pytest.raises(ConfigError, match="prompt_cache_size"):
        AlignPropConfig(prompt_cache_size=value).validate()
