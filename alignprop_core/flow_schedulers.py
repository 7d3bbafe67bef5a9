"""Differentiable flow-matching samplers on the model's own sigmas.

A flow-matching model predicts the velocity ``v = eps - x0`` of the straight path ``x_s = s * eps + (1 - s) * x0``
(``s`` = sigma, 1 = pure noise). Both samplers below are :class:`FlowMatchEulerDiscreteScheduler` subclasses, built
from the pipeline's scheduler config, so the sigmas (shift, dynamic shift ``mu``) are the model's own:

- ``flow_euler``: ``x_next = x + (s_next - s) * v``, the step of diffusers' scheduler, in fp32 as diffusers computes
  it (bitwise the same in fp32 and bf16) and in fp64 when the chain runs in fp64 (diffusers' step casts to fp32,
  which would make a float64 finite-difference check meaningless).
- ``flow_sde``: the marginal-preserving SDE that Flow-GRPO and DanceGRPO sample from,
  ``dx = [v + g^2 / (2 s) * (x + (1 - s) v)] ds + g dW`` with ``g = eta * sqrt(s / (1 - s))`` (at ``s = 1`` the
  denominator uses the next sigma, as Flow-GRPO does), discretised with Euler-Maruyama. ``eta`` (the config's
  ``sample_eta``) sets the noise level; 0 is ``flow_euler``. The last step (to ``s = 0``) adds no noise, so the
  images are the chain's mean prediction, not a re-noised one.

``add_noise`` is the flow forward process (``scale_noise``) for DRaFT-LV's re-noising.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class FlowEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler on the model's sigmas (see the module docstring)."""

    def _sigmas_now(self, timestep: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step_index is None:
            self._init_step_index(timestep)
        return self.sigmas[self.step_index], self.sigmas[self.step_index + 1]

    @staticmethod
    def _work_dtype(sample: torch.Tensor) -> torch.dtype:
        return torch.float64 if sample.dtype == torch.float64 else torch.float32

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: Optional[torch.Generator | list[torch.Generator]] = None, return_dict: bool = True,
             **unused: Any) -> Any:
        sigma, sigma_next = self._sigmas_now(timestep)
        prev = sample.to(self._work_dtype(sample)) + (sigma_next - sigma) * model_output
        return self._finish(prev.to(model_output.dtype), return_dict)

    def _finish(self, prev: torch.Tensor, return_dict: bool) -> Any:
        self._step_index += 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``s * noise + (1 - s) * x`` at the sigma of ``timesteps`` (one timestep for the whole batch)."""
        sigma = self.sigmas[self.index_for_timestep(timesteps.flatten()[0])].to(original_samples)
        return sigma * noise + (1.0 - sigma) * original_samples


class FlowSDEScheduler(FlowEulerScheduler):
    """Euler-Maruyama on the flow SDE (see the module docstring); ``eta`` is the noise level."""

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: Optional[torch.Generator | list[torch.Generator]] = None, return_dict: bool = True,
             eta: float = 1.0, **unused: Any) -> Any:
        sigma, sigma_next = self._sigmas_now(timestep)
        x = sample.to(self._work_dtype(sample))
        dt = sigma_next - sigma  # negative: from noise towards data
        if eta <= 0 or float(sigma_next) <= 0.0:
            return self._finish((x + dt * model_output).to(model_output.dtype), return_dict)
        s = float(sigma)
        g = eta * math.sqrt(s / (1.0 - (float(sigma_next) if s >= 1.0 else s)))
        mean = x * (1 + g * g / (2 * s) * dt) + model_output * (1 + g * g * (1 - s) / (2 * s)) * dt
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev = mean + g * torch.sqrt(-dt).to(x) * noise
        return self._finish(prev.to(model_output.dtype), return_dict)
