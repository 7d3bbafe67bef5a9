"""The pipelines the benchmarks train: tiny SD-1.x at a given latent size (CPU), full-size SD 1.5 and SDXL (GPU).

All are random-init, built from configs. Saved with ``save_pretrained``, alignprop and the TRL peer load the *same
folder* through their ordinary ``from_pretrained`` path. The SD 1.5 and SDXL-base architectures come from the
published configs in ``bench/sd15/*.json`` and ``bench/sdxl/*.json`` (no download); their tokenizers are alignprop's
character-level CLIP tokenizer (ids stay within the real vocabulary, and random weights make the vocabulary
irrelevant for cost).
"""

from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _config(name: str, model: str = "sd15") -> dict:
    data = json.loads((BENCH / model / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def sd15_pipeline():
    """Random-init SD 1.5 (UNet 860M, VAE 84M, text encoder 123M parameters) on the current default device and
    dtype."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from alignprop_core.tiny import tiny_clip_tokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL(**_config("vae")), text_encoder=CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))),
        tokenizer=tiny_clip_tokenizer(), unet=UNet2DConditionModel(**_config("unet")),
        scheduler=DDIMScheduler(**_config("scheduler")), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl_pipeline():
    """Random-init SDXL base 1.0 (UNet 2.57B, CLIP-L 123M, OpenCLIP bigG 695M, VAE 84M parameters) on the current
    default device and dtype, with DDIM (alignprop's sampler for SDXL)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from alignprop_core.tiny import tiny_clip_tokenizer

    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**_config("vae", "sdxl")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_config("text_encoder", "sdxl"))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2", "sdxl"))),
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
        unet=UNet2DConditionModel(**_config("unet", "sdxl")), scheduler=DDIMScheduler(**_config("scheduler", "sdxl")))


def build_sd15_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Random-init SD 1.5 saved to ``path``."""
    import torch

    torch.manual_seed(seed)
    sd15_pipeline().save_pretrained(path, safe_serialization=True)
    return Path(path)


def build(kind: str, root: Path) -> Path:
    """``tiny16`` / ``tiny32`` (latent size 16 or 32: 128 or 256 px) or ``sd15`` (latent 64: 512 px), under root."""
    path = root / kind
    if (path / "model_index.json").exists():
        return path
    if kind == "sd15":
        return build_sd15_pipeline(path)
    from alignprop_core.tiny import build_tiny_pipeline

    return build_tiny_pipeline(path, sample_size=int(kind.removeprefix("tiny")))


def latent_size(kind: str) -> int:
    return 64 if kind == "sd15" else int(kind.removeprefix("tiny"))
