"""Qwen-Image (``QwenImagePipeline``): an MMDiT on the last hidden states of Qwen2.5-VL (the pipeline's system
template, its first tokens dropped, padding masked), FLUX-style 2x2-packed latents of a video VAE
(``AutoencoderKLQwenImage``, one frame, per-channel latent mean/std), FLUX's resolution shift ``mu``.

Guidance as the pipeline does it: true CFG when ``true_cfg_scale > 1`` and a negative prompt is given, two passes
combined as ``neg + s * (pos - neg)`` and rescaled to the positive prediction's norm per token; guidance-distilled
checkpoints (``guidance_embeds``) take ``sample_guidance_scale`` as an input. The chain keeps unpacked latents
``[B, C, h, w]`` (elementwise Euler: the packed chain's values).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from alignprop_core.families.base import Evaluate, PromptEmbeddings
from alignprop_core.families.flow import JOINT_ATTENTION_TARGETS, FlowMatchFamily, flow_sigmas, to_unit_range

if TYPE_CHECKING:
    import torch

TINY_QWEN_IMAGE_MODEL_ID = "alignprop:tiny-qwen-image"


@dataclass
class QwenImagePromptEmbeddings(PromptEmbeddings):
    """Padded caption states (``positive``/``negative`` ``[B, L, D]``) with their masks (``[B, L]``), the embedded
    guidance (``[B]``, None without ``guidance_embeds``) and the true-CFG scale (``[B]``; None: no negative pass)."""

    mask: Optional[torch.Tensor] = None
    negative_mask: Optional[torch.Tensor] = None
    guidance: Optional[torch.Tensor] = None
    true_cfg_scale: Optional[torch.Tensor] = None


class QwenImageFamily(FlowMatchFamily):
    """Qwen-Image (and fine-tunes saved as ``QwenImagePipeline``)."""

    name = "qwen-image"
    label = "Qwen-Image"
    description = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    pipeline_call_settings = ("negative_prompt", "true_cfg_scale")
    lora_components = ("transformer",)
    lora_target_modules = JOINT_ATTENTION_TARGETS
    tiny_id = TINY_QWEN_IMAGE_MODEL_ID
    models = ("vae", "text_encoder", "transformer")

    def recognises_lora_modules(self, modules: dict[str, list[str]]) -> bool:
        """Qwen-Image's blocks are ``transformer_blocks.N.attn`` with ``img_mlp``/``txt_mlp`` (no single blocks)."""
        return any(".img_mlp." in name or ".txt_mlp." in name or name.endswith((".img_mod.1", ".txt_mod.1"))
                   for name in modules.get("transformer", []))

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> QwenImagePromptEmbeddings:
        import torch

        batch = len(prompts)

        def encode(texts: list[str]) -> tuple[Any, Any]:
            embeds, mask = pipe.encode_prompt(prompt=texts, device=device)
            # encode_prompt drops an all-ones mask; keep one (a tensor batches and repeats like the embeddings)
            return embeds, (torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None
                            else mask)

        with torch.no_grad():
            positive, mask = encode(list(prompts))
            negative = negative_mask = cfg = None
            if negative_prompt is not None and true_cfg_scale > 1.0:  # "" too, as the pipeline does
                negative, negative_mask = encode([negative_prompt] * batch)
                cfg = torch.full([batch], float(true_cfg_scale), device=device, dtype=torch.float32)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([batch], float(guidance_scale), device=device, dtype=torch.float32)
        return QwenImagePromptEmbeddings(positive, negative, mask, negative_mask, guidance, cfg)

    def join_embeddings(self, rows: list[QwenImagePromptEmbeddings]) -> QwenImagePromptEmbeddings:
        """Each prompt's unpadded states, zero-padded to the batch's longest with mask 0, as ``encode_prompt`` pads
        a batch."""
        import torch
        from torch.nn.utils.rnn import pad_sequence

        def join(field: str, mask_field: str) -> tuple[Any, Any]:
            if getattr(rows[0], field) is None:
                return None, None
            states, masks = [], []
            for row in rows:
                for row_states, row_mask in zip(getattr(row, field), getattr(row, mask_field)):
                    length = int(row_mask.sum())  # right-padded: the valid tokens come first
                    states.append(row_states[:length])
                    masks.append(row_mask[:length])
            return pad_sequence(states, batch_first=True), pad_sequence(masks, batch_first=True)

        positive, mask = join("positive", "mask")
        negative, negative_mask = join("negative", "negative_mask")

        def cat(field: str) -> Optional[torch.Tensor]:
            return None if getattr(rows[0], field) is None else torch.cat([getattr(row, field) for row in rows])

        return QwenImagePromptEmbeddings(positive, negative, mask, negative_mask, cat("guidance"),
                                         cat("true_cfg_scale"))

    def set_timesteps(self, pipe: Any, num_steps: int, device: Any, height: int, width: int) -> Any:
        rows, cols = self.token_grid(pipe, height, width)
        return self.start_chain(pipe, num_steps, device, flow_sigmas(num_steps),
                                self.resolution_shift(pipe, rows * cols))

    def initial_latents(self, pipe: Any, batch: int, height: int, width: int, dtype: Any, device: Any,
                        generator: Any) -> Any:
        packed = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width, dtype, device,
                                      generator)
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)[:, :, 0]

    def denoiser_kwargs(self, pipe: Any, embeddings: QwenImagePromptEmbeddings, height: int,
                        width: int) -> dict[str, Any]:
        shared = {"guidance": embeddings.guidance,
                  "img_shapes": [[(1, *self.token_grid(pipe, height, width))]] * embeddings.positive.shape[0]}

        def mask_or_none(mask: Any) -> Any:
            return None if mask.all() else mask  # as encode_prompt: no mask when nothing is padded

        kwargs = {"positive": {**shared, "encoder_hidden_states": embeddings.positive,
                               "encoder_hidden_states_mask": mask_or_none(embeddings.mask)}}
        if embeddings.guided:
            kwargs["negative"] = {**shared, "encoder_hidden_states": embeddings.negative,
                                  "encoder_hidden_states_mask": mask_or_none(embeddings.negative_mask)}
            kwargs["true_cfg_scale"] = embeddings.true_cfg_scale
        return kwargs

    def guided_prediction(self, evaluate: Evaluate, scheduler: Any, latents: Any, t: Any, kwargs: dict[str, Any],
                          guidance_scale: float, guided: bool) -> Any:
        import torch
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)  # the same packing
        timestep = t.expand(batch).to(latents.dtype) / 1000
        velocity = evaluate(packed, timestep, kwargs["positive"])
        if guided:
            negative = evaluate(packed, timestep, kwargs["negative"])
            combined = negative + kwargs["true_cfg_scale"].view(-1, 1, 1).to(velocity) * (velocity - negative)
            velocity = combined * (torch.norm(velocity, dim=-1, keepdim=True)
                                   / torch.norm(combined, dim=-1, keepdim=True))
        unpacked = velocity.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return unpacked.reshape(batch, channels, height, width)

    def decode(self, pipe: Any, latents: Any) -> Any:
        """One video frame: the per-channel latent mean/std undone, decoded, frame 0, as the pipeline does."""
        import torch

        vae = pipe.vae
        frames = latents.unsqueeze(2).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(frames)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(frames)
        return to_unit_range(vae.decode(frames / inverse_std + mean, return_dict=False)[0][:, :, 0])

    def enable_vae_tiling(self, pipe: Any, tile_size: int) -> None:
        """Qwen-Image's video VAE takes the tile size and stride as arguments (the stride: 3/4 of a tile, the KL VAEs'
        overlap)."""
        stride = tile_size * 3 // 4
        pipe.vae.enable_tiling(tile_size, tile_size, stride, stride)

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build a tiny Qwen-Image pipeline with random weights (seeded) and save it to ``path``.

        A one-block ``QwenImageTransformer2DModel`` (16 input channels = 4 latent channels x 2 x 2), a 2-layer
        ``Qwen2_5_VLForConditionalGeneration`` (text width 32, a one-block vision tower that text prompts never use)
        with a byte-level ChatML tokenizer built offline, Qwen-Image's ``FlowMatchEulerDiscreteScheduler`` and a
        factor-8 ``AutoencoderKLQwenImage``. Images default to the pipeline's 1024 px; the tests pass sizes.
        """
        import torch
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from alignprop_core.families.tiny_parts import tiny_chat_tokenizer

        torch.manual_seed(seed)
        tokenizer = tiny_chat_tokenizer()
        text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1100,
                    rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=112)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id))
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.0, 2.5])
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                    max_image_seq_len=8192, shift_terminal=0.02,
                                                    time_shift_type="exponential")
        pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 transformer=transformer)
        pipe.save_pretrained(path, safe_serialization=True)
        return Path(path)


QWEN_IMAGE = QwenImageFamily()
