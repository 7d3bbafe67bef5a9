"""Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): a UNet on CLIP text embeddings, a KL VAE.

Built from the pipeline's own pieces (``encode_prompt``, ``prepare_latents``, ``prepare_extra_step_kwargs``,
``scheduler.scale_model_input``/``step``), so that every scheduler with a differentiable ``step`` runs exactly as in
diffusers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Optional

from alignprop_core.families.base import ATTENTION_TARGETS, Evaluate, Family, PromptEmbeddings

TINY_MODEL_ID = "alignprop:tiny-sd"


class StableDiffusionFamily(Family):
    """SD 1.x/2.x; SDXL (:mod:`alignprop_core.families.sdxl`) subclasses it."""

    name = "sd"
    label = "SD-1.x"
    description = "SD 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)  # SD 2.x checkpoints are StableDiffusionPipeline too
    pipeline_call_settings = ("negative_prompt", "eta")
    lora_components = ("unet", "text_encoder")
    lora_target_modules = ATTENTION_TARGETS
    tiny_id = TINY_MODEL_ID
    models = ("vae", "text_encoder", "unet")

    # ------------------------------------------------------------------ loading

    def load_kwargs(self) -> dict[str, Any]:
        # the safety checker runs only in pipe.__call__, never in the sampler: not loading it saves its weights
        return {"safety_checker": None, "requires_safety_checker": False}

    def default_size(self, pipe: Any) -> int:
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    # ------------------------------------------------------------------ sampling

    def _encode(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                device: Any) -> tuple[bool, tuple]:
        """``(guided, pipe.encode_prompt(...))`` without a graph."""
        import torch

        use_cfg = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts) if (use_cfg and negative_prompt) else None
        with torch.no_grad():
            out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=use_cfg, negative_prompt=negative)
        return use_cfg, out

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> PromptEmbeddings:
        use_cfg, (positive, negative_embeds) = self._encode(pipe, prompts, negative_prompt, guidance_scale, device)
        return PromptEmbeddings(positive, negative_embeds if use_cfg else None)

    def set_timesteps(self, pipe: Any, num_steps: int, device: Any, height: int, width: int) -> Any:
        # set_timesteps resets every scheduler's per-chain state (multistep history, _step_index); the begin index
        # is set as StableDiffusionXLPipeline does, so add_noise (DRaFT-LV) finds the current step.
        scheduler = pipe.scheduler
        scheduler.set_timesteps(num_steps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler.timesteps

    def initial_latents(self, pipe: Any, batch: int, height: int, width: int, dtype: Any, device: Any,
                        generator: Any) -> Any:
        return pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, dtype, device,
                                    generator)  # x init_noise_sigma

    def step_kwargs(self, pipe: Any, generator: Any, eta: float) -> dict[str, Any]:
        return pipe.prepare_extra_step_kwargs(generator, eta)

    def denoiser_kwargs(self, pipe: Any, embeddings: PromptEmbeddings, height: int, width: int) -> dict[str, Any]:
        import torch

        context = embeddings.positive if not embeddings.guided else torch.cat([embeddings.negative,
                                                                               embeddings.positive])
        return {"encoder_hidden_states": context}

    def call_denoiser(self, denoiser: Any, sample: Any, t: Any, kwargs: dict[str, Any]) -> Any:
        return denoiser(sample, t, **kwargs, return_dict=False)[0]

    def guided_prediction(self, evaluate: Evaluate, scheduler: Any, latents: Any, t: Any, kwargs: dict[str, Any],
                          guidance_scale: float, guided: bool) -> Any:
        import torch

        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = evaluate(model_input, t, kwargs)
        if guided:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        return noise_pred

    def decode(self, pipe: Any, latents: Any) -> Any:
        return decode_vae(pipe, latents, honour_force_upcast=False)

    # ------------------------------------------------------------------ tiny pipeline

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build the tiny SD-1.x pipeline with random weights (seeded) and save it to ``path``; returns ``path``.

        ``sample_size`` is the latent size: images are ``8 * sample_size`` pixels square by default.
        """
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        from alignprop_core.families.tiny_parts import tiny_clip_tokenizer, tiny_text_config, tiny_vae

        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8)
        vae = tiny_vae(sample_size)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(path, safe_serialization=True)
        return Path(path)


def decode_vae(pipe: Any, latents: Any, honour_force_upcast: bool) -> Any:
    """VAE decode to float images in ``[0, 1]``. With ``honour_force_upcast`` a ``force_upcast`` VAE decodes in
    fp32 when it or the autocast context is fp16, as ``StableDiffusionXLPipeline`` does; otherwise the VAE's dtype
    and autocast decide, as in ``StableDiffusionPipeline``."""
    import torch

    vae = pipe.vae
    device_type = latents.device.type
    autocast_fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    upcast = (honour_force_upcast and getattr(vae.config, "force_upcast", False)
              and (vae.dtype == torch.float16 or autocast_fp16))
    restore = None
    if upcast and vae.dtype != torch.float32:
        # Without grad the VAE goes back to its dtype afterwards (as the pipeline does); under grad the graph
        # holds the fp32 weights, so they stay.
        restore = None if torch.is_grad_enabled() else vae.dtype
        vae.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
        scaled = latents.to(vae.dtype)
    else:
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    with torch.autocast(device_type, enabled=False) if upcast else contextlib.nullcontext():
        decoded = vae.decode(scaled, return_dict=False)[0]
    if restore is not None:
        vae.to(restore)
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


SD = StableDiffusionFamily()
