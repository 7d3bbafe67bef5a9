"""The FrozenReward base, the built-in weight-free rewards and the checks of the reward contract."""

from __future__ import annotations

from typing import Any, Callable

import torch

from alignprop_core import options
from alignprop_core.errors import PluginError

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


def projected_features(out: Any) -> torch.Tensor:
    """The embedding a transformers ``get_image_features`` / ``get_text_features`` call returned: the tensor itself
    (transformers < 5) or the ``pooler_output`` of its output object (5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


class FrozenReward(torch.nn.Module):
    """Base class for rewards: always in eval mode (no dropout), and its parameters never require grad.

    Submodules and parameters are frozen as they are assigned (``self.model = model``), so a subclass needs no
    ``freeze()`` call; ``train()`` stays in eval mode and ``requires_grad_()`` always turns gradients off.
    Gradients still flow through the reward to its input images.
    """

    def __init__(self) -> None:
        super().__init__()
        self.training = False

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if isinstance(value, torch.nn.Module):
            _freeze_module(value)

    def add_module(self, name: str, module: torch.nn.Module | None) -> None:
        super().add_module(name, module)
        if module is not None:
            _freeze_module(module)

    def register_parameter(self, name: str, param: torch.nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        if param is not None:
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenReward":
        """Eval mode whatever ``mode`` says: a reward is never trained."""
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "FrozenReward":
        """Parameters never require grad, whatever ``requires_grad`` says."""
        return super().requires_grad_(False)


def _freeze_module(module: torch.nn.Module) -> None:
    module.train(False)
    module.requires_grad_(False)


class Saturation(FrozenReward):
    """Mean HSV saturation ``(max_c - min_c) / (max_c + eps)`` over pixels, in [0, 1]. Needs no weights."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = options.number("reward 'saturation'", "eps", eps, minimum=0, exclusive_minimum=True)

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        high = images.amax(dim=1)
        low = images.amin(dim=1)
        return ((high - low) / (high + self.eps)).mean(dim=(1, 2))


class Contrast(FrozenReward):
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
