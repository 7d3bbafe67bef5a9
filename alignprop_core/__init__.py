"""alignprop: align text-to-image diffusion models with differentiable rewards (AlignProp, arXiv 2310.03739).

Heavy modules (torch, diffusers) load lazily: ``from alignprop_core import AlignPropTrainer`` imports them on use.
"""

from alignprop_core.config import AlignPropConfig, PluginSpec, RewardSpec
from alignprop_core.errors import AlignPropError, ConfigError, PluginError
from alignprop_core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["AlignPropConfig", "AlignPropTrainer", "AlignPropError", "ConfigError", "PluginError", "PluginSpec",
           "RewardSpec", "build_tiny_pipeline", "build_tiny_sdxl_pipeline", "hookimpl", "__version__"]


def __getattr__(name: str):
    if name == "AlignPropTrainer":
        from alignprop_core.trainer import AlignPropTrainer

        return AlignPropTrainer
    if name in ("build_tiny_pipeline", "build_tiny_sdxl_pipeline"):
        from alignprop_core import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module 'alignprop_core' has no attribute {name!r}")
