"""Differentiable sampling: prompts -> embeddings -> denoising chain with truncated backprop -> images in [0, 1].

The chain uses the pipeline's own pieces (``encode_prompt``, ``prepare_latents``, ``scheduler.step`` with
``prepare_extra_step_kwargs``) so that DDIM (and eta) are exactly diffusers'. Truncation follows the AlignProp paper:
K is drawn once per batch, the first ``N - K`` steps run without building a graph, and the last K steps and the VAE
decode keep it, so the reward's gradient reaches the LoRA weights through exactly the last K UNet calls.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from alignprop_core.config import AlignPropConfig


@dataclass
class PromptEmbeddings:
    """Text conditioning for one batch; ``negative`` is None when guidance is off."""

    positive: torch.Tensor
    negative: Optional[torch.Tensor]


def draw_truncation_k(config: "AlignPropConfig", rng: random.Random) -> int:
    """Number of final denoising steps that keep gradients, drawn once per batch from ``rng``."""
    steps = config.sample_num_steps
    if config.truncation == "gaussian":
        return int(min(max(round(rng.gauss(config.truncation_mean, config.truncation_std)), 1), steps))
    low, high = config.truncation_range
    return low if low == high else rng.randint(low, high)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                   device: torch.device) -> PromptEmbeddings:
    """Frozen text encoding through the pipeline's own ``encode_prompt``."""
    use_cfg = guidance_scale > 1.0
    negative = [negative_prompt] * len(prompts) if (use_cfg and negative_prompt) else None
    positive, negative_embeds = pipe.encode_prompt(prompts, device, 1, use_cfg, negative_prompt=negative)
    return PromptEmbeddings(positive, negative_embeds if use_cfg else None)


def sample_images(
    pipe,
    embeddings: PromptEmbeddings,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    height: int,
    width: int,
    grad_steps: int,
    generator: Optional[torch.Generator] = None,
    gradient_checkpointing: bool = True,
    unet: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """Run the denoising chain and decode; returns float images ``[B, 3, height, width]`` in ``[0, 1]``.

    ``grad_steps`` (K) is how many final steps build an autograd graph (0 = none: plain sampling). ``unet``
    defaults to ``pipe.unet``; pass the accelerate-prepared (DDP-wrapped) UNet when training so that gradients
    are synchronised across processes. With ``gradient_checkpointing`` each UNet call under grad stores only its
    inputs and is recomputed during backward.
    """
    unet = unet if unet is not None else pipe.unet
    scheduler = pipe.scheduler
    device = embeddings.positive.device
    batch = embeddings.positive.shape[0]
    use_cfg = embeddings.negative is not None
    context = torch.cat([embeddings.negative, embeddings.positive]) if use_cfg else embeddings.positive

    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, context.dtype, device,
                                   generator)
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
    first_grad_step = len(timesteps) - grad_steps

    def denoise(latents_in: torch.Tensor, t: torch.Tensor, context_in: torch.Tensor) -> torch.Tensor:
        return unet(latents_in, t, encoder_hidden_states=context_in, return_dict=False)[0]

    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad_step and torch.is_grad_enabled()):
            model_input = torch.cat([latents] * 2) if use_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if torch.is_grad_enabled() and gradient_checkpointing:
                noise_pred = checkpoint(denoise, model_input, t, context, use_reentrant=False)
            else:
                noise_pred = denoise(model_input, t, context)
            if use_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

    with torch.set_grad_enabled(grad_steps > 0 and torch.is_grad_enabled()):
        vae = pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)
