"""KL to the base model: a penalty that keeps the fine-tuned denoiser's predictions near the base model's.

Each denoising step is a Gaussian transition whose mean is affine in the denoiser's prediction, so the KL between the
LoRA model's and the base model's step from the same input is ``c_t * ||eps_theta - eps_base||^2`` (``c_t`` fixed
by the scheduler; noise, v or flow prediction alike). Following DPOK and the reward-fine-tuning practice built on it,
the per-step constants are dropped and the penalty is

    kl = mean over the chain's calls with gradients of  mean over elements (eps_theta - eps_base)^2
    loss = -mean reward + kl_weight * kl

where ``eps_theta`` is the denoiser's raw output (both guidance halves) and ``eps_base`` the same call with the
LoRA switched off (diffusers' ``disable_adapters``), without a graph: one extra no-grad denoiser call per call with
gradients. With the LoRA's B factors at 0 (step 0) ``eps_theta == eps_base`` and ``kl`` is exactly 0.
"""

from __future__ import annotations

from typing import Any

import torch

from alignprop_core.families import Evaluate, Family


class BaseModelDistance:
    """Collects ``mean (eps_theta - eps_base)^2`` for each denoiser call of one chain that runs with gradients."""

    def __init__(self, family: Family, denoiser: torch.nn.Module):
        self.family = family
        self.denoiser = denoiser  # the unwrapped denoiser holding the LoRA (not a DDP wrapper)
        self.terms: list[torch.Tensor] = []

    def wrap(self, evaluate: Evaluate) -> Evaluate:
        """``evaluate`` that also records the distance to the base prediction when grad is on."""
        def evaluate_and_compare(model_input: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
            prediction = evaluate(model_input, t, kwargs)
            if torch.is_grad_enabled():
                with torch.no_grad():
                    self.denoiser.disable_adapters()
                    try:
                        base = self.family.call_denoiser(self.denoiser, model_input.detach(), t, kwargs)
                    finally:
                        self.denoiser.enable_adapters()
                self.terms.append((prediction.float() - base.float()).pow(2).mean())
            return prediction

        return evaluate_and_compare

    def value(self) -> torch.Tensor:
        """The mean over the recorded calls (a 0-dim tensor in the graph; 0 when no call had gradients)."""
        if not self.terms:
            return torch.zeros(())
        return torch.stack(self.terms).mean()
