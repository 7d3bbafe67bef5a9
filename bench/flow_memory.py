"""GPU memory of LoRA reward backprop through five flow transformers at real sizes, on paper: FLUX.1-dev,
SD3.5-medium, FLUX.2 [klein] 4B, Qwen-Image and Z-Image-Turbo.

Nothing is downloaded and nothing real is computed. The transformers, VAEs and text encoders are built from their
published configs (bench/flow_configs/) on the meta device; parameter counts come from those models. Activation sizes
come from running the real diffusers code on fake tensors (torch FakeTensorMode: shapes and dtypes, no data) at the
real width and sequence length, with the attention kernel and the autocast rules of a CUDA bf16 run: the bytes
autograd saves for backward (torch.autograd.graph.saved_tensors_hooks, deduplicated by storage, parameters left out),
and the peak of the live tensors during forward+backward (torch.distributed._tools.mem_tracker.MemTracker). The
transformers run at reduced depth (``MODELS[...]["reduced"]``: two blocks of each repeated block kind, and the
blocks that occur once or twice at full size) and the per-block sizes are scaled to the full depth;
--check-full-depth also runs the full-depth models and compares. Each model is called as alignprop's family adapter
calls it (alignprop_core/families/), with the adapter's default LoRA targets and the sampling settings of
bench/gpu_cases.py. docs/flow-memory.md explains the method. Run:

    OMP_NUM_THREADS=1 .venv/bin/python bench/flow_memory.py [--check-full-depth] [--models a,b] [--sizes 512,1024]
        [--out bench/results/flow_memory.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "flow_configs"
DEFAULT_OUT = HERE / "results" / "flow_memory.json"
GIB = 1024 ** 3

LORA_RANK = 16
LORA_ALPHA = 16
SIZES = (512, 1024)
BYTES_BF16 = 2
BYTES_LORA = 4 * 4  # fp32 parameter + fp32 grad + two fp32 AdamW states

# Published transformer sizes (sources in docs/flow-memory.md); tests/test_flow_memory.py checks the counts against
# them within 1 %.
PUBLISHED_TRANSFORMER_SIZE = {"flux1-dev": 11.9e9, "sd35-medium": 2.47e9, "flux2-klein-4b": 3.875e9,
                              "qwen-image": 20.43e9, "z-image-turbo": 6.15e9}

# Text encoders: architecture fields of their published transformers configs (the same models in FLUX.1-dev and
# SD3.5: CLIP ViT-L/14 text tower, OpenCLIP ViT-bigG/14 text tower, T5 v1.1 XXL encoder). The LLM encoders of the
# newer models are built from their config.json in bench/flow_configs/.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              is_encoder_decoder=False, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------- the models, one by one
# Each model's transformer call, sampling step and VAE decode, as its alignprop family adapter runs them (they run
# inside an active FakeTensorMode). ``inputs(size)`` gives the positional input of one transformer call (what the
# sampler's checkpoint stores; it requires grad) and the call's conditioning; ``call`` is the adapter's call_denoiser;
# ``latents`` the sampling chain's state; ``step`` one sampling step given ``evaluate`` (one checkpointed call) and the
# conditioning of each pass; ``vae_latents``/``decode`` the decode at the end of the chain.
def latent_hw(size: int) -> int:
    return size // 8  # every VAE here downsamples 8x


def token_grid(size: int) -> int:
    return latent_hw(size) // 2  # every transformer here sees 2x2 latent patches as one token (packed/patchified)


def image_tokens(size: int) -> int:
    return token_grid(size) ** 2


def empty(*shape, dtype=None):
    import torch

    return torch.empty(*shape, dtype=dtype or torch.bfloat16)


def euler(latents, velocity, steps: int):
    """FlowMatchEulerDiscreteScheduler.step's arithmetic: fp32, back to the velocity's dtype."""
    return (latents.float() + (-1.0 / steps) * velocity.float()).to(velocity.dtype)


def call_hidden_states(transformer, sample, cond):
    """FLUX.1, SD3, Qwen-Image (FlowMatchFamily.call_denoiser)."""
    return transformer(hidden_states=sample, **cond, return_dict=False)[0]


# FLUX.1-dev: guidance-distilled, one pass per step; the chain runs on the packed latents
def flux1_inputs(size: int, requires_grad: bool = True):
    import torch

    tokens, text = image_tokens(size), MODELS["flux1-dev"]["text_tokens"]
    return empty(1, tokens, 64).requires_grad_(requires_grad), dict(
        encoder_hidden_states=empty(1, text, 4096), pooled_projections=empty(1, 768), timestep=empty(1),
        guidance=empty(1, dtype=torch.float32), img_ids=empty(tokens, 3), txt_ids=empty(text, 3))


def flux1_step(latents, evaluate, conds, steps):
    return euler(latents, evaluate(latents, conds[0]), steps)


# SD3.5: true CFG as one batch of 2 per step, guidance 4.5
def sd3_inputs(size: int, requires_grad: bool = True):
    hw, text = latent_hw(size), MODELS["sd35-medium"]["text_tokens"]
    return empty(2, 16, hw, hw).requires_grad_(requires_grad), dict(
        encoder_hidden_states=empty(2, text, 4096), pooled_projections=empty(2, 2048), timestep=empty(2))


def sd3_latents(size: int):
    return empty(1, 16, latent_hw(size), latent_hw(size))


def sd3_step(latents, evaluate, conds, steps):
    import torch

    uncond, cond = evaluate(torch.cat([latents] * 2), conds[0]).chunk(2)
    return euler(latents, uncond + 4.5 * (cond - uncond), steps)


def autoencoder_kl_latents(size: int):
    return empty(1, 16, latent_hw(size), latent_hw(size)).requires_grad_(True)


def decode_autoencoder_kl(vae, z):
    """FlowMatchFamily.decode: unscale and shift, decode in the VAE's dtype."""
    return vae.decode((z / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype), return_dict=False)[0]


# FLUX.2 [klein] 4B: step-distilled, no CFG; 32-channel latents patchified 2x2 to [1, 128, h/2, w/2], packed into
# tokens around each call; Qwen3 text states of layers 9, 18, 27 side by side (3 x 2560), padded to 512 tokens
def klein_inputs(size: int, requires_grad: bool = True):
    import torch

    tokens, text = image_tokens(size), MODELS["flux2-klein-4b"]["text_tokens"]
    return empty(1, tokens, 128).requires_grad_(requires_grad), dict(
        timestep=empty(1), guidance=None, encoder_hidden_states=empty(1, text, 3 * 2560),
        txt_ids=empty(1, text, 4, dtype=torch.int64), img_ids=empty(1, tokens, 4, dtype=torch.int64))


def call_klein(transformer, sample, cond):
    return transformer(hidden_states=sample, **cond, return_dict=False)[0][:, : sample.shape[1]]


def klein_latents(size: int):
    return empty(1, 128, token_grid(size), token_grid(size))


def klein_step(latents, evaluate, conds, steps):
    batch, channels, height, width = latents.shape
    packed = latents.reshape(batch, channels, height * width).permute(0, 2, 1)
    velocity = evaluate(packed, conds[0])
    return euler(latents, velocity.permute(0, 2, 1).reshape(batch, channels, height, width), steps)


def klein_vae_latents(size: int):
    return empty(1, 128, token_grid(size), token_grid(size)).requires_grad_(True)


def decode_klein(vae, z):
    """Flux2KleinFamily.decode: the latent batch norm undone, unpatchified, decoded."""
    import torch
    from diffusers import Flux2KleinPipeline

    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.dtype)
    latents = Flux2KleinPipeline._unpatchify_latents(z * std + mean)
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


# Qwen-Image: true CFG 4 as two separate passes per step (positive, then the negative prompt " "), combined and
# rescaled to the positive prediction's norm per token; FLUX's 2x2 packing around each call; Qwen2.5-VL's last
# hidden states (3584 wide), unpadded for batch 1
def qwen_inputs(size: int, requires_grad: bool = True):
    text, rows = MODELS["qwen-image"]["text_tokens"], token_grid(size)
    return empty(1, rows * rows, 64).requires_grad_(requires_grad), dict(
        timestep=empty(1), guidance=None, encoder_hidden_states=empty(1, text, 3584),
        encoder_hidden_states_mask=None, img_shapes=[[(1, rows, rows)]])


def qwen_step(latents, evaluate, conds, steps):
    import torch
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    positive, negative = evaluate(packed, conds[0]), evaluate(packed, conds[1])
    combined = negative + 4.0 * (positive - negative)
    velocity = combined * (torch.norm(positive, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    velocity = velocity.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return euler(latents, velocity.reshape(batch, channels, height, width), steps)


def decode_qwen(vae, z):
    """QwenImageFamily.decode: one video frame, the per-channel latent mean/std undone, decoded, frame 0."""
    import torch

    frames = z.unsqueeze(2).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(frames)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(frames)
    return vae.decode(frames / inverse_std + mean, return_dict=False)[0][:, :, 0]


# Z-Image-Turbo: no CFG (guidance 0); fp32 latents in the chain, cast to bf16 for each call; one [C, 1, H, W] latent
# and one caption (Qwen3's second-to-last hidden states, 2560 wide, padding dropped) per image; predicts -velocity
def z_image_inputs(size: int, requires_grad: bool = True):
    import torch

    hw, text = latent_hw(size), MODELS["z-image-turbo"]["text_tokens"]
    return empty(1, 16, hw, hw, dtype=torch.float32).requires_grad_(requires_grad), dict(
        t=empty(1, dtype=torch.float32), cap_feats=[empty(text, 2560)])


def call_z_image(transformer, sample, cond):
    """ZImageFamily.call_denoiser."""
    import torch

    frames = list(sample.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
    outputs = transformer(frames, cond["t"], cond["cap_feats"], return_dict=False)[0]
    return torch.stack([out.float() for out in outputs]).squeeze(2)


def z_image_latents(size: int):
    import torch

    return empty(1, 16, latent_hw(size), latent_hw(size), dtype=torch.float32)


def z_image_step(latents, evaluate, conds, steps):
    return euler(latents, -evaluate(latents, conds[0]), steps)


def z_image_vae_latents(size: int):
    import torch

    return empty(1, 16, latent_hw(size), latent_hw(size), dtype=torch.float32).requires_grad_(True)


def double_single_blocks(transformer) -> dict:
    """FLUX.1 and FLUX.2: the double-stream blocks, then the single-stream ones."""
    blocks = {f"double.{i}": b for i, b in enumerate(transformer.transformer_blocks)}
    blocks.update({f"single.{i}": b for i, b in enumerate(transformer.single_transformer_blocks)})
    return blocks


def sd3_blocks(transformer) -> dict:
    dual = set(transformer.config.dual_attention_layers)
    last = len(transformer.transformer_blocks) - 1
    return {f"{'last' if i == last else 'dual' if i in dual else 'joint'}.{i}": b
            for i, b in enumerate(transformer.transformer_blocks)}


def qwen_blocks(transformer) -> dict:
    return {f"block.{i}": b for i, b in enumerate(transformer.transformer_blocks)}


def z_image_blocks(transformer) -> dict:
    """In execution order: the image-only noise refiner, the caption-only context refiner, the joint layers."""
    blocks = {f"noise_refiner.{i}": b for i, b in enumerate(transformer.noise_refiner)}
    blocks.update({f"context_refiner.{i}": b for i, b in enumerate(transformer.context_refiner)})
    blocks.update({f"layer.{i}": b for i, b in enumerate(transformer.layers)})
    return blocks


def llm(config_class: str, model_class: str, config_file: str) -> tuple:
    return ("hf", (config_class, model_class), config_file)


# Per model: classes and configs; the alignprop family whose adapter defaults (LoRA targets) apply; sampling (steps
# and transformer passes per step, as bench/gpu_cases.py's CASES); the text tokens each call sees (the pipelines'
# defaults); the text encoders; the reduced depth the activations are measured at and, per block kind, (count in the
# full model, count in the reduced model, index of the reduced block whose increment is scaled: the second block of a
# kind, so that what all blocks share is charged already).
MODELS = {
    "flux1-dev": dict(
        title="FLUX.1-dev", family="flux", transformer=("FluxTransformer2DModel", "flux1-dev-transformer.json"),
        vae=("AutoencoderKL", "flux1-dev-vae.json"),
        # guidance-distilled: guidance is an input, one transformer pass per step, no CFG batch
        steps=28, calls_per_step=1, batch_per_call=1, text_tokens=512,
        text_encoders={"CLIP-L (CLIPTextModel)": ("clip", CLIP_L, False), "T5-XXL encoder": ("t5", T5_XXL, None)},
        reduced={"num_layers": 2, "num_single_layers": 2},
        kinds={"double": (19, 2, 1), "single": (38, 2, 1)},
        inputs=flux1_inputs, call=call_hidden_states, latents=lambda size: empty(1, image_tokens(size), 64),
        step=flux1_step, blocks=double_single_blocks, vae_latents=autoencoder_kl_latents,
        decode=decode_autoencoder_kl),
    "sd35-medium": dict(
        title="SD3.5 medium", family="sd3", transformer=("SD3Transformer2DModel", "sd35-medium-transformer.json"),
        vae=("AutoencoderKL", "sd35-medium-vae.json"),
        # true CFG: two passes per step, run as one batch of 2; CLIP 77 tokens + T5 256 tokens
        steps=28, calls_per_step=1, batch_per_call=2, text_tokens=77 + 256,
        text_encoders={"CLIP-L (CLIPTextModelWithProjection)": ("clip", CLIP_L, True),
                       "OpenCLIP bigG (CLIPTextModelWithProjection)": ("clip", CLIP_BIGG, True),
                       "T5-XXL encoder": ("t5", T5_XXL, None)},
        reduced={"num_layers": 5, "dual_attention_layers": [0, 1]},
        # blocks 0-12 have dual attention (MMDiT-X), 13-22 are plain joint blocks, 23 is the context_pre_only block
        kinds={"dual": (13, 2, 1), "joint": (10, 2, 3), "last": (1, 1, 4)},
        inputs=sd3_inputs, call=call_hidden_states, latents=sd3_latents, step=sd3_step, blocks=sd3_blocks,
        vae_latents=autoencoder_kl_latents, decode=decode_autoencoder_kl),
    "flux2-klein-4b": dict(
        title="FLUX.2 [klein] 4B", family="flux2-klein",
        transformer=("Flux2Transformer2DModel", "flux2-klein-4b-transformer.json"),
        vae=("AutoencoderKLFlux2", "flux2-klein-4b-vae.json"),
        # step-distilled (model_index.json is_distilled): 4 steps, guidance 1, so no CFG pass; the pipeline pads
        # every prompt to max_sequence_length 512
        steps=4, calls_per_step=1, batch_per_call=1, text_tokens=512,
        text_encoders={"Qwen3-4B (Qwen3ForCausalLM)": llm("Qwen3Config", "Qwen3ForCausalLM",
                                                          "flux2-klein-4b-text-encoder.json")},
        reduced={"num_layers": 2, "num_single_layers": 2},
        kinds={"double": (5, 2, 1), "single": (20, 2, 1)},
        inputs=klein_inputs, call=call_klein, latents=klein_latents, step=klein_step, blocks=double_single_blocks,
        vae_latents=klein_vae_latents, decode=decode_klein),
    "qwen-image": dict(
        title="Qwen-Image", family="qwen-image",
        transformer=("QwenImageTransformer2DModel", "qwen-image-transformer.json"),
        vae=("AutoencoderKLQwenImage", "qwen-image-vae.json"),
        # 50 steps, true CFG 4 against the negative prompt " ": two passes of batch 1 per step. The pipeline does not
        # pad a single prompt: its tokens are the prompt's, cut at max_sequence_length 512; 512 is modelled for both
        # passes (the upper bound; the negative prompt's real length is a few tokens)
        steps=50, calls_per_step=2, batch_per_call=1, text_tokens=512,
        text_encoders={"Qwen2.5-VL-7B (Qwen2_5_VLForConditionalGeneration)": llm(
            "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "qwen-image-text-encoder.json")},
        reduced={"num_layers": 2},
        kinds={"block": (60, 2, 1)},
        # the last block's text-stream output is discarded (the model returns the image tokens), so the LoRA on its
        # to_add_out gets no grad, in a real run too
        unused_lora=lambda t: (f"transformer_blocks.{len(t.transformer_blocks) - 1}.attn.to_add_out",),
        inputs=qwen_inputs, call=call_hidden_states, latents=sd3_latents, step=qwen_step, blocks=qwen_blocks,
        vae_latents=autoencoder_kl_latents, decode=decode_qwen),
    "z-image-turbo": dict(
        title="Z-Image-Turbo", family="z-image",
        transformer=("ZImageTransformer2DModel", "z-image-turbo-transformer.json"),
        vae=("AutoencoderKL", "z-image-turbo-vae.json"),
        # 8 transformer calls, guidance 0 (no CFG pass). The pipeline keeps each caption's real tokens (its padding
        # dropped), cut at max_sequence_length 512, and the transformer pads them to a multiple of 32: 512 modelled
        steps=8, calls_per_step=1, batch_per_call=1, text_tokens=512,
        text_encoders={"Qwen3-4B (Qwen3Model)": llm("Qwen3Config", "Qwen3Model", "z-image-turbo-text-encoder.json")},
        reduced={"n_layers": 2},
        kinds={"noise_refiner": (2, 2, 1), "context_refiner": (2, 2, 1), "layer": (30, 2, 1)},
        inputs=z_image_inputs, call=call_z_image, latents=z_image_latents, step=z_image_step,
        blocks=z_image_blocks, vae_latents=z_image_vae_latents, decode=decode_autoencoder_kl),
}


# ---------------------------------------------------------------------------------------------------------- building
def load_config(name: str) -> dict:
    """A published config without the bookkeeping keys (``_source``, ``_class_name``...)."""
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_with_buffers(module) -> int:
    """Parameters and buffers, what the weights occupy in memory (SD3's 384x384 position-embedding table is a buffer
    of 0.23 B values, stored in the published checkpoint)."""
    return count(module) + sum(b.numel() for b in module.buffers())


@contextlib.contextmanager
def quiet_diffusers():
    """Silences diffusers' notes while building (the "modules that should be kept in float32: []" note on .to(bf16),
    and the published config keys a class does not take, such as Qwen-Image's pooled_projection_dim)."""
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def build_transformer(model: str, overrides: dict | None = None):
    """The transformer on the meta device in bf16, frozen."""
    import diffusers
    import torch

    class_name, config_file = MODELS[model]["transformer"]
    config = {**load_config(config_file), **(overrides or {})}
    with quiet_diffusers(), torch.device("meta"):
        transformer = getattr(diffusers, class_name).from_config(config).to(torch.bfloat16)
    transformer.requires_grad_(False)
    return transformer


def lora_targets(model: str) -> list[str]:
    """The LoRA target modules of the model's alignprop family by default (its adapter's lora_target_modules)."""
    from alignprop_core.families import family_named

    return list(family_named(MODELS[model]["family"]).lora_target_modules)


def add_lora(transformer, model: str) -> int:
    """Adds the rank-16 LoRA (peft suffix matching on the family's default targets) on meta, trainable factors cast
    to fp32 as alignprop_core.lora.add_lora does; returns the LoRA parameter count."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    with torch.device("meta"):
        transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=lora_targets(model),
                                           init_lora_weights="gaussian"))
    cast_training_params(transformer, dtype=torch.float32)
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def build_vae(model: str):
    import diffusers
    import torch

    class_name, config_file = MODELS[model]["vae"]
    with quiet_diffusers(), torch.device("meta"):
        vae = getattr(diffusers, class_name).from_config(load_config(config_file)).to(torch.bfloat16)
    vae.requires_grad_(False)
    return vae


def vae_supports_checkpointing(model: str) -> bool:
    import diffusers

    return bool(getattr(getattr(diffusers, MODELS[model]["vae"][0]), "_supports_gradient_checkpointing", False))


def text_encoder_params(model: str) -> dict[str, int]:
    """Parameter counts of the frozen text encoders, built on meta from their published architecture fields."""
    import torch
    import transformers

    counts = {}
    for name, (kind, fields, extra) in MODELS[model]["text_encoders"].items():
        with torch.device("meta"):
            if kind == "clip":
                encoder = (transformers.CLIPTextModelWithProjection if extra else transformers.CLIPTextModel)(
                    transformers.CLIPTextConfig(**fields))
            elif kind == "t5":
                encoder = transformers.T5EncoderModel(transformers.T5Config(**fields))
            else:
                config_class, model_class = fields
                encoder = getattr(transformers, model_class)(getattr(transformers, config_class)(
                    **load_config(extra)))
        counts[name] = count(encoder)  # tied input/output embeddings (Qwen3-4B) count once
    return counts


def parameter_counts(model: str) -> dict:
    """Transformer (parameters + buffers), LoRA, VAE and text-encoder counts; meta device only, a few seconds."""
    transformer = build_transformer(model)
    params, with_buffers = count(transformer), count_with_buffers(transformer)
    lora = add_lora(transformer, model)
    vae = build_vae(model)
    return {"transformer": with_buffers, "transformer_parameters": params,
            "transformer_buffers": with_buffers - params, "lora": lora, "vae": count_with_buffers(vae),
            "vae_decoder": count_with_buffers(vae.decoder), "text_encoders": text_encoder_params(model)}


# ---------------------------------------------------------------------------------------------- fake-tensor running
def fakeify(module, mode) -> None:
    """Replaces every parameter and buffer by a data-less fake CPU tensor of the same shape, dtype and requires_grad,
    and so every other tensor a module holds as a plain attribute (Qwen-Image's RoPE tables pos_freqs/neg_freqs,
    built on meta with the model)."""
    import torch

    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                               requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
            for name, value in list(vars(sub).items()):
                if isinstance(value, torch.Tensor) and value.device.type == "meta":
                    setattr(sub, name, torch.empty(value.shape, dtype=value.dtype))


def storage_key(t) -> int:
    return t.untyped_storage()._cdata


def nbytes(items: dict) -> int:
    return sum(items.values())


def storages(tensors) -> dict:
    return {storage_key(t): t.untyped_storage().nbytes() for t in tensors}


def tensors_in(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


class SavedMeter:
    """Records the storages of the tensors autograd saves for backward, under the label current when they are saved
    (a block's name, or None outside the blocks); a storage saved under two labels is listed under both. Storages in
    ``exclude`` (parameters, buffers, the call's inputs) are left out."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.label = None
        self.by_label: dict = {}  # label -> {storage key: nbytes}
        self.inputs: dict = {}  # label -> {storage key: nbytes} of the tensors passed to that block
        self.keep: list = []  # the block inputs, held so that no later tensor can reuse their storage's address
        self.largest = (0, None)

    def pack(self, t):
        key = storage_key(t)
        if key not in self.exclude:
            size = t.untyped_storage().nbytes()
            self.by_label.setdefault(self.label, {})[key] = size
            if size > self.largest[0]:
                self.largest = (size, f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} in {self.label}")
        return t

    def enter(self, label, tensors) -> None:
        self.label = label
        self.inputs[label] = storages(tensors)
        self.keep.extend(tensors)

    def union(self, labels=None) -> dict:
        out = {}
        for label, items in self.by_label.items():
            if labels is None or label in labels:
                out.update(items)
        return out

    def input_union(self, labels) -> dict:
        out = {}
        for label in labels:
            out.update(self.inputs.get(label, {}))
        return out


@contextlib.contextmanager
def label_blocks(meter: SavedMeter, blocks: dict):
    """Sets meter.label while each block runs (its first run: not the recomputation in backward) and records the
    tensors passed to it."""
    handles = []
    for label, block in blocks.items():
        def pre(module, args, kwargs, label=label):
            if label not in meter.inputs:
                meter.enter(label, list(tensors_in((args, kwargs))))

        def post(module, args, kwargs, output):
            meter.label = None

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def peak_tracker():
    """torch's MemTracker (a TorchDispatchMode that follows every storage's life, also through checkpoint
    recomputation), without its gradient hooks, which it would put on the frozen parameters too."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return Tracker()


def activation_bytes(snapshot: dict) -> int:
    """Live bytes that are neither parameters/buffers nor the tracked external inputs."""
    (per_device,) = snapshot.values()
    fixed = sum(v for k, v in per_device.items() if k != "Total" and k.value in ("Parameter", "Buffer", "Other"))
    return per_device["Total"] - fixed


class Log:
    def __init__(self):
        self.calls: dict[str, int] = {}

    def add(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1


@contextlib.contextmanager
def gpu_attention(path: str, log: Log):
    """Routes torch.nn.functional.scaled_dot_product_attention (called by diffusers' native attention backend and by
    its SD3 processors) to the kernel PyTorch's SDPA picks on an H100/H200 for these shapes: flash attention for head
    dims up to 256 (FLUX.1, FLUX.2, Qwen-Image and Z-Image 128, SD3 64), memory-efficient attention above (the VAEs'
    single head: 512 wide, Qwen-Image's 384). Both save
    q, k, v, the output and a logsumexp for backward, never the attention matrix. path="math" runs PyTorch's math
    reference instead, which saves the attention probabilities. Inputs are cast to bf16 as CUDA autocast does for
    SDPA. (On fake CPU tensors an unpatched F.scaled_dot_product_attention would follow the CPU kernel choice.)"""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or enable_gqa:
            raise NotImplementedError("only the unmasked, dropout-free attention of these models is modelled")
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = (x.to(dtype) for x in (query, key, value))
        head_dim = query.shape[-1]
        with torch.autocast("cpu", enabled=False):
            if path == "math":
                kind = "math"
                out = torch.ops.aten._scaled_dot_product_attention_math(query, key, value, None, 0.0, is_causal,
                                                                         None, scale=scale)[0]
            elif head_dim <= 256:
                kind = "flash"
                out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                          scale=scale)[0]
            else:
                kind = "memory-efficient"
                out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0,
                                                                              is_causal, scale=scale)[0]
        log.add(f"{kind} attention (head_dim {head_dim}, {query.shape[-2]} tokens, "
                f"{str(query.dtype).replace('torch.', '')})")
        return out

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# torch.nn.functional ops that CUDA autocast runs in fp32 (AT_FORALL_FP32 / AT_FORALL_FP32_SET_OPT_DTYPE in
# torch/include/ATen/autocast_mode.h) and that these models call with bf16 inputs; CPU autocast keeps them in bf16.
CUDA_FP32_FUNCTIONAL = ("layer_norm", "group_norm", "rms_norm", "interpolate", "softmax", "log_softmax")
# other ops of those lists: a bf16 input to one of them would run in bf16 here, unlike on CUDA; they are logged
# ("NOT EMULATED") so that a model calling one shows up in the result
CUDA_FP32_OTHERS = ("pow", "__pow__", "rsqrt", "exp", "log", "sum", "cumsum", "prod", "softmax", "log_softmax")


@contextlib.contextmanager
def cuda_autocast_policy(log: Log):
    """Applies CUDA's autocast rule to the CUDA_FP32_FUNCTIONAL ops (cast bf16/fp16 inputs to fp32, run with autocast
    off) by patching them in torch.nn.functional, so that autograd saves what it saves in a CUDA bf16 autocast run.
    Patched functions rather than a TorchFunctionMode, because checkpointed regions are recomputed inside backward."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    low = (torch.bfloat16, torch.float16)

    def has_low(args, kwargs):
        return any(x.dtype in low for x in tensors_in((args, kwargs)))

    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in low else x

    def fp32(fn, name):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu") and has_low(args, kwargs):
                log.add(f"fp32 {name}")
                with torch.autocast("cpu", enabled=False):
                    return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
            return fn(*args, **kwargs)
        return run

    others = {getattr(torch, n) for n in CUDA_FP32_OTHERS if hasattr(torch, n)}
    others |= {getattr(torch.Tensor, n) for n in CUDA_FP32_OTHERS if hasattr(torch.Tensor, n)}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in others and torch.is_autocast_enabled("cpu") and has_low(args, kwargs):
                log.add(f"NOT EMULATED: bf16 input to {getattr(func, '__name__', func)}")
            return func(*args, **kwargs)

    originals = {name: getattr(F, name) for name in CUDA_FP32_FUNCTIONAL}
    for name, fn in originals.items():
        setattr(F, name, fp32(fn, name))
    try:
        with Watch():
            yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@contextlib.contextmanager
def gpu_rules(attention: str, log: Log):
    """The attention kernel and the CUDA autocast rules; both stay active through backward, where checkpointed
    regions are recomputed (torch.utils.checkpoint restores the autocast state itself)."""
    with gpu_attention(attention, log), cuda_autocast_policy(log):
        yield


def autocast(mode: str):
    """mode="autocast": bf16 weights, fp32 LoRA, bf16 autocast (what alignprop's trainer runs under with
    mixed_precision bf16). mode="bf16": no autocast (bf16 compute; peft then upcasts the LoRA inputs to fp32)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()


def block_checkpointing(module) -> None:
    """diffusers' gradient checkpointing: torch.utils.checkpoint (non-reentrant) around each transformer block, or
    around the VAE decoder's mid block and each up block."""
    module.enable_gradient_checkpointing()


def forward_backward(module, fake, inputs: dict, forward, exclude: list, blocks: dict, attention: str, mode: str,
                     track: bool) -> dict:
    """One forward+backward of ``forward(**inputs)`` on fake tensors. track=False: the saved-tensor accounting, per
    block (the block inputs are held to the end so that no later storage can reuse their address); track=True: the
    peak of the live activation bytes, from MemTracker, in a pass without any held reference. Python's garbage
    collector is off during the pass (after a full collection): tensors held only by reference cycles then count as
    live until the pass ends, whenever the collector would have run, so the peak is reproducible (with it on,
    Qwen-Image's block-checkpointed call peaked 12 MiB lower in one process than in another)."""
    import gc

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _forward_backward(module, fake, inputs, forward, exclude, blocks, attention, mode, track)
    finally:
        if was_enabled:
            gc.enable()


def _forward_backward(module, fake, inputs: dict, forward, exclude: list, blocks: dict, attention: str, mode: str,
                      track: bool) -> dict:
    import torch

    log = Log()
    meter = SavedMeter(set(storages(exclude)))
    tracker = peak_tracker() if track else None
    for p in module.parameters():
        p.grad = None  # a previous pass's LoRA grads would otherwise be counted in this pass's peak
    with fake:
        if tracker:
            tracker.track_external(module, *tensors_in(inputs))
        with gpu_rules(attention, log), tracker or contextlib.nullcontext():
            with label_blocks(meter, {} if track else blocks), autocast(mode), \
                    torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                out = forward(**inputs)
            live = activation_bytes(tracker.get_tracker_snapshot("current")) if tracker else None
            out.float().sum().backward()
            shape = tuple(out.shape)
    result = {"meter": meter, "ops": log.calls, "output_shape": shape}
    if tracker:
        result.update(peak=activation_bytes(tracker.get_tracker_snapshot("peak")), live_after_forward=live)
    return result


# --------------------------------------------------------------------------------------------- transformer calls
def measure_call(model: str, size: int, *, full_depth: bool = False, attention: str = "gpu", mode: str = "autocast",
                 block_ckpt: bool = False, peak: bool = True) -> dict:
    """One transformer call, forward then backward, on fake tensors: the bytes saved for backward (in all, outside
    the blocks, per block, the block inputs) and, with ``peak``, the peak of the live activation bytes. With
    block_ckpt only the peak is measured (the recomputed blocks' tensors are saved by the checkpoint's own hooks)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = MODELS[model]
    transformer = build_transformer(model, None if full_depth else spec["reduced"])
    add_lora(transformer, model)
    if block_ckpt:
        block_checkpointing(transformer)
    fake = FakeTensorMode()
    fakeify(transformer, fake)
    blocks = spec["blocks"](transformer)

    def one_pass(track: bool) -> dict:
        with fake:
            sample, cond = spec["inputs"](size)
        inputs = {"sample": sample, "cond": cond}
        exclude = [*transformer.parameters(), *transformer.buffers(), *tensors_in(inputs)]
        out = forward_backward(transformer, fake, inputs, lambda sample, cond: spec["call"](transformer, sample, cond),
                               exclude, blocks, attention, mode, track)
        unused = spec.get("unused_lora", lambda t: ())(transformer)
        missing = [n for n, p in transformer.named_parameters() if p.requires_grad and p.grad is None
                   and not n.startswith(tuple(f"{m}." for m in unused))]
        assert not missing, f"LoRA factors without a grad: {missing}"
        out["call_input_bytes"] = nbytes(storages(tensors_in(inputs)))
        return out

    if block_ckpt:
        tracked = one_pass(track=True)
        return {"peak": tracked["peak"], "live_after_forward": tracked["live_after_forward"], "ops": tracked["ops"]}
    counted = one_pass(track=False)
    meter = counted["meter"]
    labels = list(blocks)
    outside = meter.by_label.get(None, {})
    increments, input_increments, seen, seen_inputs = {}, {}, dict(outside), {}
    for label in labels:  # what each block adds to the blocks before it (and to what is saved outside the blocks)
        own, own_inputs = meter.by_label.get(label, {}), meter.inputs.get(label, {})
        increments[label] = nbytes({k: v for k, v in own.items() if k not in seen})
        input_increments[label] = nbytes({k: v for k, v in own_inputs.items() if k not in seen_inputs})
        seen.update(own)
        seen_inputs.update(own_inputs)
    # with block checkpointing: stored = what is saved outside the blocks + the block inputs; recomputing block b
    # adds what it saves that is not stored already
    stored = {**outside, **meter.input_union(labels)}
    block_extra = {label: nbytes({k: v for k, v in meter.by_label.get(label, {}).items() if k not in stored})
                   for label in labels}
    out = {"saved": nbytes(meter.union()), "saved_outside_blocks": nbytes(outside),
           "saved_per_block": {label: nbytes(meter.by_label.get(label, {})) for label in labels},
           "increments": increments, "input_increments": input_increments,
           "stored_block_inputs_and_outside": nbytes(stored), "block_recompute": block_extra,
           "largest_saved_tensor": meter.largest[1], "largest_saved_bytes": meter.largest[0],
           "ops": counted["ops"], "call_input_bytes": counted["call_input_bytes"], "peak": None}
    if peak:
        tracked = one_pass(track=True)
        out.update(peak=tracked["peak"], live_after_forward=tracked["live_after_forward"],
                   saved_in_tracked_pass=nbytes(tracked["meter"].union()))
    return out


def scale(model: str, reduced: dict, reduced_ckpt: dict | None = None) -> dict:
    """Full-depth figures from reduced-depth measurements: add (full count - reduced count) x the measured increment
    of each block kind. Peaks: the reduced model's measured peak plus the extra saved bytes (no block checkpointing)
    or the extra stored block inputs (block checkpointing) of the added blocks; the backward working memory on top of
    the saved tensors does not grow with depth (checked by --check-full-depth)."""
    saved, stored, by_kind = reduced["saved"], reduced["stored_block_inputs_and_outside"], {}
    for kind, (n_full, n_reduced, index) in MODELS[model]["kinds"].items():
        label = f"{kind}.{index}"
        saved += (n_full - n_reduced) * reduced["increments"][label]
        stored += (n_full - n_reduced) * reduced["input_increments"][label]
        by_kind[kind] = max(v for k, v in reduced["block_recompute"].items() if k.startswith(kind + "."))
    out = {"saved": saved, "stored_block_inputs_and_outside": stored, "block_recompute_by_kind": by_kind,
           "saved_block_ckpt": stored + max(by_kind.values())}
    if reduced["peak"] is not None:
        out["peak"] = reduced["peak"] + saved - reduced["saved"]
        out["backward_working_memory"] = reduced["peak"] - reduced["saved"]
    if reduced_ckpt is not None:
        out["peak_block_ckpt"] = reduced_ckpt["peak"] + stored - reduced["stored_block_inputs_and_outside"]
    return out


def direct(full: dict, full_ckpt: dict | None = None) -> dict:
    """The same figures from a full-depth measurement."""
    by_kind = {}
    for label, value in full["block_recompute"].items():
        kind = label.split(".")[0]
        by_kind[kind] = max(by_kind.get(kind, 0), value)
    out = {"saved": full["saved"], "stored_block_inputs_and_outside": full["stored_block_inputs_and_outside"],
           "block_recompute_by_kind": by_kind, "saved_block_ckpt": full["stored_block_inputs_and_outside"]
           + max(by_kind.values())}
    if full["peak"] is not None:
        out["peak"] = full["peak"]
        out["backward_working_memory"] = full["peak"] - full["saved"]
    if full_ckpt is not None:
        out["peak_block_ckpt"] = full_ckpt["peak"]
    return out


# -------------------------------------------------------------------------------- stored inputs of checkpointed calls
def measure_chain(model: str, size: int, steps: int) -> tuple[int, int]:
    """Bytes autograd keeps for a chain of ``steps`` sampling steps, each transformer call under torch.utils.checkpoint
    (non-reentrant: it stores the call's positional input, the latents as the family passes them) and the step's
    guidance and Euler update as the family adapter runs them. Reduced-depth model: the stored inputs do not depend on
    depth. Also returns the bytes of the conditioning tensors every call reads (text embeddings, pooled embedding,
    timestep, guidance, position ids)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.checkpoint import checkpoint

    spec = MODELS[model]
    transformer = build_transformer(model, spec["reduced"])
    add_lora(transformer, model)
    fake = FakeTensorMode()
    fakeify(transformer, fake)
    log = Log()
    with fake:
        # one conditioning per pass of a step (Qwen-Image: positive and negative prompt)
        conds = [spec["inputs"](size, requires_grad=False)[1] for _ in range(spec["calls_per_step"])]
        latents = spec["latents"](size)
        meter = SavedMeter(set(storages([*transformer.parameters(), *transformer.buffers()])))

        def call(sample, **cond):
            return spec["call"](transformer, sample, cond)

        def evaluate(sample, cond):
            return checkpoint(call, sample, use_reentrant=False, **cond)

        with gpu_rules("gpu", log):
            with autocast("autocast"), torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                for _ in range(steps):
                    latents = spec["step"](latents, evaluate, conds, spec["steps"])
            latents.float().sum().backward()  # recomputes each call: checks that the checkpointed chain is complete
        shared = nbytes(storages(tensors_in(conds)))
    return nbytes(meter.union()), shared


def stored_inputs(model: str, size: int) -> dict:
    """What the K checkpointed steps keep until backward: per step (all its calls), the growth from a 1-step to a
    2-step chain; shared, the conditioning read by every call (alive for the whole chain)."""
    (one, shared), (two, _) = measure_chain(model, size, 1), measure_chain(model, size, 2)
    per_step = two - one
    fixed = one - per_step  # stored once whatever K (0: the latents are the only positional input)
    steps = MODELS[model]["steps"]
    return {"shared_conditioning": shared, "fixed": fixed, "per_step": per_step,
            "k1": shared + fixed + per_step, "k_all": shared + fixed + steps * per_step}


# ---------------------------------------------------------------------------------------------------------- VAE
def measure_vae(model: str, size: int, attention: str = "gpu", mode: str = "autocast",
                block_ckpt: bool = False, tile: int | None = None) -> dict | None:
    """VAE decode, forward then backward, on fake tensors: the chain's final latents, requiring grad, through the
    family's decode (unscaled/shifted or un-normalised as the pipeline does, then vae.decode). Saved bytes per decoder
    block and the peak of the live activation bytes; ``block_ckpt``: diffusers' VAE gradient checkpointing (decoder mid
    block and each up block checkpointed), peak only; None for a VAE without gradient checkpointing. ``tile``: decode
    in tiles of that many pixels, switched on by the family adapter as ``vae_tile_size`` does in training."""
    from types import SimpleNamespace

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from alignprop_core.families import FAMILIES

    spec = MODELS[model]
    if block_ckpt and not vae_supports_checkpointing(model):
        return None
    vae = build_vae(model)
    if block_ckpt:
        block_checkpointing(vae)
    if tile:
        family = next(f for f in FAMILIES if f.name == spec["family"])
        family.enable_vae_tiling(SimpleNamespace(vae=vae), tile)
    fake = FakeTensorMode()
    fakeify(vae, fake)
    blocks = {"mid_block": vae.decoder.mid_block}
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(vae.decoder.up_blocks)})

    class Decode(torch.nn.Module):
        """The decode as one module call: MemTracker refuses a module called twice at the top level, as the decoder
        is once per tile."""

        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return spec["decode"](self.vae, z)

    decode = Decode()

    def one_pass(track: bool) -> dict:
        with fake:
            z = spec["vae_latents"](size)
        out = forward_backward(vae, fake, {"z": z}, decode, [*vae.parameters(), *vae.buffers(), z], blocks,
                               attention, mode, track)
        assert z.grad is not None
        return out

    tracked = one_pass(track=True)
    out = {"peak": tracked["peak"], "live_after_forward": tracked["live_after_forward"], "ops": tracked["ops"],
           "output_shape": list(tracked["output_shape"])}
    if not block_ckpt:
        meter = one_pass(track=False)["meter"]
        out.update(saved=nbytes(meter.union()), saved_outside_blocks=nbytes(meter.by_label.get(None, {})),
                   saved_per_block={label: nbytes(meter.by_label.get(label, {})) for label in blocks},
                   largest_saved_tensor=meter.largest[1])
    return out


# ---------------------------------------------------------------------------------------------------------- report
def gib(n: float) -> float:
    return n / GIB


# full-depth runs with the peak tracker (minutes each); the saved-tensor accounting runs at full depth for every model
FULL_DEPTH_PEAK = {("flux1-dev", 1024), ("flux2-klein-4b", 512), ("z-image-turbo", 512)}


def measure_size(model: str, size: int, check_full_depth: bool) -> dict:
    spec = MODELS[model]
    reduced = measure_call(model, size)
    reduced_ckpt = measure_call(model, size, block_ckpt=True)
    out = {"image_tokens": image_tokens(size), "text_tokens": spec["text_tokens"],
           "batch_per_call": spec["batch_per_call"], "calls_per_step": spec["calls_per_step"],
           "reduced_depth": reduced, "reduced_depth_block_ckpt": reduced_ckpt,
           "full_depth": scale(model, reduced, reduced_ckpt), "stored_inputs": stored_inputs(model, size),
           "vae": measure_vae(model, size), "vae_block_ckpt": measure_vae(model, size, block_ckpt=True)}
    if check_full_depth:
        # saved-tensor accounting at full depth (fast); the peak tracker at full depth takes minutes, so it runs for
        # FULL_DEPTH_PEAK only
        with_peak = (model, size) in FULL_DEPTH_PEAK
        full = measure_call(model, size, full_depth=True, peak=with_peak)
        full_ckpt = measure_call(model, size, full_depth=True, block_ckpt=True) if with_peak else None
        out["full_depth_direct"] = direct(full, full_ckpt)
    if size == max(SIZES):  # how much one call depends on the attention kernel and on autocast
        out["variants"] = {
            "math_attention": scale(model, measure_call(model, size, attention="math", peak=False)),
            "no_autocast": scale(model, measure_call(model, size, mode="bf16", peak=False)),
            "vae_math_attention": measure_vae(model, size, attention="math"),
            "vae_no_autocast": measure_vae(model, size, mode="bf16"),
            "vae_no_autocast_block_ckpt": measure_vae(model, size, mode="bf16", block_ckpt=True)}
    return out


def run(check_full_depth: bool, models=None, sizes=SIZES, command: str = "") -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    started = time.perf_counter()
    result = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/flow_memory.py" + command,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                           "transformers": transformers.__version__},
              "assumptions": {
                  "batch": 1,
                  "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": "the family adapter's defaults "
                           "(models.*.lora_targets)", "dtype": "float32", "bytes_per_param": BYTES_LORA},
                  "weights": "bf16, frozen (transformer with buffers, text encoders, whole VAE)",
                  "precision": "bf16 autocast with CUDA's fp32 op list (layer/group/rms norm, upsampling in fp32)",
                  "attention": "flash (head_dim <= 256), memory-efficient (the VAEs' single 512- or 384-wide head)",
                  "per_call_checkpointing": "always: each call stores its inputs, is recomputed in backward",
                  "block_checkpointing": "diffusers enable_gradient_checkpointing on the transformer and, where it "
                                         "supports it, the VAE (models.*.vae_checkpointing)",
                  "total": "weights + LoRA/grads/Adam + stored call inputs + max(one-call peak, VAE decode peak)",
                  "not_included": ["reward model", "CUDA context", "allocator overhead and fragmentation",
                                   "text encoders' activations (no_grad, before the chain)"]},
              "models": {}, "rows": []}
    for model in models or MODELS:
        spec = MODELS[model]
        t0 = time.perf_counter()
        entry = {"title": spec["title"], "family": spec["family"], "transformer_class": spec["transformer"][0],
                 "vae_class": spec["vae"][0], "lora_targets": lora_targets(model), "steps": spec["steps"],
                 "calls_per_step": spec["calls_per_step"], "batch_per_call": spec["batch_per_call"],
                 "text_tokens": spec["text_tokens"], "vae_checkpointing": vae_supports_checkpointing(model),
                 "params": parameter_counts(model), "sizes": {}}
        for size in sizes:
            t1 = time.perf_counter()
            entry["sizes"][str(size)] = measure_size(model, size, check_full_depth)
            entry["sizes"][str(size)]["seconds"] = round(time.perf_counter() - t1, 1)
            print(f"{model} {size} px: {entry['sizes'][str(size)]['seconds']} s", file=sys.stderr, flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        result["models"][model] = entry
        result["rows"].extend(rows_for(model, entry))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def rows_for(model: str, entry: dict) -> list[dict]:
    params = entry["params"]
    weights = {"transformer": params["transformer"] * BYTES_BF16,
               "text_encoders": sum(params["text_encoders"].values()) * BYTES_BF16,
               "vae": params["vae"] * BYTES_BF16}
    lora = params["lora"] * BYTES_LORA
    rows = []
    for size, sized in entry["sizes"].items():
        full = sized["full_depth"]
        for k in ("1", "all"):
            stored = sized["stored_inputs"]["k1" if k == "1" else "k_all"]
            for block_ckpt in (False, True):
                call = full["peak_block_ckpt" if block_ckpt else "peak"]
                # a VAE without gradient checkpointing (Qwen-Image's) decodes without it in the "on" rows too
                vae_ckpt = block_ckpt and sized["vae_block_ckpt"] is not None
                vae = sized["vae_block_ckpt" if vae_ckpt else "vae"]["peak"]
                # the VAE's backward runs first and ends before the first transformer call is recomputed: the two
                # peaks do not add up, the larger one counts
                total = sum(weights.values()) + lora + stored + max(call, vae)
                rows.append({"model": model, "size": int(size), "K": k, "block_checkpointing": block_ckpt,
                             "vae_checkpointing": vae_ckpt,
                             "weights_transformer": weights["transformer"],
                             "weights_text_encoders": weights["text_encoders"], "weights_vae": weights["vae"],
                             "lora_grads_adam": lora, "stored_call_inputs": stored, "one_call_peak": call,
                             "vae_decode_peak": vae, "total": total,
                             "total_text_encoders_offloaded": total - weights["text_encoders"]})
    return rows


TABLE_HEAD = ("model", "px", "K", "block ckpt", "weights", "of which text enc.", "LoRA+grads+Adam",
              "stored call inputs", "one-call peak", "VAE decode peak", "total", "total, text enc. offloaded")


def table_rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        weights = r["weights_transformer"] + r["weights_text_encoders"] + r["weights_vae"]
        steps = MODELS[r["model"]]["steps"]
        ckpt = "off" if not r["block_checkpointing"] else "on" if r["vae_checkpointing"] else "on (VAE: none)"
        cells = [MODELS[r["model"]]["title"], str(r["size"]), r["K"] if r["K"] == "1" else f"all ({steps})", ckpt]
        cells += [f"{gib(v):.2f}" for v in (weights, r["weights_text_encoders"], r["lora_grads_adam"],
                                             r["stored_call_inputs"], r["one_call_peak"], r["vae_decode_peak"],
                                             r["total"], r["total_text_encoders_offloaded"])]
        out.append(cells)
    return out


def print_table(result: dict) -> None:
    """The table in GiB, as the Markdown of docs/flow-memory.md."""
    print("| " + " | ".join(TABLE_HEAD) + " |")
    print("|" + "---|" * 4 + "---:|" * (len(TABLE_HEAD) - 4))
    for cells in table_rows(result):
        print("| " + " | ".join(cells) + " |")


def parse_models(parser, text: str) -> list[str]:
    """``--models a,b``: names of MODELS, else the parser's one-line error (exit 2)."""
    models = text.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown[0]!r}; choose from {', '.join(MODELS)}")
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-full-depth", action="store_true",
                        help="also run the full-depth transformers and compare with the scaled figures (minutes)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="image sides in px (512, 1024)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    models = parse_models(parser, args.models)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if any(s not in SIZES for s in sizes):
        parser.error(f"--sizes: choose from {', '.join(map(str, SIZES))}")
    command = "".join(f" {flag}" for flag in (argv if argv is not None else sys.argv[1:]))
    result = run(args.check_full_depth, models, sizes, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
