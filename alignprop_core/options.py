"""Checks for the ``options`` of rewards and prompt sources, shared by the built-ins and the reward plugins.

Every check raises a one-line :class:`PluginError` that names the plugin (``owner``, e.g. ``"reward 'hps'"``), the
option, what it got and what is allowed, so factories can validate all their options before loading any weights.
Values come from YAML/TOML/the command line, so numbers written as strings (PyYAML reads ``1e-3`` as a string) are
accepted where a number is expected.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

from alignprop_core.errors import AlignPropError, PluginError, error_text  # noqa: F401 (part of the option helpers)

_MAX_SHOWN = 80  # characters of a bad value shown in a message


def describe(value: Any) -> str:
    """A short rendering of a bad value for a message: ``'abc'``, ``-1``, ``[1, 2] (a list)``."""
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN - 3] + "..."
    if value is None or isinstance(value, (str, float)) or (isinstance(value, int) and not isinstance(value, bool)):
        return text
    kind = type(value).__name__
    return f"{text} (a{'n' if kind[:1].lower() in 'aeiou' else ''} {kind})"


def invalid(owner: str, option: str, value: Any, allowed: str) -> PluginError:
    """``<owner>: option '<option>' must be <allowed>, got <value>`` as a :class:`PluginError`."""
    return PluginError(f"{owner}: option '{option}' must be {allowed}, got {describe(value)}")


def number(owner: str, option: str, value: Any, *, integer: bool = False, minimum: float | None = None,
           maximum: float | None = None, exclusive_minimum: bool = False, optional: bool = False) -> Any:
    """``value`` as a finite float (or an int with ``integer``) within the bounds; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    allowed = _number_text(integer, minimum, maximum, exclusive_minimum) + (" (or null)" if optional else "")
    parsed: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parsed = float(value)
    elif isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            parsed = None
    if parsed is None or not math.isfinite(parsed) or (integer and not parsed.is_integer()):
        raise invalid(owner, option, value, allowed)
    too_low = minimum is not None and (parsed <= minimum if exclusive_minimum else parsed < minimum)
    if too_low or (maximum is not None and parsed > maximum):
        raise invalid(owner, option, value, allowed)
    return int(parsed) if integer else parsed


def _number_text(integer: bool, minimum: float | None, maximum: float | None, exclusive_minimum: bool) -> str:
    noun = "an integer" if integer else "a number"
    show = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")
    if minimum is not None and maximum is not None:
        return f"{noun} in {'(' if exclusive_minimum else '['}{show(minimum)}, {show(maximum)}]"
    if minimum is not None:
        return f"{noun} {'>' if exclusive_minimum else '>='} {show(minimum)}"
    if maximum is not None:
        return f"{noun} <= {show(maximum)}"
    return noun if integer else "a finite number"


def string(owner: str, option: str, value: Any, *, allowed: str = "a non-empty string",
           optional: bool = False) -> str | None:
    """``value`` as a non-empty, stripped string; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise invalid(owner, option, value, allowed + (" (or null)" if optional else ""))
    return value.strip()


def choice(owner: str, option: str, value: Any, choices: Iterable[str], *, optional: bool = False) -> str | None:
    """``value`` if it is one of ``choices`` (compared as strings); ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    choices = [str(c) for c in choices]
    allowed = "one of " + ", ".join(choices) + (" (or null)" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) not in choices:
        raise invalid(owner, option, value, allowed)
    return str(value)


def _fix(option: str, allowed: str) -> str:
    return f"set the '{option}' option to {allowed}" if option else f"give {allowed}"


def path(owner: str, option: str, value: Any, *, kind: str = "file", what: str = "file", allowed: str = "",
         optional: bool = False, error: type[AlignPropError] = PluginError) -> Path | None:
    """An existing file (``kind="file"``) or folder (``kind="folder"``), ``~`` expanded; ``None`` passes when
    ``optional``. ``what`` names the thing in messages ("prompt file"), ``allowed`` says what to give instead.
    ``option`` may be empty for a path that is not a plugin option (then the message says "give ...")."""
    allowed = allowed or f"a {kind} path"
    prefix = f"{owner}: " if owner else ""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or not value.isprintable():  # no newlines in the message
        subject = f"option '{option}'" if option else what
        null = " (or null)" if optional and "null" not in allowed else ""
        raise error(f"{prefix}{subject} must be {allowed}{null}, got {describe(value)}")
    found = Path(value).expanduser()
    fix = _fix(option, allowed)
    if not found.exists():
        raise error(f"{prefix}{what} '{value}' does not exist; {fix}")
    if kind == "file" and found.is_dir():
        raise error(f"{prefix}{what} '{value}' is a folder, not a file; {fix}")
    if kind == "folder" and not found.is_dir():
        raise error(f"{prefix}{what} '{value}' is a file, not a folder; {fix}")
    if kind == "file" and not found.is_file():
        raise error(f"{prefix}{what} '{value}' is not a regular file; {fix}")
    return found


def read_text(owner: str, option: str, file: Path, *, what: str = "file", allowed: str = "a UTF-8 text file",
              error: type[AlignPropError] = PluginError) -> str:
    """The UTF-8 text of ``file`` (checked with :func:`path` first), or a one-line error for a binary or
    unreadable file (``paths.read_text`` with the plugin's wording)."""
    from alignprop_core.paths import read_text as read_checked

    prefix = f"{owner}: " if owner else ""
    return read_checked(file, f"{prefix}{what} '{file}'", _fix(option, allowed), error)


def looks_like_path(value: str) -> bool:
    """True for things only a local path can be: hub ids are ``owner/name`` (or a bare ``name``)."""
    return (
        value.startswith(("/", ".", "~"))
        or "\\" in value
        or value.count("/") > 1
        or value.lower().endswith((".pth", ".pt", ".bin", ".safetensors", ".json"))
    )


def folder_or_hub_id(owner: str, option: str, value: Any, *, what: str = "folder", allowed: str = "") -> str:
    """A local folder (returned ``~``-expanded) or a syntactically valid Hugging Face hub id (returned as is).
    Files, missing local paths and strings that cannot be hub ids are one-line errors; nothing is downloaded."""
    allowed = allowed or "a hub id (owner/name) or a local folder"
    text = string(owner, option, value, allowed=allowed)
    local = Path(text).expanduser()
    if local.exists() or looks_like_path(text):
        return str(path(owner, option, text, kind="folder", what=what, allowed=allowed))
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise PluginError(f"{owner}: option '{option}' must be {allowed}, got {describe(value)} (neither an existing "
                          "folder nor a valid hub id)") from None
    return text
