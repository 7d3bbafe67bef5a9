"""Differentiable image preprocessing that reproduces the reference PIL pipelines of CLIP-style reward models.

All functions take float images ``[B, 3, H, W]`` in ``[0, 1]`` (any H, W) and keep the autograd graph.
Resizing is bicubic with antialiasing, like PIL's ``Image.BICUBIC`` used by CLIP / open_clip / transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: OpenAI CLIP normalisation (also used by open_clip's OpenAI/laion models, PickScore, HPSv2).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased resize to exactly ``height`` x ``width``; output stays in ``[0, 1]``."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Scale so the shorter side is ``size`` (aspect ratio kept, as torchvision/PIL ``Resize(size)``)."""
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return resize(images, new_h, new_w)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size`` x ``size`` crop, rounding offsets like torchvision's ``CenterCrop``."""
    h, w = images.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


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


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's reference pipeline: shortest side to ``size`` (bicubic), center crop, normalise."""
    return normalize(center_crop(resize_shortest_side(images, size), size), mean, std)
