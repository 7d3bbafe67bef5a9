"""Built-in weight-free rewards and the weighted combination the trainer maximises."""

from __future__ import annotations

from typing import Any, Callable

import torch

from alignprop_core import options
from alignprop_core.errors import PluginError
from alignprop_core.options import looks_like_path  # noqa: F401  (re-exported for the reward plugins)

RewardFn = Callable[[torch.Tensor, list, list], Any]

#: dtype names reward plugins accept in their ``dtype`` option.
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: Any, reward_name: str) -> torch.dtype:
    """A reward's ``dtype`` option as a torch dtype (default float32), or a one-line error naming the reward."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype)
    key = dtype.replace("torch.", "").lower() if isinstance(dtype, str) else None
    if key not in DTYPES:
        raise options.invalid(f"reward '{reward_name}'", "dtype", dtype, "one of float32, float16, bfloat16 (or null)")
    return DTYPES[key]


class Saturation(torch.nn.Module):
    """Mean HSV saturation ``(max_c - min_c) / (max_c + eps)`` over pixels, in [0, 1]. Needs no weights."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = options.number("reward 'saturation'", "eps", eps, minimum=0, exclusive_minimum=True)

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        high = images.amax(dim=1)
        low = images.amin(dim=1)
        return ((high - low) / (high + self.eps)).mean(dim=(1, 2))


class Contrast(torch.nn.Module):
    """Standard deviation of the luma (ITU-R BT.601 weights) over pixels, in [0, 0.5]. Needs no weights."""

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
        luma = torch.einsum("bchw,c->bhw", images, weights)
        return luma.flatten(1).std(dim=1)


def call_reward(name: str, reward: RewardFn, images: torch.Tensor, prompts: list[str],
                metadata: list[dict]) -> torch.Tensor:
    """Call one reward and check the contract: a float tensor of shape ``[B]`` (a TRL-style
    ``(rewards, reward_metadata)`` tuple is accepted). Raises a one-line :class:`PluginError` otherwise."""
    out = reward(images, prompts, metadata)
    if isinstance(out, tuple) and len(out) == 2:  # TRL's reward_fn returns (rewards, reward_metadata)
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"reward '{name}' returned {type(out).__name__}, expected a torch.Tensor of shape "
                          f"[{images.shape[0]}]; make it return one score per image")
    if out.shape != (images.shape[0],):
        raise PluginError(f"reward '{name}' returned shape {list(out.shape)}, expected [{images.shape[0]}] "
                          f"(one score per image); reduce it per image")
    if not out.is_floating_point():
        raise PluginError(f"reward '{name}' returned dtype {out.dtype}, expected a floating-point tensor")
    if images.requires_grad and out.grad_fn is None:
        raise PluginError(f"reward '{name}' is not differentiable (its output has no grad_fn): compute it with "
                          "torch ops on the input images, without torch.no_grad(), .detach(), .item() or numpy")
    return out.float()


def freeze(reward: Any, device: torch.device | str | None = None) -> Any:
    """Move a reward model to ``device`` and freeze it: eval mode, no parameter gradients."""
    if isinstance(reward, torch.nn.Module):
        if device is not None:
            reward.to(device)
        reward.eval()
        reward.requires_grad_(False)
    return reward
