"""FLUX.1 (``FluxPipeline``): a double/single-stream transformer on CLIP (pooled) and T5 (sequence) embeddings,
packed 2x2 latent patches with positional ids, flow-matching sigmas with the resolution-dependent shift ``mu``.

Guidance: FLUX.1-dev has ``transformer.config.guidance_embeds``, so ``sample_guidance_scale`` is an input of the
transformer (one pass per step, no CFG batch); FLUX.1-schnell has none. True classifier-free guidance, as
``FluxPipeline``'s ``true_cfg_scale`` with a negative prompt, runs a second (negative) pass per step, separately
as the pipeline does. The chain keeps the latents unpacked (``[B, C, h, w]``): packing happens around each
transformer call and the Euler step is elementwise, so the values are those of the pipeline's packed chain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from alignprop_core.families.base import Evaluate, PromptEmbeddings
from alignprop_core.families.flow import JOINT_ATTENTION_TARGETS, FlowMatchFamily, flow_sigmas

if TYPE_CHECKING:
    import torch

TINY_FLUX_MODEL_ID = "alignprop:tiny-flux"


@dataclass
class FluxPromptEmbeddings(PromptEmbeddings):
    """FLUX's conditioning: T5 sequences (``positive``/``negative``), CLIP pooled embeddings, the embedded guidance
    (``[B]``, None for models without ``guidance_embeds``) and the true-CFG scale (``[B]``; None: no negative pass)."""

    pooled: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None
    guidance: Optional[torch.Tensor] = None
    true_cfg_scale: Optional[torch.Tensor] = None


class FluxFamily(FlowMatchFamily):
    """FLUX.1-dev, FLUX.1-schnell and fine-tunes saved as ``FluxPipeline``."""

    name = "flux"
    label = "FLUX"
    description = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    pipeline_call_settings = ("negative_prompt", "true_cfg_scale")
    lora_components = ("transformer", "text_encoder")
    lora_target_modules = JOINT_ATTENTION_TARGETS
    tiny_id = TINY_FLUX_MODEL_ID
    models = ("vae", "text_encoder", "text_encoder_2", "transformer")

    def recognises_lora_modules(self, modules: dict[str, list[str]]) -> bool:
        """FLUX.1's transformer has single-stream blocks (SD3's has none) without FLUX.2's fused projection."""
        names = modules.get("transformer", [])
        return (any(name.startswith("single_transformer_blocks.") for name in names)
                and not any(name.endswith(".to_qkv_mlp_proj") for name in names))

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> FluxPromptEmbeddings:
        import torch

        batch = len(prompts)
        with torch.no_grad():
            positive, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                     num_images_per_prompt=1)
            negative = negative_pooled = cfg = None
            if negative_prompt is not None and true_cfg_scale > 1.0:  # "" too, as the pipeline does
                negative, negative_pooled, _ = pipe.encode_prompt(prompt=[negative_prompt] * batch, prompt_2=None,
                                                                  device=device, num_images_per_prompt=1)
                cfg = torch.full([batch], float(true_cfg_scale), device=device, dtype=torch.float32)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([batch], float(guidance_scale), device=device, dtype=torch.float32)
        return FluxPromptEmbeddings(positive, negative, pooled, negative_pooled, guidance, cfg)

    def set_timesteps(self, pipe: Any, num_steps: int, device: Any, height: int, width: int) -> Any:
        rows, cols = self.token_grid(pipe, height, width)
        sigmas = None if pipe.scheduler.config.get("use_flow_sigmas", False) else flow_sigmas(num_steps)
        return self.start_chain(pipe, num_steps, device, sigmas, self.resolution_shift(pipe, rows * cols))

    def initial_latents(self, pipe: Any, batch: int, height: int, width: int, dtype: Any, device: Any,
                        generator: Any) -> Any:
        channels = pipe.transformer.config.in_channels // 4
        packed, _ = pipe.prepare_latents(batch, channels, height, width, dtype, device, generator)
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)

    def denoiser_kwargs(self, pipe: Any, embeddings: FluxPromptEmbeddings, height: int, width: int) -> dict[str, Any]:
        import torch

        positive = embeddings.positive
        rows, cols = self.token_grid(pipe, height, width)
        image_ids = pipe._prepare_latent_image_ids(positive.shape[0], rows, cols, positive.device, positive.dtype)
        text_ids = torch.zeros(positive.shape[1], 3, device=positive.device, dtype=positive.dtype)
        shared = {"guidance": embeddings.guidance, "img_ids": image_ids, "txt_ids": text_ids}
        kwargs = {"positive": {**shared, "encoder_hidden_states": positive,
                               "pooled_projections": embeddings.pooled}}
        if embeddings.guided:
            kwargs["negative"] = {**shared, "encoder_hidden_states": embeddings.negative,
                                  "pooled_projections": embeddings.negative_pooled}
            kwargs["true_cfg_scale"] = embeddings.true_cfg_scale
        return kwargs

    def guided_prediction(self, evaluate: Evaluate, scheduler: Any, latents: Any, t: Any, kwargs: dict[str, Any],
                          guidance_scale: float, guided: bool) -> Any:
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        timestep = t.expand(batch).to(latents.dtype) / 1000
        velocity = evaluate(packed, timestep, kwargs["positive"])
        if guided:
            negative = evaluate(packed, timestep, kwargs["negative"])
            velocity = negative + kwargs["true_cfg_scale"].view(-1, 1, 1).to(velocity) * (velocity - negative)
        return _unpack(velocity, batch, channels, height, width)

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build a tiny FLUX.1-dev-like pipeline with random weights (seeded) and save it to ``path``.

        A ``FluxTransformer2DModel`` with one double and one single block and ``guidance_embeds`` (16 input
        channels = 4 latent channels x 2 x 2 packing), a ``CLIPTextModel`` (pooled 32), a small ``T5EncoderModel``
        with a byte-level T5 tokenizer built offline, FLUX's dynamic-shift ``FlowMatchEulerDiscreteScheduler`` and a
        factor-8 VAE with FLUX's scaling and shift factors. The VAE's ``sample_size`` makes ``8 * sample_size``
        pixels the default image side.
        """
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        from alignprop_core.families.tiny_parts import (
            tiny_clip_tokenizer,
            tiny_t5_config,
            tiny_t5_tokenizer,
            tiny_text_config,
            tiny_vae,
        )

        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
        tokenizer_2 = tiny_t5_tokenizer()
        text_encoder_2 = T5EncoderModel(tiny_t5_config(tokenizer_2, d_model=32))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 4, 8))
        vae = tiny_vae(sample_size, scaling_factor=0.3611, shift_factor=0.1159)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                            tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        pipe.save_pretrained(path, safe_serialization=True)
        return Path(path)


def _unpack(packed: Any, batch: int, channels: int, height: int, width: int) -> Any:
    """Inverse of ``FluxPipeline._pack_latents`` for latents of ``[batch, channels, height, width]``."""
    unpacked = packed.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return unpacked.reshape(batch, channels, height, width)


FLUX = FluxFamily()
