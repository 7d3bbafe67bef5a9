"""Differentiable sampling: prompts -> embeddings -> denoising chain with truncated backprop -> images in [0, 1].

One path for SD 1.x/2.x and SDXL, built from the pipeline's own pieces (``encode_prompt``, ``_get_add_time_ids``,
``prepare_latents``, ``prepare_extra_step_kwargs``, ``scheduler.scale_model_input``/``step``), so that any
scheduler with a differentiable ``step`` (DDIM with its eta, DPM-Solver++, Euler, Euler-ancestral, UniPC, ...)
runs exactly as in diffusers. Truncation follows the AlignProp paper: K is drawn once per batch, the first
``N - K`` UNet evaluations run without building a graph, and the last K and the VAE decode keep it, so the
reward's gradient reaches the LoRA weights through exactly the last K UNet calls. DRaFT-LV is the K = 1 variant
with several re-noised copies of the last step.
"""

from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from alignprop_core.config import AlignPropConfig


@dataclass
class PromptEmbeddings:
    """Text conditioning for one batch; the ``negative*`` fields are None when guidance is off.

    SDXL adds ``pooled`` (``text_encoder_2``'s projected pooled output) and the micro-conditioning ``time_ids``
    (``[B, 6]``: original size, crop top-left, target size). With ``time_ids`` None the sampler uses
    ``(H, W, 0, 0, H, W)`` of the images it samples, as ``StableDiffusionXLPipeline`` does by default.
    """

    positive: torch.Tensor
    negative: Optional[torch.Tensor]
    pooled: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def repeat(self, n: int) -> "PromptEmbeddings":
        """The batch repeated ``n`` times (draw-major: the whole batch, then the whole batch again, ...)."""
        def rep(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else torch.cat([x] * n)

        return PromptEmbeddings(*(rep(getattr(self, f.name)) for f in fields(self)))

    def added_cond_kwargs(self, pipe, height: int, width: int) -> Optional[dict[str, torch.Tensor]]:
        """SDXL's ``added_cond_kwargs`` for one CFG-batched UNet call (negative half first); None for SD 1.x/2.x."""
        if self.pooled is None:
            return None
        time_ids = self.time_ids
        if time_ids is None:
            encoder_2 = getattr(pipe, "text_encoder_2", None)
            projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else self.pooled.shape[-1]
            time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=self.positive.dtype,
                                              text_encoder_projection_dim=int(projection_dim))
            time_ids = time_ids.repeat(self.positive.shape[0], 1)
        time_ids = time_ids.to(self.positive.device)
        if self.negative is None:
            return {"text_embeds": self.pooled, "time_ids": time_ids}
        return {"text_embeds": torch.cat([self.negative_pooled, self.pooled]), "time_ids": torch.cat([time_ids] * 2)}

    def unet_kwargs(self, pipe, height: int, width: int) -> dict[str, Any]:
        """Keyword arguments of one CFG-batched UNet call: ``encoder_hidden_states`` (+ ``added_cond_kwargs``)."""
        context = self.positive if self.negative is None else torch.cat([self.negative, self.positive])
        kwargs: dict[str, Any] = {"encoder_hidden_states": context}
        added = self.added_cond_kwargs(pipe, height, width)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return kwargs


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
    """Frozen text encoding through the pipeline's own ``encode_prompt`` (SD 1.x/2.x: one text encoder; SDXL:
    both, plus the pooled embedding; with no negative prompt SDXL's zeroed negative conditioning, as in its
    pipeline)."""
    use_cfg = guidance_scale > 1.0
    negative = [negative_prompt] * len(prompts) if (use_cfg and negative_prompt) else None
    out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                             do_classifier_free_guidance=use_cfg, negative_prompt=negative)
    if len(out) == 4:  # SDXL: embeds, negative embeds, pooled, negative pooled
        positive, negative_embeds, pooled, negative_pooled = out
        return PromptEmbeddings(positive, negative_embeds if use_cfg else None, pooled,
                                negative_pooled if use_cfg else None)
    positive, negative_embeds = out
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
    generator: Optional[torch.Generator | list[torch.Generator]] = None,
    gradient_checkpointing: bool = True,
    unet: Optional[torch.nn.Module] = None,
    draft_lv_n: int = 0,
) -> torch.Tensor:
    """Run the denoising chain with ``pipe.scheduler`` and decode; returns float images ``[B, 3, height, width]``
    in ``[0, 1]`` (``[draft_lv_n * B, ...]`` with DRaFT-LV under grad: draw-major, each draw the whole batch).

    ``grad_steps`` (K) is how many final UNet evaluations build an autograd graph (0 = none: plain sampling);
    the chain has ``len(scheduler.timesteps)`` of them (= ``num_steps`` for every scheduler in
    :data:`alignprop_core.models.SCHEDULERS`). ``draft_lv_n`` > 0 (DRaFT-LV, only when grad is enabled) runs the
    whole chain without a graph, then re-noises its detached result ``draft_lv_n`` times to the last step's noise
    level and repeats that last step on each with gradients (see :func:`_draft_lv_last_step`). ``unet`` defaults to
    ``pipe.unet``; pass the accelerate-prepared (DDP-wrapped) UNet when training so that gradients are
    synchronised across processes. With ``gradient_checkpointing`` each UNet call under grad stores only its
    inputs and is recomputed during backward.
    """
    unet = unet if unet is not None else pipe.unet
    scheduler = pipe.scheduler
    device = embeddings.positive.device
    grad = torch.is_grad_enabled()
    lv = draft_lv_n > 0 and grad
    unet_kwargs = embeddings.unet_kwargs(pipe, height, width)

    # set_timesteps resets every scheduler's per-chain state (multistep history, _step_index); the begin index
    # is set as StableDiffusionXLPipeline does, so add_noise (DRaFT-LV) finds the current step.
    scheduler.set_timesteps(num_steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps
    latents = pipe.prepare_latents(embeddings.positive.shape[0], pipe.unet.config.in_channels, height, width,
                                   embeddings.positive.dtype, device, generator)  # x init_noise_sigma
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
    chain = len(timesteps)
    first_grad_step = chain if lv else chain - min(max(grad_steps, 0), chain)
    before_last = None

    for i, t in enumerate(timesteps):
        if lv and i == chain - 1:
            before_last = copy.deepcopy(scheduler)  # the state the last step starts from, for the LV draws
        with torch.set_grad_enabled(grad and i >= first_grad_step):
            noise_pred = _guided_noise(unet, scheduler, latents, t, unet_kwargs, guidance_scale,
                                       embeddings.negative is not None, gradient_checkpointing)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

    if lv:
        latents = _draft_lv_last_step(pipe, unet, before_last, latents, timesteps[-1], embeddings, draft_lv_n,
                                      height, width, guidance_scale, extra_step_kwargs, generator,
                                      gradient_checkpointing)
    with torch.set_grad_enabled(grad and (grad_steps > 0 or lv)):
        return decode_latents(pipe, latents, sdxl=embeddings.pooled is not None)


def _call_unet(unet: torch.nn.Module, sample: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    return unet(sample, t, **kwargs, return_dict=False)[0]


def _guided_noise(unet, scheduler, latents: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any],
                  guidance_scale: float, use_cfg: bool, gradient_checkpointing: bool) -> torch.Tensor:
    """One UNet evaluation (CFG-batched) with the scheduler's input scaling; returns the guided prediction."""
    model_input = torch.cat([latents] * 2) if use_cfg else latents
    model_input = scheduler.scale_model_input(model_input, t)
    if torch.is_grad_enabled() and gradient_checkpointing:
        # Reentrant checkpointing runs the forward without building the UNet's inner autograd graph: one node per
        # call. The non-reentrant variant keeps every inner node alive until backward; on CPU those small
        # long-lived allocations fragment the heap, and peak RSS grew with K (K=50 vs K=1 at 32x32 latents:
        # 2.5x; reentrant: 1.05x; bench/memory_vs_k.py). It needs an input that requires grad to record the call.
        if not model_input.requires_grad:
            model_input = model_input.detach().requires_grad_()
        noise_pred = checkpoint(_call_unet, unet, model_input, t, unet_kwargs, use_reentrant=True)
    else:
        noise_pred = _call_unet(unet, model_input, t, unet_kwargs)
    if use_cfg:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    return noise_pred


def draw_lv_noise(like: torch.Tensor, n: int,
                  generator: Optional[torch.Generator | list[torch.Generator]]) -> list[torch.Tensor]:
    """The ``n`` fresh noise tensors of the DRaFT-LV draws (shape of ``like``), from the sampler's generator(s)."""
    from diffusers.utils.torch_utils import randn_tensor

    return [randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype) for _ in range(n)]


def _draft_lv_last_step(pipe, unet, before_last, x0: torch.Tensor, t: torch.Tensor, embeddings: PromptEmbeddings,
                        n: int, height: int, width: int, guidance_scale: float, extra_step_kwargs: dict[str, Any],
                        generator, gradient_checkpointing: bool) -> torch.Tensor:
    """DRaFT-LV (Clark et al. 2023): ``x_i = add_noise(stopgrad(x0), eps_i, t_last)`` for ``n`` fresh ``eps_i``,
    then the scheduler's last step from each ``x_i`` with gradients. All draws share one UNet call; each runs the
    scheduler's step on its own copy of the pre-last-step state, so draws never see each other's history."""
    x0 = x0.detach()
    t_batch = t.repeat(x0.shape[0])
    noisy = [before_last.add_noise(x0, noise, t_batch) for noise in draw_lv_noise(x0, n, generator)]
    unet_kwargs = embeddings.repeat(n).unet_kwargs(pipe, height, width)
    noise_pred = _guided_noise(unet, copy.deepcopy(before_last), torch.cat(noisy), t, unet_kwargs, guidance_scale,
                               embeddings.negative is not None, gradient_checkpointing)
    outputs = []
    for sample, prediction in zip(noisy, noise_pred.chunk(n)):
        step = copy.deepcopy(before_last)
        if getattr(step, "last_sample", None) is not None:
            step.last_sample = None  # UniPC: no corrector; a re-noised sample is not its predictor's output
        outputs.append(step.step(prediction, t, sample, **extra_step_kwargs, return_dict=False)[0])
    return torch.cat(outputs)


def decode_latents(pipe, latents: torch.Tensor, sdxl: bool = False) -> torch.Tensor:
    """VAE decode to float images in ``[0, 1]``. For SDXL a ``force_upcast`` VAE decodes in fp32 when it or the
    autocast context is fp16, as ``StableDiffusionXLPipeline`` does (the trainer keeps that VAE in fp32)."""
    vae = pipe.vae
    device_type = latents.device.type
    autocast_fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    upcast = sdxl and getattr(vae.config, "force_upcast", False) and (vae.dtype == torch.float16 or autocast_fp16)
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
