"""HPSv2 / HPSv2.1 (Human Preference Score) as a differentiable alignprop reward.

HPS is an open_clip ``ViT-H-14`` fine-tuned on human preference pairs. The score of an (image, prompt) pair is
the cosine similarity of the L2-normalised image and text features (no ``logit_scale``), exactly what
``hpsv2.score`` computes (it reports the diagonal of ``image_features @ text_features.T``).

The architecture is built offline with ``open_clip.create_model(arch, pretrained=None)`` (the laion base weights
are never needed) and the HPS checkpoint is loaded on top of it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from alignprop_core import plugin_api as api

#: Default weights: hub repository and file per version.
HUB_REPO = "xswu/HPSv2"
HUB_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_VERSION = "v2.1"
DEFAULT_ARCHITECTURE = "ViT-H-14"
OWNER = "reward 'hps'"


def _resolve_checkpoint(version: str, checkpoint: os.PathLike | None) -> str:
    """Local path of the HPS checkpoint: ``checkpoint`` (already checked to be a file) if given, else the hub file for
    ``version``."""
    if checkpoint is not None:
        return str(checkpoint)
    filename = HUB_FILES[version]
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(HUB_REPO, filename)
    except Exception as exc:
        raise api.AlignPropError(
            f"hps: could not load '{filename}' from the Hugging Face hub repo '{HUB_REPO}' "
            f"({type(exc).__name__}); download it and set the reward option 'checkpoint' to its local path"
        ) from exc


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model weights of an HPS checkpoint (``{"state_dict": ...}`` or a plain state dict, maybe DDP-prefixed)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise api.AlignPropError(
            f"hps: cannot read checkpoint '{path}' with torch.load(weights_only=True) "
            f"({api.weights_only_error(exc)}); point the option "
            "'checkpoint' at an HPS .pt file"
        ) from exc
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise api.AlignPropError(
            f"hps: checkpoint '{path}' holds no state dict (expected a dict of tensors, or one under 'state_dict'); "
            "point the option 'checkpoint' at an HPS .pt file"
        )
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _architecture_name(architecture: Any) -> str:
    """Registered open_clip model-config name for ``architecture`` (a config name, or the path of a model-config
    JSON file, which is checked and registered)."""
    import open_clip

    allowed = (f"an open_clip model-config name (default {DEFAULT_ARCHITECTURE}) or the path of an open_clip "
               "model-config .json file")
    name = api.string(OWNER, "architecture", architecture, allowed=allowed)
    if not (name.lower().endswith(".json") or api.looks_like_path(name)):
        if name not in open_clip.list_models():
            raise api.AlignPropError(
                f"hps: unknown open_clip architecture '{name}'; set the option 'architecture' to an open_clip "
                f"model-config name (default {DEFAULT_ARCHITECTURE}) or to the path of a model-config .json file"
            )
        return name
    path = api.path(OWNER, "architecture", name, kind="file", what="architecture file", allowed=allowed)
    text = api.read_text(OWNER, "architecture", path, what="architecture file", allowed=allowed)
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise api.PluginError(f"{OWNER}: architecture file '{name}' is not valid JSON ({exc}); set the 'architecture' "
                              f"option to {allowed}") from None
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg")
               if not isinstance(config, dict) or key not in config]
    if missing:
        raise api.PluginError(f"{OWNER}: architecture file '{name}' is not an open_clip model config (missing "
                              f"{', '.join(missing)}); set the 'architecture' option to {allowed}")
    open_clip.add_model_config(str(path))
    return path.stem


def _create_model(name: str) -> torch.nn.Module:
    """The open_clip architecture ``name`` with random weights (no download)."""
    import open_clip

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": the HPS weights come next
    try:
        return open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(previous)


class HPSReward(api.FrozenReward):
    """``reward(images, prompts, metadata) -> Tensor[B]``: HPS cosine score of each image with its prompt."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, version: str = DEFAULT_VERSION):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        image_size = model.visual.image_size
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_options(
        cls,
        version: str = DEFAULT_VERSION,
        checkpoint: str | None = None,
        architecture: str = DEFAULT_ARCHITECTURE,
    ) -> "HPSReward":
        """Build the frozen reward. ``version``: ``v2`` or ``v2.1``; ``checkpoint``: local .pt overriding the hub
        file; ``architecture``: open_clip model-config name or config .json path (default ``ViT-H-14``)."""
        version = api.choice(OWNER, "version", version, HUB_FILES)
        checkpoint = api.path(OWNER, "checkpoint", checkpoint, kind="file", what="checkpoint file", optional=True,
                              allowed=f"a local {HUB_FILES[version]} file, or null to download it from {HUB_REPO}")
        name = _architecture_name(architecture)  # every option is checked before anything large is read
        path = _resolve_checkpoint(version, checkpoint)
        state_dict = _load_state_dict(path)

        import open_clip

        model = _create_model(name)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1:3]
            raise api.AlignPropError(
                f"hps: checkpoint '{path}' does not fit the open_clip architecture '{name}' "
                f"({'; '.join(s.strip() for s in first)[:300]}); set the option 'architecture' to the model the "
                "checkpoint was trained with"
            ) from exc
        tokenizer = open_clip.get_tokenizer(name)
        return cls(model, tokenizer, version)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable HPS preprocessing: longest side to the model size (bicubic), centred zero pad, CLIP norm."""
        padded = api.resize_longest_side_pad(images, self.image_size, fill=0.0)
        return api.normalize(padded, api.CLIP_MEAN, api.CLIP_STD)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text features ``[B, D]``, cached per prompt text."""
        param = next(self.model.parameters())
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tokens = self.tokenizer(missing).to(param.device)
            features = self.model.encode_text(tokens, normalize=True)
            for prompt, feature in zip(missing, features):
                self._text_cache[prompt] = feature
        return torch.stack([self._text_cache[p].to(param.device, param.dtype) for p in prompts])

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise api.AlignPropError(f"hps: expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise api.AlignPropError(f"hps: got {images.shape[0]} images but {len(prompts)} prompts")
        param = next(self.model.parameters())
        pixels = self.preprocess(images.to(device=param.device, dtype=param.dtype))
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.text_features(list(prompts))
        return (image_features * text_features).sum(dim=-1).float()


@api.hookimpl
def register_rewards(register):
    register(
        "hps",
        HPSReward.from_options,
        description="HPSv2/HPSv2.1 human preference score (open_clip ViT-H-14): cosine(image, prompt)",
        details={"source": "xswu/HPSv2 (HPS_v2.1_compressed.pt / HPS_v2_compressed.pt)",
                 "license": "Apache-2.0 (HPSv2 repository)",
                 "scale": "cosine in [-1, 1] (papers report it x100; v2 and v2.1 are not comparable)",
                 "input_size": "224x224 (longest side, zero pad)",
                 "suits": "any family; human preference incl. prompt alignment (SD 1.x/SDXL era images)"},
    )
