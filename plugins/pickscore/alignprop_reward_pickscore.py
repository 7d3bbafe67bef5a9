"""alignprop reward ``pickscore``: PickScore v1 (a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences).

score_i = exp(logit_scale) * cos(text_embed(prompt_i), image_embed(image_i))   -- one score per (image, prompt)
pair, i.e. the diagonal of the image-text similarity matrix (exp(logit_scale) = 100 for PickScore).
Images are preprocessed with differentiable tensor ops that reproduce the processor's ``CLIPImageProcessor``
(shortest side to 224 bicubic, center crop 224, CLIP normalisation; read from its preprocessor_config.json).
Text: the processor's CLIP tokenizer, padding to max_length 77 with truncation. Text embeddings are cached per prompt.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F

from alignprop_core.errors import AlignPropError
from alignprop_core.hookspecs import hookimpl

REWARD_NAME = "pickscore"
DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TEXT_MAX_LENGTH = 77
TEXT_CACHE_SIZE = 8192  # prompts kept (oldest dropped first); one embedding is 1024 floats for PickScore
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class PickScoreReward(torch.nn.Module):
    """Frozen differentiable PickScore: ``reward(images [B,3,H,W] in [0,1], prompts [B], metadata) -> [B]``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocessing: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessing = dict(preprocessing)
        max_positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", TEXT_MAX_LENGTH)
        self.text_max_length = min(TEXT_MAX_LENGTH, int(max_positions))
        self._text_cache: dict[str, torch.Tensor] = {}
        self.freeze()

    # The reward is never trained: keep it in eval mode with frozen parameters whatever the caller does.
    def freeze(self) -> "PickScoreReward":
        super().train(False)
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "PickScoreReward":
        return super().train(False)

    @classmethod
    def from_options(
        cls,
        model: str = DEFAULT_MODEL,
        processor: str = DEFAULT_PROCESSOR,
        dtype: str | None = None,
    ) -> "PickScoreReward":
        """Build the reward.

        model: HF hub id or local folder of the PickScore ``CLIPModel`` (default ``yuvalkirstain/PickScore_v1``).
        processor: HF hub id or local folder with the CLIP tokenizer and preprocessor_config.json
            (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the processor PickScore was trained with).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for the CLIP model.
        """
        torch_dtype = _parse_dtype(dtype)
        clip = _load_clip_model(model, torch_dtype)
        tokenizer = _load_tokenizer(processor)
        return cls(clip, tokenizer, _read_preprocessing(processor))

    # --------------------------------------------------------------------------------------------- pieces
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable equivalent of the processor's CLIPImageProcessor on ``[0,1]`` images."""
        return _clip_image_processor_tensor(images, self.preprocessing)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (differentiable)."""
        embeds = _features(self.model.get_image_features(pixel_values=pixel_values))
        return embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``, encoded once per distinct prompt and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            device = next(self.model.parameters()).device
            tokens = self.tokenizer(
                missing, padding="max_length", max_length=self.text_max_length, truncation=True, return_tensors="pt"
            )
            embeds = _features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
                )
            ).float()
            embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
            for prompt, embed in zip(missing, embeds):
                if len(self._text_cache) >= TEXT_CACHE_SIZE:
                    self._text_cache.pop(next(iter(self._text_cache)))
                self._text_cache[prompt] = embed
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        _check_inputs(images, prompts)
        param = next(self.model.parameters())
        # resize/normalise in float32 (antialiased bicubic is not implemented for every half dtype), then cast
        pixel_values = self.preprocess(images.to(device=param.device, dtype=torch.float32)).to(param.dtype)
        image = self.image_embeds(pixel_values).float()
        text = self.text_embeds(list(prompts)).to(device=image.device, dtype=image.dtype)
        # per pair: the diagonal of logit_scale * text @ image.T
        return self.model.logit_scale.exp().float() * (image * text).sum(dim=-1)


@hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        PickScoreReward.from_options,
        description="PickScore v1 (CLIP ViT-H/14 preference model): exp(logit_scale) * cos(text, image) per pair. "
        "options: model, processor, dtype",
    )


# ----------------------------------------------------------------------------------------------- loading
def _parse_dtype(dtype: str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise AlignPropError(f"pickscore: unknown dtype '{dtype}'; use float32, float16 or bfloat16")
    return _DTYPES[key]


def _features(out: Any) -> torch.Tensor:
    """transformers <5 returns the projected embedding; 5.x an output object with it in ``pooler_output``."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def _looks_like_path(value: str) -> bool:
    """True for things only a local path can be: hub ids are ``owner/name`` (or a bare ``name``)."""
    return (
        value.startswith(("/", ".", "~"))
        or "\\" in value
        or value.count("/") > 1
        or value.lower().endswith((".pth", ".pt", ".bin", ".safetensors", ".json"))
    )


def _resolve_source(source: str, option: str, default: str, what: str) -> str:
    source = str(source)
    local = os.path.expanduser(source)
    if os.path.exists(local):
        if not os.path.isdir(local):
            raise AlignPropError(
                f"pickscore: {option} '{source}' is a file; set options.{option} to a folder holding {what} "
                f"(a local copy of {default}) or a hub id"
            )
        return local
    if _looks_like_path(source):
        raise AlignPropError(
            f"pickscore: {option} folder '{source}' does not exist; set options.{option} to a local copy of "
            f"{default} ({what}) or to a hub id"
        )
    return source


def _load_clip_model(source: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPModel

    path = _resolve_source(source, "model", DEFAULT_MODEL, "config.json + model weights")
    try:
        return CLIPModel.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        where = "local folder" if os.path.isdir(path) else "hub id"
        raise AlignPropError(
            f"pickscore: could not load CLIPModel {where} '{source}' ({type(exc).__name__}: {_first_line(exc)}); "
            f"set options.model to a local folder with a copy of {DEFAULT_MODEL}"
        ) from exc


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    path = _resolve_source(source, "processor", DEFAULT_PROCESSOR, "the CLIP tokenizer files + preprocessor_config.json")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        where = "local folder" if os.path.isdir(path) else "hub id"
        raise AlignPropError(
            f"pickscore: could not load the tokenizer from {where} '{source}' ({type(exc).__name__}: "
            f"{_first_line(exc)}); set options.processor to a local folder with a copy of {DEFAULT_PROCESSOR}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ----------------------------------------------------------------------------------------------- preprocessing
_DEFAULT_PREPROCESSING = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_normalize": True,
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
}


def _read_preprocessing(source: str) -> dict[str, Any]:
    """The image-processor settings of ``source``: its preprocessor_config.json (local folder or hub file).

    Falls back to OpenAI CLIP's (224 shortest side, crop 224, CLIP mean/std) when there is none.
    """
    config: dict[str, Any] = {}
    local = os.path.expanduser(str(source))
    for name in ("preprocessor_config.json", "processor_config.json"):  # transformers 5 saves the latter
        try:
            if os.path.isdir(local):
                path = os.path.join(local, name)
                if not os.path.isfile(path):
                    continue
            else:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(str(source), name)
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            break
        except Exception:  # not shipped (or hub unreachable): try the next name, then OpenAI CLIP defaults
            continue
    if isinstance(config.get("image_processor"), dict):  # processor_config.json nests it
        config = config["image_processor"]
    merged = dict(_DEFAULT_PREPROCESSING)
    merged.update({k: v for k, v in config.items() if k in _DEFAULT_PREPROCESSING or k == "resample"})
    for key in ("size", "crop_size"):
        value = merged.get(key)
        if isinstance(value, int):
            merged[key] = {"shortest_edge": value} if key == "size" else {"height": value, "width": value}
    if merged.get("resample", 3) not in (None, 3):
        import warnings

        warnings.warn(f"pickscore: image processor uses resample={merged['resample']}; the reward resizes bicubic (3)")
    return merged


def _resize_like_pil(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize done like PIL: width first, then height, clipping to [0, 1] after each pass.

    PIL (and torchvision on uint8) resamples in two separable passes and clips the intermediate image; a single
    2-D ``interpolate`` keeps the first pass's bicubic overshoot and lands up to ~2.5/255 further from PIL.
    """
    if images.shape[-1] != width:
        images = F.interpolate(images, size=(images.shape[-2], width), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    if images.shape[-2] != height:
        images = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    return images


def _resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size``, longer side ``int(size * long / short)`` (transformers/torchvision rounding)."""
    h, w = images.shape[-2:]
    if h <= w:
        return _resize_like_pil(images, size, int(size * w / h))
    return _resize_like_pil(images, int(size * h / w), size)


def _center_crop_floor(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' center crop: offsets rounded down ((H - h) // 2); zero-pads first if the image is smaller."""
    h, w = images.shape[-2:]
    if height > h or width > w:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top:top + height, left:left + width]


def _clip_image_processor_tensor(images: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    from alignprop_core.preprocess import normalize

    size = cfg.get("size") or {}
    if cfg.get("do_resize", True):
        if size.get("shortest_edge"):
            images = _resize_shortest_side(images, int(size["shortest_edge"]))
        elif size.get("height") and size.get("width"):
            images = _resize_like_pil(images, int(size["height"]), int(size["width"]))
    crop = cfg.get("crop_size") or {}
    if cfg.get("do_center_crop", True) and crop.get("height") and crop.get("width"):
        images = _center_crop_floor(images, int(crop["height"]), int(crop["width"]))
    if cfg.get("do_normalize", True):
        images = normalize(images, tuple(cfg["image_mean"]), tuple(cfg["image_std"]))
    return images


def _check_inputs(images: Any, prompts: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AlignPropError(f"pickscore: expected images as a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise AlignPropError(f"pickscore: expected float images in [0, 1], got dtype {images.dtype}; convert with x / 255")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise AlignPropError(f"pickscore: got {images.shape[0]} images but {n}; pass one prompt per image (a list)")
