"""Views: score a reward over several crops of each image, so that every pixel of a large image gets a gradient.

A reward model looks at about 224 px. On a 1024 px image its reference preprocessing (resize, centre crop) leaves
most pixels with almost no gradient, or none at all outside the crop. A reward entry's ``views`` option scores V
views of each image and averages::

    score(image) = 1/V * sum_v r(view_v(image))

- ``center`` (default): the image itself, one view; the reward's own reference preprocessing decides what it sees.
- ``tiles:N``: square tiles of side ``s = min(H, W) // N``, N across the shorter side and
  ``ceil(long / s)`` along the longer one, spread evenly from edge to edge (neighbours overlap where ``long`` is not
  a multiple of ``s``), so the tiles cover every pixel and a centre crop of a tile drops nothing.
  ``V = N * ceil(N * long / short)``: 1024x768 with ``tiles:2`` is 2 x 3 tiles of 384 px.
- ``random_crops:N`` (or ``random_crops:N:F``): N square crops of side ``F * min(H, W)`` (default F = 0.5) at random
  positions. Positions are drawn from a generator seeded by the batch's pixel sum: they change every step, and the
  same images get the same crops again (resume, re-scoring), with no RNG state to save.

All views of a batch have one size, so the reward sees them as one batch of ``V * B`` images (its memory grows V
times); prompts and metadata are repeated per view (``reward_set.score_views``). This module only parses the option
and places the views; it imports no torch, so the CLI and the config stay light.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from alignprop_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

VIEW_KINDS = ("center", "tiles", "random_crops")
HELP = "center, tiles:N (N tiles across the shorter side) or random_crops:N[:F] (N crops of F x the shorter side)"
DEFAULT_CROP_FRACTION = 0.5
MIN_VIEW_SIDE = 16  # a reward upsamples its input to ~224 px: smaller views are a mistake, not a setting


@dataclass(frozen=True)
class Views:
    """A parsed ``views`` option."""

    kind: str = "center"
    count: int = 1
    fraction: float = DEFAULT_CROP_FRACTION

    def __str__(self) -> str:
        if self.kind == "center":
            return "center"
        if self.kind == "tiles":
            return f"tiles:{self.count}"
        return f"random_crops:{self.count}" + (f":{self.fraction:g}" if self.fraction != DEFAULT_CROP_FRACTION else "")


def parse_views(value: Any, owner: str) -> Views:
    """``views`` of a reward entry as :class:`Views`, or a one-line :class:`ConfigError` naming ``owner``."""
    if value is None or isinstance(value, Views):
        return value or Views()
    bad = ConfigError(f"{owner}: views {value!r} is not valid; write {HELP}")
    if not isinstance(value, str):
        raise bad
    kind, *numbers = [part.strip() for part in value.strip().split(":")]
    if kind not in VIEW_KINDS or (kind == "center") != (not numbers) or len(numbers) > (2 if kind != "tiles" else 1):
        raise bad
    if kind == "center":
        return Views()
    try:
        count = int(numbers[0])
        fraction = float(numbers[1]) if len(numbers) > 1 else DEFAULT_CROP_FRACTION
    except ValueError:
        raise bad from None
    if not 1 <= count <= 64 or not 0 < fraction <= 1:
        raise ConfigError(f"{owner}: views {value!r}: N must be 1-64 and F in (0, 1]; write {HELP}")
    return Views(kind, count, fraction)


def _spread(length: int, side: int, count: int) -> list[int]:
    """``count`` start offsets of windows of ``side`` from 0 to ``length - side``, evenly spread."""
    if count == 1:
        return [(length - side) // 2]
    return [round(i * (length - side) / (count - 1)) for i in range(count)]


def view_boxes(views: Views, height: int, width: int,
               images: Optional[torch.Tensor] = None) -> list[tuple[int, int, int]]:
    """``(top, left, side)`` of every view of an ``height x width`` image (all views share one side); random crops
    are placed by a generator seeded from the pixel sum of ``images``."""
    short, long = min(height, width), max(height, width)
    side = short // views.count if views.kind == "tiles" else round(views.fraction * short)
    if side < MIN_VIEW_SIDE:
        raise ConfigError(f"views {views}: {height}x{width} images give {side} px views, under {MIN_VIEW_SIDE} px; "
                          "use fewer tiles or a larger crop fraction")
    if views.kind == "tiles":
        across, along = _spread(short, side, views.count), _spread(long, side, math.ceil(long / side))
        pairs = [(a, b) for a in across for b in along]
        return [(a, b, side) if height <= width else (b, a, side) for a, b in pairs]
    draw = random.Random(repr(images.detach().double().sum().item()) if images is not None else 0)
    return [(draw.randint(0, height - side), draw.randint(0, width - side), side) for _ in range(views.count)]
