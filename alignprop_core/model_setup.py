"""How the pipeline's models run: TF32 matmuls (``allow_tf32``), memory layout (``channels_last``), the attention
kernel of the transformers (``attention_backend``), diffusers' gradient checkpointing inside the models
(``block_checkpointing``, ``vae_checkpointing``) and tiled VAE decode (``vae_tile_size``).

Each setting is diffusers' or torch's own switch, applied once after the pipeline is loaded and prepared, before the
LoRA is attached. Each is checked against the model it acts on, so a setting that cannot act there is a one-line
:class:`ConfigError`, never a silent no-op. What each one bought is measured in docs/benchmarks.md ("The levers").
"""

from __future__ import annotations

import math
from typing import Any

from alignprop_core.errors import ConfigError, first_line
from alignprop_core.validation import require

#: Backends whose kernels diffusers fetches from the Hub run downloaded code: refused, like ``trust_remote_code``.
HUB_KERNEL_MARK = "hub"


def attention_backend_names() -> list[str]:
    """diffusers' attention backends that need no download (``AttentionBackendName``; imports torch)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(b.value for b in AttentionBackendName if HUB_KERNEL_MARK not in b.value)


def check_model_settings(config: Any) -> None:
    """The fields of this module, each against its range (called by ``config.validate``; imports torch only when
    ``attention_backend`` is set)."""
    budget = config.checkpoint_memory_budget_gb
    require(budget is None or (math.isfinite(budget) and budget > 0), "checkpoint_memory_budget_gb", budget,
            "empty or a finite number of GB > 0")
    require(budget is None or config.gradient_checkpointing, "checkpoint_memory_budget_gb", budget,
            "empty when gradient_checkpointing is false (then every call keeps its activations anyway)")
    tile = config.vae_tile_size
    require(tile is None or (tile >= 32 and tile % 32 == 0), "vae_tile_size", tile,
            "empty (decode in one pass) or a multiple of 32 pixels, e.g. 512")
    backend = config.attention_backend
    if backend is None:
        return
    if HUB_KERNEL_MARK in str(backend):
        raise ConfigError(f"attention_backend: got {backend!r}, which downloads and runs kernel code from the Hub; "
                          "alignprop never runs downloaded code: choose a backend that is installed, e.g. native or "
                          "flash (the flash-attn package)")
    from alignprop_core.hints import did_you_mean

    names = attention_backend_names()
    hint = did_you_mean(str(backend), names)
    require(backend in names, "attention_backend", backend,
            "empty (diffusers' default) or one of " + ", ".join(names) + (f" ({hint})" if hint else ""))


def check_training_settings(config: Any) -> None:
    """What training needs on top of :func:`check_model_settings` (called by the trainer's preflight, before any
    model is loaded). In training, tiles save memory only with the decoder checkpointed: without it every tile keeps
    its activations for backward, overlaps included (the FLUX.1 VAE at 1024 px, forward+backward: 19.4 GiB in one
    pass, 29.3 GiB in 512 px tiles, 4.5 GiB in tiles with ``vae_checkpointing``; bench/vae_tiles.py)."""
    if config.vae_tile_size is not None and not config.vae_checkpointing:
        raise ConfigError(f"vae_tile_size: got {config.vae_tile_size}, which in training saves memory only with "
                          "vae_checkpointing true (without it every tile keeps its activations for backward, more "
                          "than one pass does); set vae_checkpointing true, or leave vae_tile_size empty")


def apply_model_settings(pipe: Any, denoiser: Any, family: Any, config: Any, training: bool = True) -> None:
    """Apply the config's settings to ``pipe`` (after ``family.prepare``, before the LoRA is attached, so that LoRA
    weights stay in the default layout). ``training=False`` (eval, sample) skips the checkpointing switches, which
    only act when gradients are recorded."""
    import torch

    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if config.channels_last:
        # 4-D weights (convolutions) only; the UNets and every VAE are mostly convolutions, the transformers barely.
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if config.attention_backend is not None:
        set_attention_backend(denoiser, config.attention_backend)
    if config.vae_tile_size is not None:
        if not hasattr(pipe.vae, "use_tiling"):
            raise ConfigError(f"vae_tile_size: this model's VAE ({type(pipe.vae).__name__}) cannot decode in tiles; "
                              "leave vae_tile_size empty")
        family.enable_vae_tiling(pipe, config.vae_tile_size)
    if training:
        enable_inner_checkpointing(pipe, denoiser, config.block_checkpointing, config.vae_checkpointing)


def set_attention_backend(denoiser: Any, backend: str) -> None:
    """diffusers' ``set_attention_backend`` on ``denoiser``, then one small attention call through the backend on the
    denoiser's device and dtype, so that a backend that cannot run here (a missing package, a CUDA-only kernel on the
    CPU) is a one-line error now instead of a traceback in the first step."""
    import torch
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn

    routed = [m.processor for m in denoiser.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    if not routed:
        raise ConfigError(f"attention_backend: this model's denoiser ({type(denoiser).__name__}) calls torch's "
                          "scaled_dot_product_attention itself, which picks its kernel on its own; leave "
                          "attention_backend empty")
    parameter = next(denoiser.parameters())
    active = _AttentionBackendRegistry._active_backend
    try:
        denoiser.set_attention_backend(backend)
        # [batch, tokens, heads, head_dim], the layout diffusers' processors pass
        probe = torch.zeros(1, 8, 2, 64, device=parameter.device, dtype=parameter.dtype)
        dispatch_attention_fn(probe, probe, probe, backend=routed[0]._attention_backend)
    except Exception as exc:  # the backend's own message: a missing package, no kernel for this device or dtype
        denoiser.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)  # set_attention_backend changed the process default
        raise ConfigError(f"attention_backend: '{backend}' cannot run on {parameter.device.type} in "
                          f"{str(parameter.dtype).removeprefix('torch.')} ({type(exc).__name__}: "
                          f"{first_line(exc)[:200]}); choose another backend, e.g. native, or leave it empty") from None


def enable_inner_checkpointing(pipe: Any, denoiser: Any, blocks: bool, vae: bool) -> None:
    """diffusers' own gradient checkpointing inside the models: per block of the denoiser (``blocks``; it acts inside
    each recomputed call, so one call's backward holds one block's activations) and per up-block of the VAE decoder
    (``vae``; where memory peaks at 1024 px). A VAE without it is a one-line :class:`ConfigError`."""
    if blocks:
        denoiser.enable_gradient_checkpointing()
    if vae:
        if not getattr(pipe.vae, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"vae_checkpointing: this model's VAE ({type(pipe.vae).__name__}) does not support "
                              "gradient checkpointing; set vae_checkpointing false")
        pipe.vae.enable_gradient_checkpointing()
