"""SDXL (``StableDiffusionXLPipeline``): the SD family plus a second text encoder, whose pooled projection and the
micro-conditioning time ids reach the UNet as ``added_cond_kwargs``, and a ``force_upcast`` VAE that decodes in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from alignprop_core.families.base import PromptEmbeddings
from alignprop_core.families.sd import StableDiffusionFamily, decode_vae

if TYPE_CHECKING:
    import torch

TINY_SDXL_MODEL_ID = "alignprop:tiny-sdxl"


@dataclass
class SDXLPromptEmbeddings(PromptEmbeddings):
    """SDXL's conditioning: ``pooled`` (``text_encoder_2``'s projected pooled output) and the micro-conditioning
    ``time_ids`` (``[B, 6]``: original size, crop top-left, target size). With ``time_ids`` None the sampler uses
    ``(H, W, 0, 0, H, W)`` of the images it samples, as ``StableDiffusionXLPipeline`` does by default."""

    pooled: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL base (and fine-tunes saved as ``StableDiffusionXLPipeline``)."""

    name = "sdxl"
    label = "SDXL"
    description = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    lora_components = ("unet", "text_encoder", "text_encoder_2")
    tiny_id = TINY_SDXL_MODEL_ID
    models = ("vae", "text_encoder", "text_encoder_2", "unet")
    upcast_vae_in_fp16 = True  # as StableDiffusionXLPipeline decodes

    def load_kwargs(self) -> dict[str, Any]:
        # the watermark is applied only in pipe.__call__ (never in the sampler), and needs invisible-watermark
        return {"add_watermarker": False}

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> SDXLPromptEmbeddings:
        """Both text encoders and the pooled embedding; with no negative prompt SDXL's zeroed negative conditioning,
        as in its pipeline."""
        use_cfg, out = self._encode(pipe, prompts, negative_prompt, guidance_scale, device)
        positive, negative_embeds, pooled, negative_pooled = out
        return SDXLPromptEmbeddings(positive, negative_embeds if use_cfg else None, pooled,
                                    negative_pooled if use_cfg else None)

    def denoiser_kwargs(self, pipe: Any, embeddings: PromptEmbeddings, height: int, width: int) -> dict[str, Any]:
        kwargs = super().denoiser_kwargs(pipe, embeddings, height, width)
        kwargs["added_cond_kwargs"] = self.added_cond_kwargs(pipe, embeddings, height, width)
        return kwargs

    def added_cond_kwargs(self, pipe: Any, embeddings: SDXLPromptEmbeddings, height: int,
                          width: int) -> dict[str, torch.Tensor]:
        """``added_cond_kwargs`` of one guidance-batched UNet call (negative half first)."""
        import torch

        time_ids = embeddings.time_ids
        if time_ids is None:
            encoder_2 = getattr(pipe, "text_encoder_2", None)
            projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else embeddings.pooled.shape[-1]
            time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width),
                                              dtype=embeddings.positive.dtype,
                                              text_encoder_projection_dim=int(projection_dim))
            time_ids = time_ids.repeat(embeddings.positive.shape[0], 1)
        time_ids = time_ids.to(embeddings.positive.device)
        if not embeddings.guided:
            return {"text_embeds": embeddings.pooled, "time_ids": time_ids}
        return {"text_embeds": torch.cat([embeddings.negative_pooled, embeddings.pooled]),
                "time_ids": torch.cat([time_ids] * 2)}

    def decode(self, pipe: Any, latents: Any) -> Any:
        return decode_vae(pipe, latents, honour_force_upcast=True)

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build a tiny SDXL pipeline with random weights (seeded) and save it to ``path``; returns ``path``.

        Two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, hidden size 32 each, so the UNet's
        cross-attention width is 64) share the character-level tokenizer; the UNet has ``addition_embed_type=
        "text_time"`` with ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + projection_dim``
        (6 micro-conditioning ids + the pooled text embedding); the VAE has SDXL's scaling factor and
        ``force_upcast``. Images are ``8 * sample_size`` pixels square by default.
        """
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from alignprop_core.families.tiny_parts import tiny_clip_tokenizer, tiny_text_config, tiny_vae

        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        text_config = tiny_text_config(tokenizer)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        time_embed_dim = 8
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
            norm_num_groups=8)
        vae = tiny_vae(sample_size, scaling_factor=0.13025, force_upcast=True)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                                           use_karras_sigmas=False)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.save_pretrained(path, safe_serialization=True)
        return Path(path)


SDXL = StableDiffusionXLFamily()
