"""Checks on the paths a command reads or writes, made before anything is created: each fails with one line."""

from __future__ import annotations

import os
from pathlib import Path

from alignprop_core.errors import AlignPropError, ConfigError


def _nonempty(path: str | os.PathLike | None, option: str) -> Path:
    """``path`` as a Path; an empty string (which would mean the current folder) is an error."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{option}: got an empty path; give a file or folder name")
    return Path(path)


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` (itself or a parent) that exists."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _check_creatable(path: Path, option: str) -> None:
    """``path`` does not exist yet: its nearest existing parent must be a writable folder."""
    ancestor = _existing_ancestor(path.absolute())
    if not ancestor.is_dir():
        raise ConfigError(f"{option}: '{ancestor}' is a file, so '{path}' cannot be created inside it; choose a "
                          "path under a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: cannot write to '{ancestor}' (permission denied); choose another path")


def check_input_file(path: str | os.PathLike | None, option: str, fix: str) -> Path:
    """An existing regular file, or a one-line error ending with ``fix``."""
    file = _nonempty(path, option)
    if file.is_dir():
        raise ConfigError(f"{option}: '{path}' is a folder, not a file; {fix}")
    if not file.is_file():
        raise ConfigError(f"{option}: '{path}' does not exist; {fix}")
    return file


def check_output_file(path: str | os.PathLike | None, option: str, overwrite: bool = False) -> Path:
    """A file path that can be written: its folder exists; an existing file is replaced only with ``overwrite``."""
    file = _nonempty(path, option)
    if file.is_dir():
        raise ConfigError(f"{option}: '{path}' is a folder, not a file; give a file path")
    if file.exists() and not overwrite:
        raise ConfigError(f"{option}: '{path}' already exists; pass --overwrite to replace it, or choose another path")
    parent = file.absolute().parent
    if not parent.exists():
        raise ConfigError(f"{option}: folder '{file.parent}' does not exist; create it first or choose another path")
    if not parent.is_dir():
        raise ConfigError(f"{option}: '{file.parent}' is a file, not a folder; choose a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise ConfigError(f"{option}: cannot write to '{path}' (permission denied); choose another path")
    return file


def check_output_dir(path: str | os.PathLike | None, option: str) -> Path:
    """A folder that exists or can be created (missing parents included); nothing is created here."""
    folder = _nonempty(path, option)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option}: '{path}' is a file, not a folder; choose a folder path")
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{option}: cannot write to '{path}' (permission denied); choose another folder")
    else:
        _check_creatable(folder, option)
    return folder


def write_text_atomically(file: Path, text: str) -> None:
    """Write ``text`` to ``file`` through a temporary file and a rename, so an existing file is never half-written."""
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write '{file}' ({exc.strerror or exc}); choose another path") from None


def read_text(file: Path, what: str, fix: str, error: type[AlignPropError] = ConfigError) -> str:
    """The UTF-8 text of ``file`` (a byte-order mark dropped); unreadable, binary or non-UTF-8 content is a one-line
    ``error`` naming ``what`` (e.g. "prompts file 'p.txt'") and ending with ``fix``."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise error(f"{what} cannot be read ({exc.strerror or exc}); {fix}") from None
    if b"\x00" in data:
        raise error(f"{what} is a binary file, not text; {fix}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                    f"{fix}") from None
