"""The accelerate side of a run: the ``Accelerator`` (mixed precision, accumulation, project folder, CPU multi-process),
tracker initialisation (run name, flattened config) and the hub check for ``push_to_hub``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import AlignPropError, ConfigError


def make_accelerator(config: AlignPropConfig, family: Any):
    """accelerate's Accelerator for this config and model family (``mixed_precision: auto`` is the family's
    default on a GPU, fp32 on CPU): project folder = output_dir, tracker logs in ``tracker_logging_dir``; TRL's
    ProjectConfiguration keys already mapped by ``config.validate()``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from alignprop_core.pipelines import resolve_mixed_precision

    mixed_precision = resolve_mixed_precision(config.mixed_precision, family)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        print("note: mixed_precision=fp16 needs a GPU; training in fp32 on this machine", file=sys.stderr)
        mixed_precision = "no"
    accelerator_kwargs = dict(config.accelerator_kwargs)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # several processes without a GPU (`accelerate launch --multi_gpu --num_processes N` or torchrun on CPU):
        # accelerate only picks its gloo MULTI_CPU mode when told to run on the CPU
        accelerator_kwargs.setdefault("cpu", True)
    project = ProjectConfiguration(project_dir=str(config.output_dir), logging_dir=config.tracker_logging_dir,
                                   save_on_each_node=bool(config.project_kwargs.get("save_on_each_node", False)))
    return Accelerator(mixed_precision=mixed_precision,
                       gradient_accumulation_steps=config.train_gradient_accumulation_steps,
                       log_with=config.log_with, project_config=project, **accelerator_kwargs)


def tracker_init_kwargs(config: AlignPropConfig) -> dict[str, Any]:
    """``tracker_kwargs`` with the run name (``run_name`` or ``exp_name``) for the trackers that take one."""
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in config.tracker_kwargs.items()}
    for tracker, key in (("wandb", "name"), ("mlflow", "run_name"), ("trackio", "name")):
        if config.log_with in (tracker, "all"):
            section = kwargs.setdefault(tracker, {})
            if isinstance(section, dict):
                section.setdefault(key, config.tracker_run_name)
    return kwargs


def check_hub_reachable() -> None:
    """push_to_hub uploads at the end of the run: fail now, not after hours of training, when it cannot."""
    from huggingface_hub import constants

    from alignprop_core.pipelines import hub_host_reachable

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("push_to_hub: HF_HUB_OFFLINE is set, so the upload at the end would fail; unset it or set "
                          "push_to_hub false (the LoRA is written to output_dir either way)")
    if not hub_host_reachable():
        raise ConfigError("push_to_hub: the Hugging Face Hub cannot be reached (no network?), so the upload at the "
                          "end would fail; set push_to_hub false (the LoRA is written to output_dir either way)")


def flat_config(config: AlignPropConfig) -> dict[str, Any]:
    flat = {}
    for key, value in config.to_dict().items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
    return flat


def make_optimizer(params: list[torch.nn.Parameter], config: AlignPropConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) with the config's settings."""
    optimizer_cls = torch.optim.AdamW
    if config.train_use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise AlignPropError("train_use_8bit_adam needs bitsandbytes: pip install bitsandbytes "
                                 "(or set train_use_8bit_adam false)") from None
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(params, lr=config.train_learning_rate, betas=(config.train_adam_beta1,
                         config.train_adam_beta2), weight_decay=config.train_adam_weight_decay,
                         eps=config.train_adam_epsilon)


def upload_run(output_dir: Any, repo_id: str) -> None:
    """Upload a run's export (LoRA, or ``unet/`` / ``transformer/``) and config to hub repo ``repo_id`` (created when
    missing)."""
    from huggingface_hub import create_repo, upload_folder

    from alignprop_core.checkpoints import CONFIG_NAME
    from alignprop_core.lora import DENOISER_DIRS, LORA_WEIGHTS_NAME

    create_repo(repo_id, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(output_dir),
                  allow_patterns=[LORA_WEIGHTS_NAME, *(f"{name}/*" for name in DENOISER_DIRS), CONFIG_NAME])
