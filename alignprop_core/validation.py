"""Low-level checks of config values, each failing with a one-line :class:`ConfigError` that names the field, the
value and what is allowed; also the checks of the keyword arguments handed to accelerate."""

from __future__ import annotations

from typing import Any

from alignprop_core.errors import ConfigError
from alignprop_core.hints import did_you_mean

FLOAT32_MAX = 3.4028234663852886e38
MAX_SEED = 2**32 - 1  # numpy's global seed (accelerate.set_seed seeds it) must be below 2**32
HUB_ID_RULES = ("letters, digits, '-', '_' and '.', at most 96 characters, not starting or ending with '-' or '.', no "
                "'--' or '..'")
#: Accelerator arguments that config fields set; giving them in ``accelerator_kwargs`` too is an error.
ACCELERATOR_ARGS_FROM_FIELDS = {"mixed_precision": "mixed_precision", "gradient_accumulation_steps":
                                "train_gradient_accumulation_steps", "log_with": "log_with",
                                "project_config": "project_kwargs", "project_dir": "output_dir"}


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}, allowed: {allowed}")



def type_name(tp: Any) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def check_type(name: str, value: Any, tp: Any) -> None:
    kind = type_name(tp)
    if kind.startswith("Optional["):
        if value is None:
            return
        kind = kind[len("Optional["):-1]
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(kind)
    if expected is None:
        if kind.startswith("dict") and not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        if kind.startswith("list") and not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        return
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, expected):
        raise ConfigError(f"{name}: expected {kind}, got {value!r} ({type(value).__name__})")


def is_hub_id(value: str) -> bool:
    """Whether ``value`` is a valid Hugging Face Hub repo id (huggingface_hub raises a traceback on others)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_accelerator_kwargs(kwargs: dict[str, Any]) -> None:
    """Every key must be an ``accelerate.Accelerator`` argument that no config field sets already."""
    if not kwargs:
        return
    import inspect

    from accelerate import Accelerator

    parameters = inspect.signature(Accelerator.__init__).parameters
    allowed = set(parameters) - {"self", "kwargs"}
    for key, value in kwargs.items():
        if key in ACCELERATOR_ARGS_FROM_FIELDS:
            raise ConfigError(f"accelerator_kwargs: '{key}' is set by the config field "
                              f"'{ACCELERATOR_ARGS_FROM_FIELDS[key]}'; set that field instead")
        if key not in allowed:
            hint = did_you_mean(str(key), sorted(allowed))
            hint = f" ({hint})" if hint else ""
            raise ConfigError(f"accelerator_kwargs: unknown key '{key}'{hint}; allowed: the keyword arguments of "
                              "accelerate.Accelerator")
        if parameters[key].annotation in (bool, "bool"):
            require(isinstance(value, bool), f"accelerator_kwargs.{key}", value, "true or false")
        if key == "dynamo_backend" and value is not None:
            from accelerate.utils import DynamoBackend

            backends = [b.value.lower() for b in DynamoBackend]
            require(str(value).lower() in backends, "accelerator_kwargs.dynamo_backend", value,
                     "one of " + ", ".join(backends))
