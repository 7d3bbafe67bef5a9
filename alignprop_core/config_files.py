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
