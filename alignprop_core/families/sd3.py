"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT transformer on two CLIP encoders and T5, true
classifier-free guidance (the negative and positive halves in one batched transformer call), flow-matching sigmas
with the model's shift (dynamic shift when its scheduler config asks for it), a 16-channel VAE with a shift factor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from alignprop_core.families.base import Evaluate, PromptEmbeddings
from alignprop_core.families.flow import JOINT_ATTENTION_TARGETS, FlowMatchFamily

if TYPE_CHECKING:
    import torch

TINY_SD3_MODEL_ID = "alignprop:tiny-sd3"


@dataclass
class SD3PromptEmbeddings(PromptEmbeddings):
    """SD3's conditioning: the joint CLIP+T5 sequence (``positive``/``negative``) and the pooled CLIP projections."""

    pooled: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None


class StableDiffusion3Family(FlowMatchFamily):
    """SD3 medium, SD3.5 medium / large / large turbo."""

    name = "sd3"
    label = "SD3"
    description = "SD3, SD3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    lora_components = ("transformer", "text_encoder", "text_encoder_2")
    lora_target_modules = JOINT_ATTENTION_TARGETS
    tiny_id = TINY_SD3_MODEL_ID
    default_max_shift = 1.16  # StableDiffusion3Pipeline's
    models = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")

    def recognises_lora_modules(self, modules: dict[str, list[str]]) -> bool:
        """SD3's transformer has only joint ``transformer_blocks`` (FLUX's also has ``single_transformer_blocks``)."""
        names = modules.get("transformer", [])
        return (any(name.startswith("transformer_blocks.") for name in names)
                and not any(name.startswith("single_transformer_blocks.") for name in names))

    def default_size(self, pipe: Any) -> int:
        return int(pipe.transformer.config.sample_size * pipe.vae_scale_factor)

    def size_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor * pipe.transformer.config.patch_size)

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> SD3PromptEmbeddings:
        import torch

        use_cfg = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts) if (use_cfg and negative_prompt) else None
        with torch.no_grad():
            positive, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=use_cfg, negative_prompt=negative)
        return SD3PromptEmbeddings(positive, negative_embeds if use_cfg else None, pooled,
                                   negative_pooled if use_cfg else None)

    def set_timesteps(self, pipe: Any, num_steps: int, device: Any, height: int, width: int) -> Any:
        scheduler = pipe.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            tokens = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
            kwargs["mu"] = self.resolution_shift(pipe, tokens)
        scheduler.set_timesteps(num_steps, device=device, **kwargs)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def initial_latents(self, pipe: Any, batch: int, height: int, width: int, dtype: Any, device: Any,
                        generator: Any) -> Any:
        return pipe.prepare_latents(batch, pipe.transformer.config.in_channels, height, width, dtype, device,
                                    generator)

    def denoiser_kwargs(self, pipe: Any, embeddings: SD3PromptEmbeddings, height: int, width: int) -> dict[str, Any]:
        import torch

        if not embeddings.guided:
            return {"encoder_hidden_states": embeddings.positive, "pooled_projections": embeddings.pooled}
        return {"encoder_hidden_states": torch.cat([embeddings.negative, embeddings.positive]),
                "pooled_projections": torch.cat([embeddings.negative_pooled, embeddings.pooled])}

    def guided_prediction(self, evaluate: Evaluate, scheduler: Any, latents: Any, t: Any, kwargs: dict[str, Any],
                          guidance_scale: float, guided: bool) -> Any:
        import torch

        model_input = torch.cat([latents] * 2) if guided else latents
        velocity = evaluate(model_input, t.expand(model_input.shape[0]), kwargs)
        if guided:
            uncond, text = velocity.chunk(2)
            velocity = uncond + guidance_scale * (text - uncond)
        return velocity

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build a tiny SD3 pipeline with random weights (seeded) and save it to ``path``; returns ``path``.

        A one-block ``SD3Transformer2DModel`` (patch 1, 4 latent channels), two ``CLIPTextModelWithProjection``
        (hidden 32, so the pooled projection is 2 x 32 = 64), a small ``T5EncoderModel`` with a byte-level T5
        tokenizer built offline, SD3's ``FlowMatchEulerDiscreteScheduler`` (shift 3) and a factor-8 VAE with SD3's
        scaling and shift factors. Images are ``8 * sample_size`` pixels square by default.
        """
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        from alignprop_core.families.tiny_parts import (
            tiny_clip_tokenizer,
            tiny_t5_config,
            tiny_t5_tokenizer,
            tiny_text_config,
            tiny_vae,
        )

        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        text_config = tiny_text_config(tokenizer)
        text_encoder = CLIPTextModelWithProjection(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizer_3, d_model=64))  # >= the 2 x 32 CLIP width
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
            pooled_projection_dim=2 * text_config.projection_dim, out_channels=4, pos_embed_max_size=2 * sample_size)
        vae = tiny_vae(sample_size, scaling_factor=1.5305, shift_factor=0.0609)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer,
                                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        pipe.save_pretrained(path, safe_serialization=True)
        return Path(path)


SD3 = StableDiffusion3Family()
