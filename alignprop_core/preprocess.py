"""Differentiable image preprocessing that reproduces the reference PIL pipelines of CLIP-style reward models.

All functions take float images ``[B, 3, H, W]`` in ``[0, 1]`` (any H, W) and keep the autograd graph.
Resizing is bicubic with antialiasing, like PIL's ``Image.BICUBIC`` used by CLIP / open_clip / transformers.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from alignprop_core.errors import AlignPropError

#: OpenAI CLIP normalisation (also used by open_clip's OpenAI/laion models, PickScore, HPSv2).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased resize to exactly ``height`` x ``width``, like PIL: a width pass, then a height pass,
    clamped to ``[0, 1]`` after each (a single 2-D pass is up to 2.5/255 off PIL; this is within ~1/255 for
    aspect-keeping resizes). When one side grows and the other shrinks, PIL may run the passes the other way round:
    then up to ~3.5/255 off."""
    if images.shape[-1] != width:
        images = F.interpolate(images, size=(images.shape[-2], width), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    if images.shape[-2] != height:
        images = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    return images


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Scale so the shorter side is ``size`` (aspect ratio kept, as torchvision/PIL ``Resize(size)``)."""
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return resize(images, new_h, new_w)


def resize_longest_side_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Scale so the longer side is ``size``, then pad to a centred square with ``fill`` (open_clip's
    ``ResizeKeepRatio``-free "longest" resize + ``CenterCropOrPad`` as used by HPSv2)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    images = resize(images, new_h, new_w)
    pad_top = (size - new_h) // 2
    pad_left = (size - new_w) // 2
    return F.pad(images, (pad_left, size - new_w - pad_left, pad_top, size - new_h - pad_top), value=fill)


def normalize(images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
              ) -> torch.Tensor:
    """``(images - mean) / std`` per channel (default: OpenAI CLIP's statistics)."""
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


# ---------------------------------------------------------------------- transformers image processors

#: OpenAI CLIP's ``CLIPImageProcessor`` settings, the fallback when a checkpoint ships none.
CLIP_PROCESSOR_CONFIG = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_normalize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "resample": 3,
}


def read_image_processor_config(source: str, fallback: dict | None = None) -> dict:
    """The image-processor settings (``preprocessor_config.json``, or transformers 5's ``processor_config.json``)
    of a local folder or hub id, merged over ``fallback`` (default: OpenAI CLIP's) and with sizes as dicts."""
    found: dict = {}
    local = os.path.expanduser(str(source))
    for name in ("preprocessor_config.json", "processor_config.json"):
        try:
            if os.path.isdir(local):
                path = os.path.join(local, name)
                if not os.path.isfile(path):
                    continue
            else:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(str(source), name)
            with open(path, encoding="utf-8") as handle:
                found = json.load(handle)
            break
        except Exception:  # not shipped, or hub unreachable: try the next name, then the fallback
            continue
    if isinstance(found.get("image_processor"), dict):  # processor_config.json nests it
        found = found["image_processor"]
    merged = dict(fallback or CLIP_PROCESSOR_CONFIG)
    merged.update({k: v for k, v in found.items() if k in CLIP_PROCESSOR_CONFIG})
    for key in ("size", "crop_size"):
        if isinstance(merged.get(key), int):
            value = merged[key]
            merged[key] = {"shortest_edge": value} if key == "size" else {"height": value, "width": value}
    if merged.get("resample", 3) not in (None, 3):
        warnings.warn(f"image processor of '{source}' uses resample={merged['resample']}; rewards resize bicubic (3)")
    return merged


def image_processor_preprocess(images: torch.Tensor, config: dict) -> torch.Tensor:
    """Differentiable equivalent of a transformers ``CLIPImageProcessor``-style pipeline described by ``config``
    (as returned by :func:`read_image_processor_config`): resize (shortest edge, or exact height/width), center crop
    with transformers' floor offsets (zero-padding when the image is smaller), normalise."""
    size = config.get("size") or {}
    if config.get("do_resize", True):
        if size.get("shortest_edge"):
            images = resize_shortest_side(images, int(size["shortest_edge"]))
        elif size.get("height") and size.get("width"):
            images = resize(images, int(size["height"]), int(size["width"]))
    crop = config.get("crop_size") or {}
    if config.get("do_center_crop", True) and crop.get("height") and crop.get("width"):
        height, width = int(crop["height"]), int(crop["width"])
        h, w = images.shape[-2:]
        if height > h or width > w:
            pad_h, pad_w = max(height - h, 0), max(width - w, 0)
            images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
            h, w = images.shape[-2:]
        top, left = (h - height) // 2, (w - width) // 2
        images = images[..., top:top + height, left:left + width]
    if config.get("do_normalize", True):
        images = normalize(images, tuple(config["image_mean"]), tuple(config["image_std"]))
    return images


def check_prompts(prompts: Any, count: int, reward_name: str) -> None:
    """Raise a one-line :class:`AlignPropError` unless ``prompts`` is a list of ``count`` prompts (one per image)."""
    if isinstance(prompts, str) or len(prompts) != count:
        n = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise AlignPropError(f"{reward_name}: got {count} images but {n}; pass one prompt per image (a list)")


def check_images(images: Any, reward_name: str) -> None:
    """Raise a one-line :class:`AlignPropError` unless ``images`` is a float tensor ``[B, 3, H, W]``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AlignPropError(f"{reward_name}: expected images as a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise AlignPropError(f"{reward_name}: expected float images in [0, 1], got dtype {images.dtype}; "
                             "convert with x / 255")
