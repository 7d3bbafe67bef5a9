"""Config files and bundled presets: reading YAML/TOML into a mapping of field: value, with one-line errors."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from alignprop_core.errors import ConfigError, first_line
from alignprop_core.hints import did_you_mean
from alignprop_core.paths import read_text
from alignprop_core.specs import parse_reward_shorthand


def preset_names() -> list[str]:
    """The bundled presets (``alignprop_core/presets/*.yaml``)."""
    folder = resources.files("alignprop_core").joinpath("presets")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """The mapping of bundled preset ``name``, or a one-line :class:`ConfigError` listing the presets."""
    if name not in preset_names():
        hint = did_you_mean(str(name), preset_names())
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(preset_names())}"
                          + (f"; {hint}" if hint else ""))
    with resources.as_file(resources.files("alignprop_core").joinpath("presets", f"{name}.yaml")) as path:
        return read_config_file(path)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML/TOML config file, or a one-line :class:`ConfigError`."""
    if not str(path).strip():
        raise ConfigError("config file: got an empty path; pass the path to a .yaml or .toml file")
    shown, path = path, Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config file '{shown}' is a folder; pass the path to a .yaml or .toml file")
    if not path.is_file():
        raise ConfigError(f"config file '{shown}' does not exist; pass the path to a .yaml or .toml file")
    text = read_text(path, f"config file '{shown}'", "pass a .yaml or .toml file")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:
        first = first_line(exc) or type(exc).__name__
        raise ConfigError(f"config file '{path}' is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                          f"{first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of field: value")
    return data


def coerce_text(name: str, kind: str, value: Any) -> Any:
    """Turn a command-line string (or YAML value) of config field ``name`` into its declared type ``kind`` (as
    written in the class, e.g. ``Optional[int]``); non-strings pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind.startswith("Optional") and text.lower() in ("", "none", "null") and (text or name != "output_dir"):
        return None  # but an empty output_dir stays empty (validate() refuses it): it would mean the default folder
    base = kind.removeprefix("Optional[").removesuffix("]")
    try:
        if base == "bool":
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}: expected {base}, got '{value}'") from None
    if base == "str":
        return value
    if name in ("rewards", "eval_rewards") and not text.startswith(("[", "{", "-")):
        return [parse_reward_shorthand(item) for item in text.split(",") if item.strip()]
    if name in ("image_loggers", "lora_target_modules") and not text.startswith(("[", "{", "-")):
        return [item.strip() for item in text.split(",") if item.strip()]
    if name == "truncated_rand_backprop_minmax" and not text.startswith("["):
        try:
            return [int(item) for item in text.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"{name}: expected two integers 'a,b', got '{value}'") from None
    if name == "prompts" and not text.startswith(("[", "{")):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: could not parse '{value}' as YAML") from None
