"""FLUX.2 [klein] (``Flux2KleinPipeline``): the FLUX.2 transformer on three stacked hidden-state layers of a Qwen3
LLM, 2x2-patchified latents packed into tokens with 4-D position ids, a batch-normalised latent space
(``AutoencoderKLFlux2``), the pipeline's empirical shift ``mu``, and classifier-free guidance as two passes
(``neg + g * (pos - neg)``) when ``guidance_scale > 1`` and the checkpoint is not distilled.

The chain keeps the patchified latents ``[B, 4C, h/2, w/2]``: packing happens around each transformer call and the
Euler step is elementwise, so the values are those of the pipeline's packed chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from alignprop_core.families.base import Evaluate, PromptEmbeddings
from alignprop_core.families.flow import JOINT_ATTENTION_TARGETS, FlowMatchFamily, flow_sigmas, to_unit_range

TINY_FLUX2_KLEIN_MODEL_ID = "alignprop:tiny-flux2-klein"


class Flux2KleinFamily(FlowMatchFamily):
    """FLUX.2 [klein] 4B/9B, base and distilled."""

    name = "flux2-klein"
    label = "FLUX.2-klein"
    description = "FLUX.2 [klein]"
    pipeline_classes = ("Flux2KleinPipeline",)
    pipeline_call_settings = ()  # no negative_prompt: the pipeline guides against ""
    lora_components = ("transformer",)
    #: the double blocks' attention projections and the single blocks' fused qkv+MLP input (most of the model)
    lora_target_modules = JOINT_ATTENTION_TARGETS + ("to_qkv_mlp_proj",)
    tiny_id = TINY_FLUX2_KLEIN_MODEL_ID
    models = ("vae", "text_encoder", "transformer")

    def recognises_lora_modules(self, modules: dict[str, list[str]]) -> bool:
        """FLUX.2's single-stream blocks fuse q, k, v and the MLP input into ``to_qkv_mlp_proj``."""
        return any(name.endswith(".to_qkv_mlp_proj") for name in modules.get("transformer", []))

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> PromptEmbeddings:
        import torch

        use_cfg = guidance_scale > 1 and not pipe.config.is_distilled
        with torch.no_grad():
            positive, _ = pipe.encode_prompt(prompt=list(prompts), device=device)
            negative = None
            if use_cfg:  # the pipeline's negative is the empty prompt; negative_prompts replaces it
                negative, _ = pipe.encode_prompt(prompt=[negative_prompt or ""] * len(prompts), device=device)
        return PromptEmbeddings(positive, negative)

    def set_timesteps(self, pipe: Any, num_steps: int, device: Any, height: int, width: int) -> Any:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        rows, cols = self.token_grid(pipe, height, width)
        sigmas = None if pipe.scheduler.config.get("use_flow_sigmas", False) else flow_sigmas(num_steps)
        return self.start_chain(pipe, num_steps, device, sigmas,
                                compute_empirical_mu(image_seq_len=rows * cols, num_steps=num_steps))

    def initial_latents(self, pipe: Any, batch: int, height: int, width: int, dtype: Any, device: Any,
                        generator: Any) -> Any:
        packed, _ = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width, dtype,
                                         device, generator)
        return _unpack(packed, *self.token_grid(pipe, height, width))

    def denoiser_kwargs(self, pipe: Any, embeddings: PromptEmbeddings, height: int, width: int) -> dict[str, Any]:
        import torch

        positive = embeddings.positive
        grid = torch.empty(positive.shape[0], 1, *self.token_grid(pipe, height, width))
        shared = {"guidance": None, "img_ids": pipe._prepare_latent_ids(grid).to(positive.device)}
        kwargs = {"positive": {**shared, "encoder_hidden_states": positive,
                               "txt_ids": pipe._prepare_text_ids(positive).to(positive.device)}}
        if embeddings.guided:
            negative = embeddings.negative
            kwargs["negative"] = {**shared, "encoder_hidden_states": negative,
                                  "txt_ids": pipe._prepare_text_ids(negative).to(negative.device)}
        return kwargs

    def call_denoiser(self, denoiser: Any, sample: Any, t: Any, kwargs: dict[str, Any]) -> Any:
        out = denoiser(hidden_states=sample.to(denoiser.dtype), timestep=t, **kwargs, return_dict=False)[0]
        return out[:, : sample.shape[1]]  # image tokens only

    def guided_prediction(self, evaluate: Evaluate, scheduler: Any, latents: Any, t: Any, kwargs: dict[str, Any],
                          guidance_scale: float, guided: bool) -> Any:
        batch, channels, height, width = latents.shape
        packed = latents.reshape(batch, channels, height * width).permute(0, 2, 1)  # Flux2KleinPipeline's packing
        timestep = t.expand(batch).to(latents.dtype) / 1000
        velocity = evaluate(packed, timestep, kwargs["positive"])
        if guided:
            negative = evaluate(packed, timestep, kwargs["negative"])
            velocity = negative + guidance_scale * (velocity - negative)
        return _unpack(velocity, height, width)

    def decode(self, pipe: Any, latents: Any) -> Any:
        """Undo the latent batch norm, unpatchify, decode, as the pipeline does."""
        import torch

        vae = pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                            latents.dtype)
        latents = pipe._unpatchify_latents(latents * std + mean)
        return to_unit_range(vae.decode(latents.to(vae.dtype), return_dict=False)[0])

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build a tiny FLUX.2 [klein] pipeline with random weights (seeded) and save it to ``path``.

        A ``Flux2Transformer2DModel`` with one double and one single block (16 input channels = 4 latent channels x
        2 x 2), a 28-layer ``Qwen3ForCausalLM`` of width 16 (the pipeline stacks its layers 9, 18 and 27) with a
        byte-level ChatML tokenizer built offline, FLUX.2's ``FlowMatchEulerDiscreteScheduler`` and a factor-8
        ``AutoencoderKLFlux2``; the VAE's ``sample_size`` makes ``8 * sample_size`` pixels the default image side.
        """
        import torch
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2KleinPipeline,
            Flux2Transformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from alignprop_core.families.tiny_parts import tiny_chat_tokenizer

        torch.manual_seed(seed)
        tokenizer = tiny_chat_tokenizer()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id))
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            sample_size=8 * sample_size)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=False)
        pipe.save_pretrained(path, safe_serialization=True)
        return Path(path)


def _unpack(packed: Any, height: int, width: int) -> Any:
    """``[B, h*w, C]`` tokens in raster order (the pipeline's position ids) -> ``[B, C, h, w]``."""
    return packed.permute(0, 2, 1).reshape(packed.shape[0], packed.shape[2], height, width)


FLUX2_KLEIN = Flux2KleinFamily()
