"""What the trainer watches on its fixed-seed eval set, and when that tells it to stop.

Each eval round renders the same samples (prompts and noise from ``eval_seed``) with the current weights and
measures, as ``metrics.jsonl`` eval-row keys:

    eval/reward_mean, eval/<reward>_mean      the training rewards: weighted total and each
    eval/<held-out>_mean                      each of ``eval_rewards``: scored here, never trained on
    eval/diversity_within_prompt, eval/diversity_across_prompts, eval/brightness, ...   (image_stats)

A model that hacks its reward raises the training rewards while the held-out ones stall or fall, diversity drops and
the image statistics drift. Early stopping watches one metric ``m`` (higher is better; default the first held-out
reward): a round improves when ``m > best + early_stopping_min_delta``; each improvement is exported as ``best/``
(the first round, before training, included: then the best is the base model); ``early_stopping_patience`` rounds
in a row without one end the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from alignprop_core import checkpoints
from alignprop_core.errors import ConfigError
from alignprop_core.eval_metrics import BEST_DIR, IMAGE_STATISTICS, default_metric
from alignprop_core.image_stats import diversity, image_statistics
from alignprop_core.reward_set import RewardSet

if TYPE_CHECKING:
    from alignprop_core.config import AlignPropConfig


class EvalMeasures:
    """Scores an eval round: the training ``rewards``, the held-out rewards and the image measures."""

    def __init__(self, config: "AlignPropConfig", rewards: RewardSet, device: torch.device):
        self.rewards = rewards
        self.held_out = RewardSet.from_specs(config.eval_rewards, device)
        self.embed = self._embedding(config.eval_diversity_features)

    def _embedding(self, features: str) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if features == "pixels":
            return None
        owners = [r.fn for r in [*self.rewards, *self.held_out] if r.name == features]
        if not owners or not callable(getattr(owners[0], "embed_images", None)):
            raise ConfigError(f"eval_diversity_features: '{features}' is not a reward of this run with an "
                              "embed_images(images) method; use pixels (the default) or such a reward's name")
        return owners[0].embed_images

    def score(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        """``(training total [B], {training and held-out reward: [B]})``: a score function for ``sample_and_score``."""
        total, parts = self.rewards.score(images, prompts, metadata)
        if self.held_out.rewards:
            parts = {**parts, **self.held_out.score(images, prompts, metadata)[1]}
        return total, parts

    def image_measures(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Diversity and image statistics of one round's images ``[N, 3, H, W]`` in ``[0, 1]``."""
        return {**diversity(images, prompts, self.embed), **image_statistics(images)}


class EarlyStopping:
    """The best value of one eval metric so far and how many rounds passed without beating it (saved on resume)."""

    def __init__(self, metric: str, patience: int, min_delta: float):
        self.metric, self.patience, self.min_delta = metric, int(patience), float(min_delta)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.rounds_without_improvement = 0

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        """Record one eval round's ``metrics`` (metrics.jsonl keys); True when it improves on the best."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            self.rounds_without_improvement += 1
            return False
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_step, self.rounds_without_improvement = float(value), int(step), 0
            return True
        self.rounds_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.rounds_without_improvement >= self.patience

    def reason(self, step: int) -> str:
        return (f"stopped early at step {step}: {self.metric} has not improved by more than {self.min_delta:g} for "
                f"{self.rounds_without_improvement} eval rounds (best {self.best:.4f} at step {self.best_step})")

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "rounds_without_improvement": self.rounds_without_improvement}

    def restore(self, state: Any) -> None:
        """Continue from a checkpoint's :meth:`state` (ignored when it watched another metric or is damaged)."""
        if not isinstance(state, dict) or state.get("metric") != self.metric:
            return
        best, best_step, rounds = state.get("best"), state.get("best_step"), state.get("rounds_without_improvement")
        if (isinstance(best, (int, float)) and isinstance(best_step, int) and isinstance(rounds, int)
                and not isinstance(rounds, bool) and rounds >= 0):
            self.best, self.best_step, self.rounds_without_improvement = float(best), best_step, rounds


class EvalRounds:
    """The trainer's eval rounds: what is measured (:class:`EvalMeasures`), the line printed and the metrics row,
    best/ and early stopping (with ``eval_freq``)."""

    def __init__(self, config: "AlignPropConfig", rewards: RewardSet, device: torch.device, output_dir: Path):
        self.config, self.output_dir = config, output_dir
        self.last_means: dict[str, float] = {}  # the latest round's, as evaluate() returned them
        self.measures = EvalMeasures(config, rewards, device)
        self.early_stopping = EarlyStopping(config.early_stopping_metric or default_metric(config),
                                            config.early_stopping_patience, config.early_stopping_min_delta)

    def record(self, step: int, when: str, means: dict[str, float], print_fn: Callable[[str], Any],
               export: Callable[[Path], None]) -> None:
        """Print and log one round (``when``: before, step, after); export it as best/ when it improves."""
        self.last_means = means
        shown = {name: value for name, value in means.items()  # rewards and diversity (NaN: not measurable)
                 if name not in IMAGE_STATISTICS and not math.isnan(value)}
        print_fn(f"eval {when + ':':<8}" + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        row = checkpoints.eval_row(step, when, means)
        checkpoints.append_metrics(self.output_dir, row)
        if self.config.eval_freq and self.early_stopping.update(step, row):
            record = {"step": step, "metric": self.early_stopping.metric, "value": self.early_stopping.best}

            def write(folder: Path) -> None:
                export(folder)
                (folder / "best.json").write_text(json.dumps(record) + "\n")

            checkpoints.export_into(self.output_dir / BEST_DIR, write)

    def stopping(self, accelerator: Any) -> bool:
        """The main process's early-stopping decision, seen by every process."""
        if self.early_stopping.should_stop and accelerator.is_main_process:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def final_line(self, why: str) -> str:
        """The run's last line: why it stopped, and where the best round's weights are."""
        best = self.early_stopping
        if not (self.config.eval_freq and best.best is not None):
            return why
        return f"{why}; best {best.metric} {best.best:.4f} at step {best.best_step} in {self.output_dir / BEST_DIR}"
