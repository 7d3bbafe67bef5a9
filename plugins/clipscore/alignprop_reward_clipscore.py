"""alignprop reward ``clip_score``: CLIPScore (Hessel et al. 2021), prompt-image agreement under CLIP ViT-L/14.

score_i = 100 * max(cos(image_embed(image_i), text_embed(prompt_i)), 0)     -- one score per (image, its prompt)

as torchmetrics' ``CLIPScore`` computes it for one pair (it clamps the batch mean; per pair the two agree). The
embeddings are the CLIPModel's projected features (``get_image_features`` / ``get_text_features``). Images go
through differentiable tensor ops that reproduce the processor's ``CLIPImageProcessor`` (shortest side to 224
bicubic, centre crop 224, CLIP normalisation; read from its preprocessor_config.json). Text: the CLIP tokenizer with
truncation to 77 tokens (the end-of-text token kept); embeddings are computed once per prompt and cached.

The clamp makes the gradient zero for a pair whose cosine is negative: such an image gets no push towards its
prompt. A trained CLIP gives an image and its own prompt a positive cosine unless they are unrelated.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from alignprop_core import plugin_api as api

REWARD_NAME = "clip_score"
OWNER = f"reward '{REWARD_NAME}'"
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
TEXT_MAX_LENGTH = 77
TEXT_CACHE_SIZE = 8192  # prompts kept (oldest dropped first); one embedding is 768 floats for ViT-L/14
SCALE = 100.0  # CLIPScore's w (torchmetrics: 100; Hessel et al. use 2.5 on a 0-1 scale)


class CLIPScoreReward(api.FrozenReward):
    """Frozen differentiable CLIPScore: ``reward(images [B,3,H,W] in [0,1], prompts [B], metadata) -> [B]``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocessing: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessing = dict(preprocessing)
        max_positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", TEXT_MAX_LENGTH)
        self.text_max_length = min(TEXT_MAX_LENGTH, int(max_positions))
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_options(cls, model: str = DEFAULT_MODEL, processor: str | None = None,
                     dtype: str | None = None) -> "CLIPScoreReward":
        """Build the reward.

        model: hub id or local folder of a transformers ``CLIPModel`` (default ``openai/clip-vit-large-patch14``).
        processor: hub id or local folder with its tokenizer and preprocessor_config.json (default: ``model``).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for the CLIP model.
        """
        from transformers import AutoTokenizer, CLIPModel

        torch_dtype = api.parse_dtype(dtype, REWARD_NAME)
        model = api.folder_or_hub_id(OWNER, "model", model, what="model folder",
                                     allowed=f"a hub id or a local copy of {DEFAULT_MODEL} (config.json + weights, "
                                     "with its tokenizer and preprocessor_config.json)")
        processor = model if processor is None else api.folder_or_hub_id(
            OWNER, "processor", processor, what="processor folder",
            allowed="a hub id or a local folder with the CLIP tokenizer files and preprocessor_config.json (or null "
            "for the model's own)")
        clip = _load(lambda path: CLIPModel.from_pretrained(path, dtype=torch_dtype), model, "model", "CLIPModel")
        tokenizer = _load(AutoTokenizer.from_pretrained, processor, "processor", "the tokenizer from")
        return cls(clip, tokenizer, api.read_image_processor_config(processor))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable equivalent of the processor's CLIPImageProcessor on ``[0,1]`` images."""
        return api.image_processor_preprocess(images, self.preprocessing)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``[B, D]`` of ``[0,1]`` images (differentiable)."""
        param = next(self.model.parameters())
        # resize/normalise in float32 (antialiased bicubic is not implemented for every half dtype), then cast
        pixels = self.preprocess(images.to(device=param.device, dtype=torch.float32)).to(param.dtype)
        embeds = api.projected_features(self.model.get_image_features(pixel_values=pixels)).float()
        return embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``, encoded once per distinct prompt and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            device = next(self.model.parameters()).device
            tokens = self.tokenizer(missing, padding=True, max_length=self.text_max_length, truncation=True,
                                    return_tensors="pt")
            embeds = api.projected_features(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))
            embeds = embeds.float() / torch.linalg.vector_norm(embeds.float(), dim=-1, keepdim=True)
            for prompt, embed in zip(missing, embeds):
                if len(self._text_cache) >= TEXT_CACHE_SIZE:
                    self._text_cache.pop(next(iter(self._text_cache)))
                self._text_cache[prompt] = embed
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        api.check_images(images, REWARD_NAME)
        api.check_prompts(prompts, images.shape[0], REWARD_NAME)
        image = self.embed_images(images)
        text = self.text_embeds(list(prompts)).to(image.device)
        return SCALE * (image * text).sum(dim=-1).clamp(min=0)


@api.hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        CLIPScoreReward.from_options,
        description="CLIPScore (CLIP ViT-L/14): 100 * max(cos(image, prompt), 0) per pair, as torchmetrics. "
        "options: model, processor, dtype",
        details={"source": DEFAULT_MODEL, "license": "MIT (OpenAI CLIP)",
                 "scale": "0-100, 100 * max(cos, 0)",
                 "input_size": "224x224 (shortest side, centre crop)",
                 "suits": "any family; prompt alignment (pair it with an aesthetic or preference reward)"},
    )


def _load(loader: Any, source: str, option: str, what: str) -> Any:
    """``loader(folder or hub id)`` with a one-line error that names the option."""
    try:
        return loader(source)
    except Exception as exc:
        where = "local folder" if os.path.isdir(source) else "hub id"
        raise api.AlignPropError(
            f"clip_score: could not load {what} {where} '{source}' ({api.error_text(exc)}); set options.{option} to a "
            f"local folder with a copy of {DEFAULT_MODEL}"
        ) from exc
