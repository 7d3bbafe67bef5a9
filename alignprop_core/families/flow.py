"""What the flow-matching transformer families (SD3, FLUX) share: a transformer that predicts the velocity, the
flow samplers of :mod:`alignprop_core.flow_schedulers` on the model's own sigmas, a VAE with a shift factor, and
LoRA files in peft key format (what ``SD3LoraLoaderMixin`` / ``FluxLoraLoaderMixin`` write and read).

Each family sets its sigmas (``set_timesteps``) as its pipeline's ``__call__`` does, so that sampling without grad
equals the pipeline's own output.
"""

from __future__ import annotations

from typing import Any

from alignprop_core.families.base import ATTENTION_TARGETS, Family

#: the joint (MMDiT) blocks' projections of both streams: image (``to_*``) and text (``add_*``, ``to_add_out``)
JOINT_ATTENTION_TARGETS = ATTENTION_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowMatchFamily(Family):
    """Base of the flow-matching transformer families."""

    denoiser_name = "transformer"
    denoiser_label = "transformer"
    default_scheduler = "flow_euler"
    scheduler_kind = "flow"
    default_mixed_precision = "bf16"  # fp16 overflows in T5 and in these transformers' activations
    upcast_vae_in_fp16 = True  # only with an explicit fp16: 16-channel VAEs overflow there
    tags_lora_files = True  # every flow family adapts a "transformer"

    #: ``max_shift`` when the scheduler config has none, as the family's pipeline defaults it (SD3's is 1.16)
    default_max_shift: float = 1.15

    def size_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor * 2)  # latents are packed (or patchified) in 2x2 patches

    def default_size(self, pipe: Any) -> int:
        """The VAE's ``sample_size`` (1024 for the published models), else the pipeline's default (128 x 8)."""
        return int(getattr(pipe.vae.config, "sample_size", None)
                   or getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor)

    def token_grid(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of image tokens (2x2 latent patches) for an image of ``height`` x ``width`` pixels."""
        factor = pipe.vae_scale_factor * 2
        return height // factor, width // factor

    def resolution_shift(self, pipe: Any, image_tokens: int) -> float:
        """The pipelines' ``calculate_shift``: ``mu`` for dynamic shifting, from the scheduler config."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # the same copy in every flow pipeline

        config = pipe.scheduler.config
        return calculate_shift(image_tokens, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", self.default_max_shift))

    def start_chain(self, pipe: Any, num_steps: int, device: Any, sigmas: Any, mu: Any) -> Any:
        """``retrieve_timesteps`` with the pipeline's sigmas and ``mu``, begin index 0; returns the timesteps."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_steps, device, sigmas=sigmas, mu=mu)
        pipe.scheduler.set_begin_index(0)
        return timesteps

    def step_kwargs(self, pipe: Any, generator: Any, eta: float) -> dict[str, Any]:
        return {"generator": generator, "eta": eta}

    def call_denoiser(self, denoiser: Any, sample: Any, t: Any, kwargs: dict[str, Any]) -> Any:
        return denoiser(hidden_states=sample, timestep=t, **kwargs, return_dict=False)[0]

    def decode(self, pipe: Any, latents: Any) -> Any:
        """``latents / scaling_factor + shift_factor``, VAE decode in the VAE's dtype, as both pipelines do (fp32
        for a ``force_upcast`` VAE under fp16, see :meth:`model_dtype`)."""
        import contextlib

        import torch

        vae = pipe.vae
        scaled = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        device_type = latents.device.type
        fp32_vae_under_fp16 = (vae.dtype == torch.float32 and torch.is_autocast_enabled(device_type)
                               and torch.get_autocast_dtype(device_type) == torch.float16)
        with torch.autocast(device_type, enabled=False) if fp32_vae_under_fp16 else contextlib.nullcontext():
            decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        return to_unit_range(decoded)

    # ------------------------------------------------------------------ LoRA files (peft key names)

    def lora_layers(self, denoiser: Any) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    def peft_keys(self, state: dict[str, Any]) -> dict[str, Any]:
        return state  # the transformer loaders' files are in peft format already


def to_unit_range(decoded: Any) -> Any:
    """A VAE's ``[-1, 1]`` output as float images in ``[0, 1]`` (fp32, or fp64 for a float64 gradient check)."""
    import torch

    return (decoded.to(torch.promote_types(decoded.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)


def flow_sigmas(num_steps: int) -> Any:
    """``linspace(1, 1/N, N)``: the sigmas FLUX's pipeline passes to its scheduler (shifted there)."""
    import numpy as np

    return np.linspace(1.0, 1 / num_steps, num_steps)
