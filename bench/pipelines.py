"""The pipelines the benchmarks train: tiny SD-1.x at a given latent size (CPU), or full-size SD 1.5 (GPU mode).

Both are random-init, built from configs and saved with ``save_pretrained``, so alignprop and the TRL peer load the
*same folder* through their ordinary ``from_pretrained`` path. The SD 1.5 architecture comes from the published
configs in ``bench/sd15/*.json`` (no download); its tokenizer is alignprop's character-level CLIP tokenizer (ids stay
within the real vocabulary, and random weights make the vocabulary irrelevant for cost).
"""

from __future__ import annotations

import json
from pathlib import Path

SD15_DIR = Path(__file__).resolve().parent / "sd15"


def _config(name: str) -> dict:
    data = json.loads((SD15_DIR / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build_sd15_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Random-init SD 1.5 (UNet 860M, VAE 84M, text encoder 123M parameters) saved to ``path``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from alignprop_core.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**_config("vae")), text_encoder=CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))),
        tokenizer=tiny_clip_tokenizer(), unet=UNet2DConditionModel(**_config("unet")),
        scheduler=DDIMScheduler(**_config("scheduler")), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
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
