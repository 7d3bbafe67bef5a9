"""Which diffusers pipelines (model families) and schedulers alignprop can backpropagate through.

This module imports no torch or diffusers at import time (the config and the CLI use its name tables).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from alignprop_core.errors import AlignPropError, ConfigError
from alignprop_core.tiny import TINY_MODEL_ID, TINY_SDXL_MODEL_ID

#: The default base model: Stable Diffusion 1.5 as maintained on the hub since runwayml's copy was removed (2024).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: Hub ids that no longer exist -> their maintained copies (used with a one-line note).
MODEL_ALIASES = {"runwayml/stable-diffusion-v1-5": DEFAULT_MODEL}


def default_output_dir(pretrained_model: str) -> str:
    """``output_dir`` when none is given: one folder per tiny demo model, so the demos never replace each other."""
    tiny = {TINY_MODEL_ID: "alignprop-tiny-sd-output", TINY_SDXL_MODEL_ID: "alignprop-tiny-sdxl-output"}
    return tiny.get(pretrained_model, "alignprop-output") if isinstance(pretrained_model, str) else "alignprop-output"

#: diffusers pipeline class -> family. SD 2.x checkpoints are ``StableDiffusionPipeline`` too.
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
SUPPORTED_PIPELINES = "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL)"

#: config name -> (diffusers scheduler class, settings forced on top of the pipeline's scheduler config). Each runs
#: one UNet evaluation per step (``len(scheduler.timesteps) == sample_num_steps``) and has a differentiable ``step``.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def pipeline_class_name(path: str | os.PathLike) -> Optional[str]:
    """``_class_name`` from a local pipeline folder's ``model_index.json``; a one-line :class:`ConfigError` when
    that file is not readable JSON (a corrupt file is not an "unknown class")."""
    index = Path(path) / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = "is not valid JSON" if isinstance(exc, ValueError) else f"cannot be read ({exc.strerror or exc})"
        raise ConfigError(f"pretrained_model: '{index}' {reason}; re-save the pipeline with pipe.save_pretrained "
                          "or download it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pretrained_model: '{index}' is not a diffusers model index (expected a JSON object)")
    name = data.get("_class_name")
    return name if isinstance(name, str) else None


def family_of_class(class_name: Optional[str], source: str) -> str:
    """``'sd'`` or ``'sdxl'`` for a pipeline class name; a one-line :class:`ConfigError` for anything else."""
    family = PIPELINE_FAMILIES.get(class_name or "")
    if family is None:
        raise ConfigError(f"pretrained_model: '{source}' is a {class_name or 'pipeline of unknown class'}, which "
                          f"alignprop cannot train; supported: {SUPPORTED_PIPELINES}")
    return family


def family_of(pipe: Any) -> str:
    """Family of a loaded pipeline: by class (subclasses included), else ``AlignPropError`` naming the supported."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd"
    raise AlignPropError(f"the pipeline is a {type(pipe).__name__}, which alignprop cannot train; supported: "
                         f"{SUPPORTED_PIPELINES}")


def pipeline_class(family: str):
    """The diffusers pipeline class of a family (used for loading and for LoRA export)."""
    import diffusers

    names = {v: k for k, v in PIPELINE_FAMILIES.items()}
    return getattr(diffusers, names[family])


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler: got {name!r}, allowed: one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, base_config: Any):
    """Build scheduler ``name`` from the pipeline's scheduler config (``Cls.from_config``), so the model's noise
    schedule, prediction type and timestep spacing carry over."""
    import diffusers

    check_scheduler_name(name)
    class_name, forced = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **forced)


def prepare_pipeline(pipe: Any, scheduler: str, device: Any, dtype: Any) -> str:
    """Set a loaded pipeline up for differentiable sampling and return its family: scheduler ``scheduler`` built
    from the pipeline's own scheduler config, every model frozen and moved to ``device`` in ``dtype``, except an
    SDXL ``force_upcast`` VAE, which stays fp32 under fp16 (it overflows in fp16; its pipeline decodes in fp32)."""
    import torch

    family = family_of(pipe)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.unet):
        if module is None:
            continue
        module.requires_grad_(False)
        module.to(device)
        target = dtype
        if (module is pipe.vae and family == "sdxl" and dtype == torch.float16
                and getattr(module.config, "force_upcast", False)):
            target = torch.float32
        if module.dtype != target:
            module.to(dtype=target)
    pipe.set_progress_bar_config(disable=True)
    return family
