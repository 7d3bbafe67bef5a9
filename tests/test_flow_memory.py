"""bench/flow_memory.py builds the published FLUX.1-dev, SD3.5-medium, FLUX.2 [klein] 4B, Qwen-Image and
Z-Image-Turbo transformers: their sizes match the published ones and the LoRA reaches every projection the family's
default targets name (meta device only: no memory, a few seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "flow_memory.py"

# Published sizes (sources in docs/flow-memory.md).
# FLUX.1-dev: "Model size 11.9B params" on the Hub (safetensors metadata) and flux1-dev.safetensors is 23.8 GB in
# bf16. SD3.5 medium: "Model size 2.47B params" on the Hub, transformer/diffusion_pytorch_model.safetensors 4.94 GB
# in bf16 ("2.5 billion parameters" in Stability's model card). FLUX.2 [klein] 4B: flux-2-klein-4b.safetensors in
# black-forest-labs/FLUX.2-klein-4B is 7.75 GB in bf16 ("4 billion" on the model card). Qwen-Image: the bf16
# transformer shards of wavespeed/Qwen-Image-bf16 add up to 40.86 GB ("20B" on the model card). Z-Image-Turbo:
# z_image_turbo_bf16.safetensors is 11.46 GiB ("6B parameters" in the model card).
PUBLISHED = {"flux1-dev": 11.9e9, "sd35-medium": 2.47e9, "flux2-klein-4b": 3.875e9, "qwen-image": 20.43e9,
             "z-image-turbo": 6.15e9}
R = 16  # LoRA rank


def _flow_memory():
    spec = importlib.util.spec_from_file_location("bench_flow_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flow_memory():
    return _flow_memory()


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_transformer_size_is_the_published_one(flow_memory, model):
    transformer = flow_memory.build_transformer(model)
    size = flow_memory.count_with_buffers(transformer)  # SD3's position-embedding table is a buffer (0.23 B)
    assert abs(size - PUBLISHED[model]) / PUBLISHED[model] < 0.01, size
    assert flow_memory.PUBLISHED_TRANSFORMER_SIZE[model] == PUBLISHED[model]
    assert next(transformer.parameters()).device.type == "meta"


def test_every_model_is_published_and_takes_its_familys_lora_targets(flow_memory):
    from alignprop_core.families import family_named

    assert set(flow_memory.MODELS) == set(PUBLISHED)
    for model, spec in flow_memory.MODELS.items():
        assert flow_memory.lora_targets(model) == list(family_named(spec["family"]).lora_target_modules)


def test_lora_covers_every_attention_projection(flow_memory):
    """Rank 16 on to_q/k/v/out.0 and add_q/k/v/to_add_out: each adapted Linear adds 16 x (in + out) parameters."""
    flux = flow_memory.build_transformer("flux1-dev")
    # 19 double blocks x 8 projections (3072 -> 3072), 38 single blocks x to_q/k/v (no output projection)
    assert flow_memory.add_lora(flux, "flux1-dev") == 19 * 8 * R * 6144 + 38 * 3 * R * 6144
    sd3 = flow_memory.build_transformer("sd35-medium")
    # 24 blocks x to_q/k/v/out.0 + add_q/k/v (1536 -> 1536), 23 x to_add_out (the last block has none),
    # 13 dual-attention blocks x attn2's to_q/k/v/out.0
    assert flow_memory.add_lora(sd3, "sd35-medium") == (24 * 7 + 23 + 13 * 4) * R * 3072
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in sd3.parameters() if p.requires_grad)


def _adapted(transformer) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A." in name}


def test_lora_covers_the_new_families_default_targets(flow_memory):
    klein = flow_memory.build_transformer("flux2-klein-4b")
    # 5 double blocks x 8 projections (3072 -> 3072); 20 single blocks x the fused to_qkv_mlp_proj (3072 -> 3 x 3072
    # + 2 x 9216 SwiGLU input); the single blocks' fused output projection is a plain Linear named to_out, which the
    # default targets (to_out.0) do not match
    assert flow_memory.add_lora(klein, "flux2-klein-4b") == 5 * 8 * R * 6144 + 20 * R * (3072 + 27648)
    assert len(_adapted(klein)) == 5 * 8 + 20
    qwen = flow_memory.build_transformer("qwen-image")
    # 60 joint blocks x 8 projections (3072 -> 3072)
    assert flow_memory.add_lora(qwen, "qwen-image") == 60 * 8 * R * 6144
    z_image = flow_memory.build_transformer("z-image-turbo")
    # 30 layers + 2 noise-refiner + 2 context-refiner blocks x to_q/k/v/out.0 (3840 -> 3840, 30 heads of 128)
    assert flow_memory.add_lora(z_image, "z-image-turbo") == (30 + 2 + 2) * 4 * R * 7680
    adapted = _adapted(z_image)
    assert {name.split(".")[0] for name in adapted} == {"layers", "noise_refiner", "context_refiner"}
    assert next(z_image.parameters()).device.type == "meta"


def test_vae_checkpointing_support_is_read_from_the_vae_class(flow_memory):
    """Qwen-Image's video VAE has no gradient checkpointing: its "block ckpt on" rows decode without it."""
    support = {model: flow_memory.vae_supports_checkpointing(model) for model in flow_memory.MODELS}
    assert support == {"flux1-dev": True, "sd35-medium": True, "flux2-klein-4b": True, "qwen-image": False,
                       "z-image-turbo": True}
