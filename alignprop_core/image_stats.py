"""Weight-free signs of reward hacking in a set of images: how alike they are (diversity) and the statistics that
drift when a reward is over-optimised (blown-out colours, dark or burnt-out pixels, grid patterns).

For images ``x`` in ``[0, 1]`` (``[N, 3, H, W]``) with luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601):

    image_brightness            = mean Y
    image_saturation            = mean (max(R, G, B) - min(R, G, B)) / max(R, G, B)   (HSV; 0 for black)
    image_dark_fraction         = share of pixels with Y < 0.05
    image_blown_out_fraction    = share of pixels with Y > 0.95
    image_high_frequency_energy = sum of |FFT2(Y - mean Y)|^2 above half the Nyquist frequency / the sum over
                                  all frequencies (radial frequency > 0.25 cycles per pixel); a grid raises it

Diversity is the mean pairwise distance between image features ``f``:
``d(i, j) = ||f_i - f_j||_2 / sqrt(D)``, averaged over the pairs of images of the same prompt (different seeds:
``diversity_within_prompt``) and over the pairs of different prompts (``diversity_across_prompts``). The default
features are the images themselves, area-downsampled to 32 x 32 (``D = 3 * 32 * 32``, so ``d`` is an RMS pixel
difference in ``[0, 1]``); a reward plugin's ``embed_images(images) -> [N, D]`` can replace them (its embedding
L2-normalised first). A collapsed model (the same image for every prompt) drives both towards 0.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from alignprop_core.eval_metrics import IMAGE_STATISTICS

__all__ = ["IMAGE_STATISTICS", "diversity", "image_statistics", "pixel_features"]

FEATURE_SIZE = 32


def _luma(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return 0.299 * r + 0.587 * g + 0.114 * b


@torch.no_grad()
def image_statistics(images: torch.Tensor) -> dict[str, float]:
    """The statistics of the module docstring, each a mean over all ``images`` (``[N, 3, H, W]`` in ``[0, 1]``)."""
    images = images.detach().float().clamp(0, 1)
    luma = _luma(images)
    high, low = images.amax(1), images.amin(1)
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))
    centred = luma - luma.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centred).abs().pow(2)
    fy = torch.fft.fftfreq(luma.shape[-2], device=luma.device)[:, None]
    fx = torch.fft.fftfreq(luma.shape[-1], device=luma.device)[None, :]
    high_band = (fy.pow(2) + fx.pow(2)).sqrt() > 0.25
    total = power.sum(dim=(-2, -1))
    share = torch.where(total > 0, (power * high_band).sum(dim=(-2, -1)) / total.clamp_min(1e-30),
                        torch.zeros_like(total))
    values = (luma.mean(), saturation.mean(), (luma < 0.05).float().mean(), (luma > 0.95).float().mean(),
              share.mean())
    return {name: value.item() for name, value in zip(IMAGE_STATISTICS, values)}


@torch.no_grad()
def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3 * 32 * 32]``: the images area-downsampled to 32 x 32 (upsampled bilinearly when smaller)."""
    images = images.detach().float().clamp(0, 1)
    small = min(images.shape[-2:]) < FEATURE_SIZE
    resized = torch.nn.functional.interpolate(images, size=(FEATURE_SIZE, FEATURE_SIZE),
                                              mode="bilinear" if small else "area",
                                              **({"align_corners": False} if small else {}))
    return resized.flatten(1)


@torch.no_grad()
def diversity(images: torch.Tensor, prompts: Sequence[str],
              embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
    """``{"diversity_within_prompt", "diversity_across_prompts"}`` (NaN where the set has no such pair) of
    ``images`` ``[N, 3, H, W]``, image ``i`` rendered for ``prompts[i]``; ``embed`` replaces the pixel features."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"diversity: {images.shape[0]} images but {len(prompts)} prompts")
    if embed is None:
        features = pixel_features(images)
    else:
        features = torch.nn.functional.normalize(embed(images).detach().float().flatten(1), dim=1)
    distances = torch.cdist(features, features) / math.sqrt(features.shape[1])
    ids = {prompt: index for index, prompt in enumerate(dict.fromkeys(prompts))}
    labels = torch.tensor([ids[p] for p in prompts], device=features.device)
    pairs = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
    same = labels[:, None] == labels[None, :]

    def mean(mask: torch.Tensor) -> float:
        return distances[mask].mean().item() if bool(mask.any()) else float("nan")

    return {"diversity_within_prompt": mean(pairs & same), "diversity_across_prompts": mean(pairs & ~same)}
