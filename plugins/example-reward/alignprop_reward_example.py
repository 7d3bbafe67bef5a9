"""An example alignprop reward plugin: ``warmth`` = mean(red) - mean(blue), differentiable, needs no weights.

Everything a reward plugin needs is here: a factory taking the config's ``options`` and a ``register_rewards``
hook implementation, published in the ``alignprop`` entry-point group by this package's pyproject.toml. A plugin
imports from ``alignprop_core.plugin_api`` only: the rest of alignprop_core is internal.
"""

import torch

from alignprop_core import plugin_api as api


class Warmth(api.FrozenReward):
    """Mean red minus mean blue, in [-1, 1]; ``target`` (optional) rewards closeness to a warmth instead."""

    def __init__(self, target: float | None = None):
        super().__init__()
        # check options when the reward is built: one line naming the reward, the option and what is allowed
        self.target = api.number("reward 'warmth'", "target", target, minimum=-1, maximum=1, optional=True)

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        warmth = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
        return warmth if self.target is None else -(warmth - self.target).abs()


@api.hookimpl
def register_rewards(register):
    register("warmth", Warmth, "mean(red) - mean(blue); option: target",
             details={"source": "no weights", "license": "Apache-2.0", "scale": "[-1, 1]",
                      "input_size": "any (every pixel)", "suits": "any family; an example to copy"})
