"""Preflight: everything about a run that can be wrong with names, paths, folders and the network, checked before
any model is loaded and before anything is written, each problem one line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from alignprop_core import checkpoints, plugins
from alignprop_core.accelerator_setup import check_hub_reachable
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import ConfigError
from alignprop_core.families import family_for_class_name
from alignprop_core.image_loggers import require_package
from alignprop_core.model_setup import check_training_settings
from alignprop_core.models import pipeline_class_name
from alignprop_core.pipelines import resolve_model_path


def preflight(config: AlignPropConfig, rewards_from_config: bool, prompts_from_config: bool,
              load_model: bool) -> tuple[Optional[str], Optional[Path]]:
    """Check plugin names, the model path, ``resume_from``, ``output_dir`` and tracking; return the resolved model
    path (None when the caller brings a pipeline) and the checkpoint folder to resume from (None for a new run)."""
    check_training_settings(config)
    if rewards_from_config:
        for reward in config.rewards:
            plugins.get("reward", reward.name)
    if prompts_from_config:
        plugins.get("prompt source", config.prompts.name)
    for spec in config.eval_rewards:  # held-out rewards come from the config even beside a reward_function
        plugins.get("reward", spec.name)
    for spec in config.image_loggers:
        plugins.get("image logger", spec.name)
    model_path = resolve_model_path(config.pretrained_model) if load_model else None
    if model_path is not None and Path(model_path).is_dir():  # a hub model's family is known once its config loads
        family_for_class_name(pipeline_class_name(Path(model_path)), model_path).scheduler_name(config.scheduler)
    resume_dir = checkpoints.find_resume_dir(config.resume_from, config.output_dir)
    checkpoints.check_output_dir(config.output_dir, resume_dir is not None, config.overwrite_output_dir)
    check_tracking(config)
    return model_path, resume_dir


def check_tracking(config: AlignPropConfig) -> None:
    """Before anything is loaded: the tracker's package and folder, and the hub for ``push_to_hub``."""
    if config.log_with in ("tensorboard", "wandb"):
        require_package(config.log_with, f"log_with: {config.log_with}")
    if config.log_with:
        problem = checkpoints.writable_problem(Path(config.tracker_logging_dir))
        if problem:
            raise ConfigError(f"logdir: cannot write tracker logs to '{config.tracker_logging_dir}' ({problem}); "
                              "choose a writable folder")
    if config.push_to_hub:
        check_hub_reachable()
