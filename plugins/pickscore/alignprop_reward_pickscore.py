"""alignprop reward ``pickscore``: PickScore v1 (a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences).

score_i = exp(logit_scale) * cos(text_embed(prompt_i), image_embed(image_i))   -- one score per (image, prompt)
pair, i.e. the diagonal of the image-text similarity matrix (exp(logit_scale) = 100 for PickScore).
Images are preprocessed with differentiable tensor ops that reproduce the processor's ``CLIPImageProcessor``
(shortest side to 224 bicubic, center crop 224, CLIP normalisation; read from its preprocessor_config.json).
Text: the processor's CLIP tokenizer, padding to max_length 77 with truncation. Text embeddings are cached per prompt.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from alignprop_core import plugin_api as api

REWARD_NAME = "pickscore"
OWNER = f"reward '{REWARD_NAME}'"
DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TEXT_MAX_LENGTH = 77
TEXT_CACHE_SIZE = 8192  # prompts kept (oldest dropped first); one embedding is 1024 floats for PickScore


class PickScoreReward(api.FrozenReward):
    """Frozen differentiable PickScore: ``reward(images [B,3,H,W] in [0,1], prompts [B], metadata) -> [B]``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocessing: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessing = dict(preprocessing)
        max_positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", TEXT_MAX_LENGTH)
        self.text_max_length = min(TEXT_MAX_LENGTH, int(max_positions))
        self._text_cache: dict[str, torch.Tensor] = {}

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
        from transformers import AutoTokenizer, CLIPModel

        torch_dtype = api.parse_dtype(dtype, REWARD_NAME)
        model = api.folder_or_hub_id(OWNER, "model", model, what="model folder",
                                     allowed=f"a hub id or a local copy of {DEFAULT_MODEL} (config.json + model "
                                     "weights)")
        processor = api.folder_or_hub_id(OWNER, "processor", processor, what="processor folder",
                                         allowed=f"a hub id or a local copy of {DEFAULT_PROCESSOR} (the CLIP "
                                         "tokenizer files + preprocessor_config.json)")
        clip = _load(lambda path: CLIPModel.from_pretrained(path, dtype=torch_dtype), model, "model", DEFAULT_MODEL,
                     "CLIPModel")
        tokenizer = _load(AutoTokenizer.from_pretrained, processor, "processor", DEFAULT_PROCESSOR,
                          "the tokenizer from")
        return cls(clip, tokenizer, api.read_image_processor_config(processor))

    # --------------------------------------------------------------------------------------------- pieces
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable equivalent of the processor's CLIPImageProcessor on ``[0,1]`` images."""
        return api.image_processor_preprocess(images, self.preprocessing)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (differentiable)."""
        embeds = api.projected_features(self.model.get_image_features(pixel_values=pixel_values))
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
            embeds = api.projected_features(
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


@api.hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        PickScoreReward.from_options,
        description="PickScore v1 (CLIP ViT-H/14 preference model): exp(logit_scale) * cos(text, image) per pair. "
        "options: model, processor, dtype",
        details={"source": "yuvalkirstain/PickScore_v1, processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 "license": "MIT (PickScore repository)",
                 "scale": "100 x cosine, in [-100, 100]",
                 "input_size": "224x224 (shortest side, centre crop)",
                 "suits": "any family; human preference incl. prompt alignment"},
    )


# ----------------------------------------------------------------------------------------------- loading
def _load(loader: Any, source: str, option: str, default: str, what: str) -> Any:
    """``loader(folder or hub id)`` (``source`` checked by :func:`api.folder_or_hub_id`), with a one-line error
    that names the option."""
    try:
        return loader(source)
    except Exception as exc:
        where = "local folder" if os.path.isdir(source) else "hub id"
        raise api.AlignPropError(
            f"pickscore: could not load {what} {where} '{source}' ({api.error_text(exc)}); "
            f"set options.{option} to a local folder with a copy of {default}"
        ) from exc


def _check_inputs(images: Any, prompts: Any) -> None:
    api.check_images(images, REWARD_NAME)
    api.check_prompts(prompts, images.shape[0], REWARD_NAME)
