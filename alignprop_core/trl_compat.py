"""TRL drop-in names: code written for TRL 0.23's ``AlignPropTrainer`` runs with one import line changed::

    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline   # before
    from trl.models.auxiliary_modules import aesthetic_scorer                             # before
    from alignprop_core.trl_compat import (AlignPropConfig, AlignPropTrainer,             # after
                                           DefaultDDPOStableDiffusionPipeline, aesthetic_scorer)

``AlignPropConfig`` and ``AlignPropTrainer`` are alignprop's own (TRL's field names and methods are theirs too);
this module adds TRL's pipeline wrapper and aesthetic scorer factory on alignprop's loading and reward code.
See docs/trl-migration.md for every difference.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import AlignPropError
from alignprop_core.trainer import AlignPropTrainer

__all__ = ["AlignPropConfig", "AlignPropTrainer", "DefaultDDPOStableDiffusionPipeline", "aesthetic_scorer"]


class DefaultDDPOStableDiffusionPipeline:
    """TRL's pipeline wrapper: a diffusers ``StableDiffusionPipeline`` as ``.sd_pipeline`` plus ``use_lora``.

    ``AlignPropTrainer`` reads both: ``use_lora=False`` trains every UNet parameter. ``pretrained_model_name`` is a
    hub id, a local pipeline folder or ``alignprop:tiny-sd``; loading goes through alignprop's loader (one-line
    errors, the maintained SD 1.5 id for ``runwayml/stable-diffusion-v1-5``).
    """

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True):
        from alignprop_core.pipelines import load_pipeline, resolve_model_path

        self.pretrained_model = pretrained_model_name
        self.pretrained_revision = pretrained_model_revision
        self.use_lora = bool(use_lora)
        self.sd_pipeline = load_pipeline(resolve_model_path(pretrained_model_name), pretrained_model_revision)

    # TRL's accessors for the pipeline's parts
    @property
    def unet(self):
        return self.sd_pipeline.unet

    @property
    def vae(self):
        return self.sd_pipeline.vae

    @property
    def tokenizer(self):
        return self.sd_pipeline.tokenizer

    @property
    def scheduler(self):
        return self.sd_pipeline.scheduler

    @property
    def text_encoder(self):
        return self.sd_pipeline.text_encoder

    def set_progress_bar_config(self, *args: Any, **kwargs: Any) -> None:
        self.sd_pipeline.set_progress_bar_config(*args, **kwargs)

    def save_pretrained(self, output_dir: str) -> None:
        """Without LoRA: the whole diffusers pipeline (trained UNet included) to ``output_dir``. With LoRA: the LoRA
        (``pytorch_lora_weights.safetensors``, load it with ``load_lora_weights``) and not the pipeline, whose UNet
        now holds peft layers that ``from_pretrained`` would not read back (TRL wrote that broken pipeline)."""
        from alignprop_core.lora import save_lora

        if getattr(self.sd_pipeline.unet, "peft_config", None):
            save_lora(self.sd_pipeline.unet, output_dir)
        else:
            self.sd_pipeline.save_pretrained(output_dir)


def aesthetic_scorer(hub_model_id: str = "trl-lib/ddpo-aesthetic-predictor",
                     model_filename: str = "aesthetic-model.pth",
                     clip_model: str | None = None) -> "TRLRewardFunction":
    """TRL's ``aesthetic_scorer(hub_model_id, model_filename)``: a reward function ``fn(images, prompts, metadata)
    -> (scores, {})`` built on the ``aesthetic`` reward plugin (frozen, reference-exact CLIP preprocessing; TRL's
    scorer trained CLIP's weights too and needed a GPU).

    ``hub_model_id`` is a hub repo or a local folder holding ``model_filename`` (the LAION predictor). When that
    folder also holds a CLIP checkpoint (``config.json``), it is used as the CLIP model, which lets the whole
    scorer load offline; otherwise ``clip_model`` or ``openai/clip-vit-large-patch14``. Needs
    ``pip install alignprop-reward-aesthetic``.
    """
    from alignprop_core import plugins

    folder = os.path.expanduser(str(hub_model_id))
    if os.path.isdir(folder):
        predictor = os.path.join(folder, model_filename)
        if not os.path.isfile(predictor):
            raise AlignPropError(f"aesthetic_scorer: '{folder}' has no '{model_filename}'; put the aesthetic "
                                 "predictor's state dict there or pass its file name as model_filename")
        if clip_model is None and os.path.isfile(os.path.join(folder, "config.json")):
            clip_model = folder
    else:
        from huggingface_hub import hf_hub_download

        try:
            predictor = hf_hub_download(hub_model_id, model_filename)
        except Exception as exc:
            raise AlignPropError(f"aesthetic_scorer: could not get '{model_filename}' from hub repo '{hub_model_id}' "
                                 f"({type(exc).__name__}); without network, pass a local folder holding it") from None
    options = {"predictor": predictor, **({"clip_model": clip_model} if clip_model else {})}
    return TRLRewardFunction(plugins.build("reward", "aesthetic", options))


class TRLRewardFunction(torch.nn.Module):
    """A reward plugin called TRL's way: ``fn(images, prompts, metadata) -> (scores [B], {})``. A module, so the
    trainer moves it to the device and freezes it like any reward model."""

    def __init__(self, reward: torch.nn.Module):
        super().__init__()
        self.reward = reward

    def forward(self, images: torch.Tensor, prompts: Any, metadata: Any) -> tuple[torch.Tensor, dict]:
        return self.reward(images, list(prompts), list(metadata)), {}
