"""The schedulers alignprop can backpropagate through, by config name.

This module imports no torch or diffusers at import time (the config, the CLI and the family adapters use it).
"""

from __future__ import annotations

from typing import Any

from alignprop_core.errors import ConfigError

#: config name -> (scheduler class, settings forced on top of the pipeline's scheduler config). Each runs one
#: denoiser evaluation per step (``len(scheduler.timesteps) == sample_num_steps``) and has a differentiable ``step``.
#: The ``flow_*`` classes are alignprop's (:mod:`alignprop_core.flow_schedulers`), the others diffusers'.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowEulerScheduler", {}),
    "flow_sde": ("FlowSDEScheduler", {}),
}

#: the schedulers for flow-matching models (velocity prediction on sigmas); the others are for noise-prediction
#: (DDPM-style) models
FLOW_SCHEDULERS = ("flow_euler", "flow_sde")

#: the config value that means "the model family's own default" (ddim for SD/SDXL, flow_euler for SD3/FLUX)
AUTO = "auto"


def scheduler_kind(name: str) -> str:
    """``"flow"`` for the flow-matching schedulers, ``"noise"`` for the others."""
    return "flow" if name in FLOW_SCHEDULERS else "noise"


def check_scheduler_name(name: str) -> None:
    """A one-line :class:`ConfigError` unless ``name`` is ``auto`` or in :data:`SCHEDULERS` (the config's check)."""
    if name != AUTO and name not in SCHEDULERS:
        raise ConfigError(f"scheduler: got {name!r}, allowed: {AUTO} or one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, base_config: Any):
    """Build scheduler ``name`` from the pipeline's scheduler config (``Cls.from_config``), so the model's noise
    schedule or sigmas, prediction type and timestep spacing carry over."""
    check_scheduler_name(name)
    class_name, forced = SCHEDULERS[name]
    if name in FLOW_SCHEDULERS:
        from alignprop_core import flow_schedulers as source
    else:
        import diffusers as source
    return getattr(source, class_name).from_config(base_config, **forced)
