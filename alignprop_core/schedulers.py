"""The schedulers alignprop can backpropagate through, by config name.

This module imports no torch or diffusers at import time (the config, the CLI and the family adapters use it).
"""

from __future__ import annotations

from typing import Any

from alignprop_core.errors import ConfigError

#: config name -> (diffusers scheduler class, settings forced on top of the pipeline's scheduler config). Each runs
#: one denoiser evaluation per step (``len(scheduler.timesteps) == sample_num_steps``) and has a differentiable
#: ``step``.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_scheduler_name(name: str) -> None:
    """A one-line :class:`ConfigError` unless ``name`` is in :data:`SCHEDULERS` (the config's check too)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler: got {name!r}, allowed: one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, base_config: Any):
    """Build scheduler ``name`` from the pipeline's scheduler config (``Cls.from_config``), so the model's noise
    schedule, prediction type and timestep spacing carry over."""
    import diffusers

    check_scheduler_name(name)
    class_name, forced = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **forced)
