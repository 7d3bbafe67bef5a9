"""Base models by name: the default model, aliases of removed hub ids, the pipeline class a local folder declares,
and the scheduler table (re-exported from :mod:`alignprop_core.schedulers`). The model families themselves are in
:mod:`alignprop_core.families`.

This module imports no torch or diffusers at import time (the config and the CLI use its name tables).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from alignprop_core.errors import ConfigError
from alignprop_core.schedulers import SCHEDULERS, check_scheduler_name, make_scheduler  # noqa: F401 (public names)
from alignprop_core.tiny import TINY_MODELS

#: The default base model: Stable Diffusion 1.5 as maintained on the hub since runwayml's copy was removed (2024).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: Hub ids that no longer exist -> their maintained copies (used with a one-line note).
MODEL_ALIASES = {"runwayml/stable-diffusion-v1-5": DEFAULT_MODEL}


def default_output_dir(pretrained_model: str) -> str:
    """``output_dir`` when none is given: one folder per tiny demo model (``alignprop:tiny-sd`` ->
    ``alignprop-tiny-sd-output``), so the demos never replace each other."""
    if isinstance(pretrained_model, str) and pretrained_model in TINY_MODELS:
        return f"alignprop-{pretrained_model.partition(':')[2]}-output"
    return "alignprop-output"


def pipeline_class_name(path: str | os.PathLike) -> Optional[str]:
    """``_class_name`` from a local pipeline folder's ``model_index.json``; a one-line :class:`ConfigError` when
    that file is not readable JSON (a corrupt file is not an "unknown class")."""
    index = Path(path) / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = "is not valid JSON" if isinstance(exc, ValueError) else f"cannot be read ({exc.strerror or exc})"
        raise ConfigError(f"pretrained_model: '{index}' {reason}; re-save the pipeline with pipe.save_pretrained "
                          "or download it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pretrained_model: '{index}' is not a diffusers model index (expected a JSON object)")
    name = data.get("_class_name")
    return name if isinstance(name, str) else None

