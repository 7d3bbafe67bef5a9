"""Tiny random-weight pipelines of every family that has one (``alignprop:tiny-sd``, ...), built from configs for
offline demos and tests, and the cache that serves them as ``pretrained_model`` ids.

The builders live with their families (``Family.build_tiny``): real architectures (UNet2DConditionModel, a KL VAE
with a factor of 8, CLIP text encoders, each family's scheduler) at toy sizes, saved with ``save_pretrained`` so that
everything downstream loads them through the ordinary ``from_pretrained`` path, with no file or network needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from alignprop_core.families import FAMILIES, SD, SDXL, TINY_MODEL_ID, TINY_SDXL_MODEL_ID, Family  # noqa: F401
from alignprop_core.families.tiny_parts import tiny_clip_tokenizer  # noqa: F401 (public name)

TINY_VERSION = 1  # bump when a tiny architecture changes, so cached copies are rebuilt

#: tiny model id -> its family
TINY_MODELS: dict[str, Family] = {family.tiny_id: family for family in FAMILIES if family.tiny_id}

build_tiny_pipeline = SD.build_tiny  # the tiny SD-1.x pipeline (path, seed=0, sample_size=16) -> path
build_tiny_sdxl_pipeline = SDXL.build_tiny  # the tiny SDXL pipeline


def tiny_families() -> dict[str, Family]:
    """Family name -> family, for the families with a tiny pipeline (``tiny-pipeline --family``)."""
    return {family.name: family for family in TINY_MODELS.values()}


def check_tiny_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """A folder the tiny pipeline may be written to: new or empty, or any folder with ``overwrite``."""
    from alignprop_core.errors import ConfigError
    from alignprop_core.paths import check_output_dir

    folder = check_output_dir(path, "tiny-pipeline PATH")
    if folder.is_dir() and not overwrite and any(folder.iterdir()):
        raise ConfigError(f"tiny-pipeline PATH: folder '{path}' is not empty; choose a new or empty folder, or pass "
                          "--overwrite to write the pipeline files into it")
    return folder


def tiny_model_path(model: str, cache_dir: str | os.PathLike | None = None) -> Optional[Path]:
    """The cached folder of tiny model id ``model`` (``alignprop:tiny-sd``, ...), or None for any other id."""
    family = TINY_MODELS.get(model) if isinstance(model, str) else None
    return None if family is None else tiny_pipeline_path(cache_dir, kind=family.name)


def build_tiny(path: str | os.PathLike, family: str = SD.name, overwrite: bool = False) -> Path:
    """Check ``path`` (see :func:`check_tiny_target`), then build the tiny pipeline of ``family`` (a name of
    :func:`tiny_families`) in it."""
    from alignprop_core.errors import ConfigError

    families = tiny_families()
    if family not in families:
        raise ConfigError(f"family: got {family!r}, allowed: one of {', '.join(families)}")
    folder = check_tiny_target(path, overwrite)
    return families[family].build_tiny(folder)


def tiny_pipeline_path(cache_dir: str | os.PathLike | None = None, kind: str = SD.name) -> Path:
    """Folder of the shared tiny pipeline of family ``kind`` (a name of :func:`tiny_families`), building it on
    first use.

    Cached under ``$ALIGNPROP_CACHE`` (default ``~/.cache/alignprop``); built into a temporary folder and renamed,
    so an interrupted build is never picked up.
    """
    family = tiny_families()[kind]
    root = Path(cache_dir or os.environ.get("ALIGNPROP_CACHE") or Path.home() / ".cache" / "alignprop")
    path = root / f"tiny-{kind}-v{TINY_VERSION}"
    if (path / "model_index.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tiny-{kind}-v{TINY_VERSION}.tmp-{os.getpid()}"
    family.build_tiny(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
