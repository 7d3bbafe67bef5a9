"""The stable API for alignprop plugin authors: a plugin imports from this module only.

Everything else in ``alignprop_core`` is internal and may change in any release; the names below keep their
signatures and behaviour. The hooks themselves are documented in :mod:`alignprop_core.hookspecs` and
``docs/plugins.md``; ``plugins/example-reward`` is a complete minimal plugin.

- :data:`hookimpl` marks the hook implementations of a plugin module.
- :class:`PluginError` (a :class:`AlignPropError`; :class:`ConfigError` is the config's) carries one-line messages
  that the CLI prints as ``error: ...``; :func:`first_line` and :func:`error_text` shorten a caught exception,
  :func:`weights_only_error` one from ``torch.load(weights_only=True)``.
- :class:`FrozenReward` is the base class for rewards: always in eval mode, parameters never require grad.
- :func:`projected_features` takes the embedding out of a transformers ``get_*_features`` result (4.x or 5.x);
  :func:`parse_dtype` reads a ``dtype`` option; :func:`looks_like_path` tells local paths from hub ids.
- Option checkers (:func:`number`, :func:`string`, :func:`choice`, :func:`path`, :func:`read_text`,
  :func:`folder_or_hub_id`, :func:`invalid`, :func:`describe`) validate a factory's options in one-line errors.
- Differentiable preprocessing (:func:`resize`, :func:`resize_shortest_side`, :func:`resize_longest_side_pad`,
  :func:`normalize`, :func:`image_processor_preprocess`, :func:`read_image_processor_config`, :func:`check_images`,
  :func:`check_prompts`, :data:`CLIP_MEAN`, :data:`CLIP_STD`, :data:`CLIP_PROCESSOR_CONFIG`) reproduces reference PIL
  pipelines.
"""

from alignprop_core.errors import AlignPropError, ConfigError, PluginError, first_line, weights_only_error
from alignprop_core.hookspecs import hookimpl
from alignprop_core.options import (
    choice,
    describe,
    error_text,
    folder_or_hub_id,
    invalid,
    looks_like_path,
    number,
    path,
    read_text,
    string,
)
from alignprop_core.preprocess import (
    CLIP_MEAN,
    CLIP_PROCESSOR_CONFIG,
    CLIP_STD,
    check_images,
    check_prompts,
    image_processor_preprocess,
    normalize,
    read_image_processor_config,
    resize,
    resize_longest_side_pad,
    resize_shortest_side,
)
from alignprop_core.rewards import FrozenReward, parse_dtype, projected_features

__all__ = [
    # hooks and errors
    "hookimpl", "AlignPropError", "ConfigError", "PluginError", "first_line", "error_text", "weights_only_error",
    # rewards
    "FrozenReward", "parse_dtype", "projected_features", "looks_like_path",
    # option checkers
    "number", "string", "choice", "path", "read_text", "folder_or_hub_id", "invalid", "describe",
    # preprocessing
    "resize", "resize_shortest_side", "resize_longest_side_pad", "normalize", "image_processor_preprocess",
    "read_image_processor_config", "check_images", "check_prompts", "CLIP_MEAN", "CLIP_STD", "CLIP_PROCESSOR_CONFIG",
]
