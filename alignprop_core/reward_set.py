"""The rewards of a run and the one weighted sum the trainer maximises and eval reports::

    total(images) = sum_j  w_j * r_j(images, prompts, metadata)        (each r_j: [B], frozen, differentiable)

Rewards come from plugins selected by name (``rewards`` in the config) or from one TRL-style ``reward_function``.
Each ``r_j`` is averaged over the entry's ``views`` (``views.py``); in training an entry with ``normalize: running``
contributes ``w_j * (r_j - mean_j) / std_j`` instead (``running_norm.py``), while its reported score stays raw.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from alignprop_core import plugins
from alignprop_core.errors import PluginError
from alignprop_core.rewards import call_reward, freeze
from alignprop_core.running_norm import RunningNorm
from alignprop_core.views import Views, parse_views, view_boxes


@dataclass
class WeightedReward:
    """One term of the sum. ``trl_style``: a ``reward_function`` given to the trainer; TRL checked nothing about it,
    so the trainer only warns about a broken one at construction and refuses it when training starts."""

    name: str
    weight: float
    fn: Callable[..., Any]
    trl_style: bool = False
    views: Views = Views()
    norm: Optional[RunningNorm] = None  # normalize: running


class RewardSet:
    """Frozen rewards on ``device`` and their weighted sum."""

    def __init__(self, rewards: Sequence[WeightedReward], device: Optional[torch.device | str] = None):
        self.rewards = list(rewards)
        for reward in self.rewards:
            freeze(reward.fn, device)

    @classmethod
    def from_specs(cls, specs: Sequence[Any], device: Optional[torch.device | str] = None,
                   gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> "RewardSet":
        """The config's ``rewards`` (``RewardSpec``: name, weight, options, views, normalize), built by their plugins;
        ``gather`` joins all processes' scores for the running statistics (``accelerator.gather``)."""
        return cls([WeightedReward(s.name, s.weight, plugins.build("reward", s.name, s.options),
                                   views=parse_views(s.views, s.name),
                                   norm=RunningNorm(gather) if s.normalize == "running" else None) for s in specs],
                   device)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], device: Optional[torch.device | str] = None) -> "RewardSet":
        """A TRL-style ``reward_fn(images, prompts, metadata) -> Tensor[B]`` or ``(Tensor[B], metadata)``."""
        return cls([WeightedReward("reward", 1.0, fn, trl_style=True)], device)

    def __iter__(self) -> Iterator[WeightedReward]:
        return iter(self.rewards)

    @property
    def trl_style(self) -> bool:
        return any(r.trl_style for r in self.rewards)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict],
              training: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum ``[B]`` and each reward's own (raw) scores, each checked against the reward contract.
        ``training``: the objective of a training step, which updates the running statistics of the rewards with
        ``normalize: running`` and sums their normalised scores."""
        parts = {r.name: score_views(lambda *a, r=r: call_reward(r.name, r.fn, *a), r.views, images, prompts,
                                     metadata) for r in self.rewards}
        terms = []
        for r in self.rewards:
            if training and r.norm is not None:
                r.norm.update(parts[r.name])
                terms.append(r.weight * r.norm(parts[r.name]))
            else:
                terms.append(r.weight * parts[r.name])
        return sum(terms), parts

    def normalizer_metrics(self) -> dict[str, float]:
        """``reward/<name>_running_mean`` and ``_running_std`` of each reward with ``normalize: running``."""
        return {f"reward/{r.name}_running_{what}": getattr(r.norm, what) for r in self.rewards if r.norm is not None
                for what in ("mean", "std")}

    def normalizer_state(self) -> dict[str, dict[str, float]]:
        """The running statistics by reward name, for checkpoints (``TrainerState.reward_normalizers``)."""
        return {r.name: r.norm.state() for r in self.rewards if r.norm is not None}

    def restore_normalizers(self, state: dict[str, Any]) -> None:
        """Statistics saved by :meth:`normalizer_state` (rewards missing from ``state`` start afresh)."""
        for r in self.rewards:
            if r.norm is not None and isinstance(state.get(r.name), dict):
                r.norm.restore(state[r.name])

    def unchecked_total(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Any:
        """TRL's ``compute_rewards``: the weighted sum of whatever the rewards return (a ``(scores, metadata)``
        tuple unpacked) over their views, without the contract checks."""
        total: Any = 0
        for reward in self.rewards:
            def scores(*args: Any, fn: Callable[..., Any] = reward.fn) -> Any:
                out = fn(*args)
                return out[0] if isinstance(out, tuple) and len(out) == 2 else out

            total = total + reward.weight * score_views(scores, reward.views, images, prompts, metadata)
        return total

    def check_or_warn(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Optional[PluginError]:
        """:meth:`check_contract`; for a TRL-style reward function the problem is printed as a warning and returned
        (the trainer raises it when training starts: TRL's own tests build trainers with a placeholder scorer)."""
        try:
            self.check_contract(images, prompts, metadata)
        except PluginError as exc:
            if not self.trl_style:
                raise
            print(f"warning: {exc}; train() will refuse this reward_function", file=sys.stderr)
            return exc
        return None

    def check_contract(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> None:
        """Score ``images`` (which require grad) once, so a reward that breaks the contract (shape, type, no gradient)
        fails with a one-line :class:`PluginError` before anything is trained. NaN/inf scores pass: the trainer's
        non-finite guard handles those."""
        total, _ = self.score(images, prompts, metadata)
        if not torch.isfinite(total).all():
            return
        grad = torch.autograd.grad(total.sum(), images, allow_unused=True)[0] if total.requires_grad else None
        if grad is None:
            raise PluginError("the rewards do not depend on the images (no gradient reaches them); a reward must "
                              "be computed from its images argument with differentiable torch ops")


def score_views(score: Callable[..., torch.Tensor], views: Views, images: torch.Tensor, prompts: list[str],
                metadata: list[dict]) -> torch.Tensor:
    """``score(images, prompts, metadata) -> [B]`` averaged over ``views`` of each image (``views.py``; ``center``:
    one call on the images as they are). The views go to the reward as one batch, prompts and metadata repeated."""
    if views.kind == "center":
        return score(images, prompts, metadata)
    boxes = view_boxes(views, *images.shape[-2:], images)
    crops = torch.cat([images[..., top:top + side, left:left + side] for top, left, side in boxes])
    scores = score(crops, list(prompts) * len(boxes), list(metadata) * len(boxes))
    return scores.view(len(boxes), images.shape[0]).mean(dim=0)


def reward_metrics(total: torch.Tensor, components: dict[str, list[torch.Tensor]],
                   rewards: Optional[RewardSet] = None) -> dict[str, float]:
    """``reward_mean``/``reward_std`` of the weighted total (the training objective), ``reward/<name>_mean``/``_std``
    of each reward's raw scores, and the running statistics of ``rewards`` (:meth:`RewardSet.normalizer_metrics`)."""
    metrics = {"reward_mean": total.mean().item(), "reward_std": _std(total),
               **(rewards.normalizer_metrics() if rewards is not None else {})}
    for name, values in components.items():
        joined = torch.cat(values).float()
        metrics[f"reward/{name}_mean"] = joined.mean().item()
        metrics[f"reward/{name}_std"] = _std(joined)
    return metrics


def _std(values: torch.Tensor) -> float:
    return values.std().item() if values.numel() > 1 else 0.0
