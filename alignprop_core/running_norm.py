"""``normalize: running``: put rewards of different scales on one scale, so that their weights mean the same.

PickScore is about 100 x a cosine, HPS a cosine, aesthetic a 1-10 rating: ``0.5 * pickscore + 0.5 * hps`` is
mostly PickScore. With ``normalize: running`` a reward's training score becomes::

    z = (r - mean) / std        mean, std: of every training score of this reward so far, this batch included

``mean`` and ``std`` are constants for the gradient (``dz/dr = 1/std``): the normalisation rescales the reward's
gradient, it does not change its direction. The statistics are merged batch by batch (Chan et al.'s parallel
update of count, mean and sum of squared deviations) from all processes' scores, so N processes keep exactly the
statistics of one. Until two scores were seen ``std`` is 1. They are logged (``reward/<name>_running_mean``,
``_running_std``) and saved in checkpoints, so a resumed run continues with the same scale. Evaluation uses the raw
scores (its numbers stay comparable across rounds); only the training objective is normalised.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional

from alignprop_core.errors import ConfigError

if TYPE_CHECKING:  # tensor methods only: the config parses `normalize` without importing torch
    import torch

NORMALIZE_CHOICES = ("none", "running")


def parse_normalize(value: Any, owner: str) -> str:
    """``normalize`` of a reward entry: ``none`` (default, also null/false) or ``running``."""
    if value is None or value is False:
        return "none"
    if not isinstance(value, str) or value.strip().lower() not in NORMALIZE_CHOICES:
        raise ConfigError(f"{owner}: normalize {value!r} is not valid; write running (or none)")
    return value.strip().lower()


class RunningNorm:
    """Running mean and standard deviation of one reward's training scores."""

    def __init__(self, gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, eps: float = 1e-6):
        self.gather = gather
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, scores: torch.Tensor) -> None:
        """Merge a batch of scores (gathered from every process) into the statistics."""
        batch = scores.detach().float()
        if self.gather is not None:
            batch = self.gather(batch)
        batch = batch[batch.isfinite()].double()  # a NaN step is skipped by the trainer: keep it out too
        n = batch.numel()
        if n == 0:
            return
        batch_mean = batch.mean().item()
        batch_m2 = ((batch - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / max(self.std, self.eps)

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def restore(self, state: dict[str, Any]) -> None:
        """Statistics saved by :meth:`state`; a damaged entry is a one-line :class:`ConfigError`."""
        count, mean, m2 = state.get("count"), state.get("mean"), state.get("m2")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in (count, mean, m2))
        if not numbers or count < 0 or m2 < 0 or int(count) != count:
            raise ConfigError(f"resume_from: the saved running reward statistics {state!r} are damaged; pick another "
                              "checkpoint")
        self.count, self.mean, self.m2 = int(count), float(mean), float(m2)
