"""Guards on the weights during training: a step that leaves a trained weight NaN/inf is undone, so that the
checkpoints and the export always hold the last good weights."""

from __future__ import annotations

import copy
from typing import Callable

import torch

from alignprop_core.errors import AlignPropError


def optimizer_step_keeping_weights_finite(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *,
                                          can_roll_back: bool, stop_message: Callable[[], str]) -> bool:
    """``optimizer.step()``; if that leaves a weight in ``params`` NaN/inf, restore the weights and the optimizer's
    state from before the step and return False. Rolling back needs a copy of the weights and the optimizer state per
    step: cheap for a LoRA, double the memory for a whole UNet, so without ``can_roll_back`` such a step raises
    :class:`AlignPropError` (``stop_message()``) instead, the last checkpoint being good."""
    snapshot = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())) if can_roll_back else None
    optimizer.step()
    if all(bool(torch.isfinite(p).all()) for p in params):
        return True
    if snapshot is None:
        raise AlignPropError(stop_message())
    weights, optimizer_state = snapshot
    with torch.no_grad():
        for param, saved in zip(params, weights):
            param.copy_(saved)
    optimizer.load_state_dict(optimizer_state)
    return False
