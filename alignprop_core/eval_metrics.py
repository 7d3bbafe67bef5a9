"""The names of the eval measures and the rules on the settings that refer to them (no torch: the config checks
these). What the measures are: :mod:`alignprop_core.image_stats` and :mod:`alignprop_core.monitoring`."""

from __future__ import annotations

from typing import Any

from alignprop_core.errors import ConfigError

IMAGE_STATISTICS = ("image_brightness", "image_saturation", "image_dark_fraction", "image_blown_out_fraction",
                    "image_high_frequency_energy")
DIVERSITY = ("diversity_within_prompt", "diversity_across_prompts")
#: eval metrics that are not rewards (``eval/<name>``, no ``_mean``)
IMAGE_MEASURES = DIVERSITY + IMAGE_STATISTICS
BEST_DIR = "best"


def metric_key(name: str) -> str:
    """The metrics.jsonl key of an eval measure: ``eval/<reward>_mean`` or ``eval/<image measure>``."""
    return f"eval/{name}" if name in IMAGE_MEASURES else f"eval/{name}_mean"


def improvable_metrics(config: Any) -> list[str]:
    """The metrics early stopping may watch (higher is better): rewards, held-out rewards, diversity."""
    names = ["reward"] + [r.name for r in config.rewards] + [r.name for r in config.eval_rewards]
    return [metric_key(n) for n in dict.fromkeys(names)] + [metric_key(n) for n in DIVERSITY]


def default_metric(config: Any) -> str:
    """``early_stopping_metric`` when empty: the first held-out reward, else the weighted training reward."""
    return metric_key(config.eval_rewards[0].name if config.eval_rewards else "reward")


def check_monitoring(config: Any) -> None:
    """The guard fields together (each field's own range is checked with the others in ``config.validate``)."""
    training = {r.name for r in config.rewards}
    for spec in config.eval_rewards:
        if spec.name in training:
            raise ConfigError(f"eval_rewards: '{spec.name}' is also a training reward; a held-out reward must be one "
                              "the run does not optimise (remove it from one of the lists)")
    names = [r.name for r in [*config.rewards, *config.eval_rewards]]
    clash = [name for name in names if name in IMAGE_MEASURES]
    if clash:
        raise ConfigError(f"rewards: '{clash[0]}' is the name of an eval measure; register the reward under another "
                          "name")
    if config.eval_diversity_features != "pixels" and config.eval_diversity_features not in names:
        raise ConfigError(f"eval_diversity_features: got {config.eval_diversity_features!r}, allowed: pixels or the "
                          f"name of one of this run's rewards ({', '.join(names)}) that has an embed_images method")
    if config.early_stopping_metric and config.early_stopping_metric not in improvable_metrics(config):
        raise ConfigError(f"early_stopping_metric: got {config.early_stopping_metric!r}, allowed: "
                          f"{', '.join(improvable_metrics(config))} (empty = {default_metric(config)})")
    if config.early_stopping_patience and not (config.eval_freq and config.eval_num_samples):
        raise ConfigError("early_stopping_patience needs eval rounds during training: set eval_freq >= 1 and "
                          "eval_num_samples >= 1")
    if config.kl_weight and not config.use_lora:
        raise ConfigError("kl_weight: the base prediction is the denoiser with its LoRA switched off, so it needs "
                          "use_lora: true (or set kl_weight 0)")
