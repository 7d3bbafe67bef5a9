"""Z-Image (``ZImagePipeline``): a single-stream DiT on the second-to-last hidden states of a Qwen3 LLM (one
caption sequence per prompt, its padding dropped), flow-matching sigmas ``linspace(1, 1/N, N)`` with the
resolution shift ``mu``, and classifier-free guidance as the pipeline does it: on when ``guidance_scale > 0``,
``pos + g * (pos - neg)`` (Z-Image-Turbo runs with ``guidance_scale = 0``).

The transformer takes lists (one ``[C, 1, H, W]`` latent and one caption per image), is conditioned on
``(1000 - t) / 1000`` and predicts the negated velocity; the chain keeps fp32 latents, as the pipeline does, and
casts them to the transformer's dtype for each call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from alignprop_core.families.base import ATTENTION_TARGETS, Evaluate, PromptEmbeddings
from alignprop_core.families.flow import FlowMatchFamily, flow_sigmas

if TYPE_CHECKING:
    import torch

TINY_Z_IMAGE_MODEL_ID = "alignprop:tiny-z-image"


@dataclass
class ZImagePromptEmbeddings(PromptEmbeddings):
    """Caption features padded to the longest prompt (``positive``/``negative`` ``[B, L, D]``) and their lengths
    (``[B]``): the transformer gets each caption without its padding, as the pipeline passes them."""

    lengths: Optional[torch.Tensor] = None
    negative_lengths: Optional[torch.Tensor] = None


class ZImageFamily(FlowMatchFamily):
    """Z-Image and Z-Image-Turbo."""

    name = "z-image"
    label = "Z-Image"
    description = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    lora_components = ("transformer",)
    lora_target_modules = ATTENTION_TARGETS
    tiny_id = TINY_Z_IMAGE_MODEL_ID
    models = ("vae", "text_encoder", "transformer")

    def recognises_lora_modules(self, modules: dict[str, list[str]]) -> bool:
        """Z-Image's transformer has ``layers``, ``noise_refiner`` and ``context_refiner`` blocks."""
        return any(name.startswith(("layers.", "noise_refiner.", "context_refiner."))
                   for name in modules.get("transformer", []))

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> ZImagePromptEmbeddings:
        import torch

        use_cfg = guidance_scale > 0
        with torch.no_grad():
            positive, negative = pipe.encode_prompt(
                prompt=list(prompts), device=device, do_classifier_free_guidance=use_cfg,
                negative_prompt=[negative_prompt or ""] * len(prompts) if use_cfg else None)
        padded, lengths = _pad(positive)
        if not use_cfg:
            return ZImagePromptEmbeddings(padded, None, lengths, None)
        negative_padded, negative_lengths = _pad(negative)
        return ZImagePromptEmbeddings(padded, negative_padded, lengths, negative_lengths)

    def join_embeddings(self, rows: list[ZImagePromptEmbeddings]) -> ZImagePromptEmbeddings:
        """Each caption without its padding, padded again to the batch's longest (as ``encode_prompts`` pads)."""

        def join(field: str, lengths: str) -> tuple[Any, Any]:
            if getattr(rows[0], field) is None:
                return None, None
            captions = [caption for row in rows for caption in _unpad(getattr(row, field), getattr(row, lengths))]
            return _pad(captions)

        positive, positive_lengths = join("positive", "lengths")
        negative, negative_lengths = join("negative", "negative_lengths")
        return ZImagePromptEmbeddings(positive, negative, positive_lengths, negative_lengths)

    def set_timesteps(self, pipe: Any, num_steps: int, device: Any, height: int, width: int) -> Any:
        rows, cols = self.token_grid(pipe, height, width)
        return self.start_chain(pipe, num_steps, device, list(flow_sigmas(num_steps)),
                                self.resolution_shift(pipe, rows * cols))

    def initial_latents(self, pipe: Any, batch: int, height: int, width: int, dtype: Any, device: Any,
                        generator: Any) -> Any:
        import torch

        # fp32 as the pipeline's chain (fp64 stays fp64 for a finite-difference check)
        return pipe.prepare_latents(batch, pipe.transformer.in_channels, height, width,
                                    torch.promote_types(dtype, torch.float32), device, generator)

    def denoiser_kwargs(self, pipe: Any, embeddings: ZImagePromptEmbeddings, height: int,
                        width: int) -> dict[str, Any]:
        captions = _unpad(embeddings.positive, embeddings.lengths)
        if embeddings.guided:  # the pipeline's order: positive captions, then negative ones
            captions += _unpad(embeddings.negative, embeddings.negative_lengths)
        return {"cap_feats": captions}

    def call_denoiser(self, denoiser: Any, sample: Any, t: Any, kwargs: dict[str, Any]) -> Any:
        import torch

        frames = list(sample.to(denoiser.dtype).unsqueeze(2).unbind(dim=0))
        outputs = denoiser(frames, t, kwargs["cap_feats"], return_dict=False)[0]
        return torch.stack([out.float() for out in outputs]).squeeze(2)

    def guided_prediction(self, evaluate: Evaluate, scheduler: Any, latents: Any, t: Any, kwargs: dict[str, Any],
                          guidance_scale: float, guided: bool) -> Any:
        import torch

        batch = latents.shape[0]
        model_input = latents.repeat(2, 1, 1, 1) if guided else latents
        timestep = (1000 - t.expand(model_input.shape[0])) / 1000
        prediction = evaluate(model_input, timestep, kwargs)
        if guided:
            positive, negative = prediction[:batch], prediction[batch:]
            prediction = positive + guidance_scale * (positive - negative)
        velocity = -prediction  # the transformer predicts x0 - noise
        return velocity.to(torch.promote_types(latents.dtype, torch.float32))

    def decode(self, pipe: Any, latents: Any) -> Any:
        """The pipeline casts to the VAE's dtype before scaling (the other flow families scale first)."""
        return super().decode(pipe, latents.to(pipe.vae.dtype))

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build a tiny Z-Image pipeline with random weights (seeded) and save it to ``path``; returns ``path``.

        A ``ZImageTransformer2DModel`` with one main, one noise-refiner and one context-refiner layer (width 32,
        patch 2, 4 latent channels), a 2-layer ``Qwen3Model`` (hidden 32) with a byte-level ChatML tokenizer built
        offline, Z-Image's ``FlowMatchEulerDiscreteScheduler`` (shift 3) and a factor-8 VAE with its scaling and
        shift factors; the VAE's ``sample_size`` makes ``8 * sample_size`` pixels the default image side.
        """
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from alignprop_core.families.tiny_parts import tiny_chat_tokenizer, tiny_vae

        torch.manual_seed(seed)
        tokenizer = tiny_chat_tokenizer()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id))
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 4, 8], axes_lens=[256, 64, 64])
        vae = tiny_vae(sample_size, scaling_factor=0.3611, shift_factor=0.1159)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
        pipe.save_pretrained(path, safe_serialization=True)
        return Path(path)


def _pad(captions: list[Any]) -> tuple[Any, Any]:
    """Variable-length caption features -> ``([B, L_max, D] zero-padded, lengths [B])``."""
    import torch

    lengths = torch.tensor([len(c) for c in captions], device=captions[0].device)
    return torch.nn.utils.rnn.pad_sequence(list(captions), batch_first=True), lengths


def _unpad(padded: Any, lengths: Any) -> list[Any]:
    return [padded[i, : int(n)] for i, n in enumerate(lengths)]


Z_IMAGE = ZImageFamily()
