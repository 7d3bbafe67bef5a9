"""alignprop reward ``aesthetic``: the LAION improved aesthetic predictor v2 (linearMSE) on CLIP ViT-L/14.

score = MLP( e / ||e|| ),  e = CLIP image embedding (vision tower + visual projection, 768-d for ViT-L/14),
MLP = Linear(768,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1) Linear(64,16)
Linear(16,1), no activations (the predictor's own architecture, state-dict keys ``layers.{0,2,4,6,7}``).
Images are preprocessed with differentiable tensor ops that reproduce the CLIP model's ``CLIPImageProcessor``
(shortest side to 224 bicubic, center crop 224, CLIP normalisation; read from its preprocessor_config.json).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from alignprop_core import plugin_api as api

REWARD_NAME = "aesthetic"
OWNER = f"reward '{REWARD_NAME}'"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_PREDICTOR_REPO = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_PREDICTOR_FILE = "aesthetic-model.pth"
_MLP_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


# ----------------------------------------------------------------------------------------------- model parts
class AestheticMLP(torch.nn.Module):
    """The LAION predictor head. Layer widths follow the checkpoint (768-1024-128-64-16-1 for the real one)."""

    def __init__(self, dims: tuple[int, int, int, int, int] = (768, 1024, 128, 64, 16)):
        super().__init__()
        d0, d1, d2, d3, d4 = dims
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d0, d1),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(d1, d2),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(d2, d3),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(d3, d4),
            torch.nn.Linear(d4, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str) -> "AestheticMLP":
        missing = [k for k in _MLP_KEYS if k not in state]
        if missing:
            raise api.AlignPropError(
                f"aesthetic: '{source}' is not a LAION aesthetic predictor state dict (missing {', '.join(missing[:4])}"
                f"{'...' if len(missing) > 4 else ''}); set options.predictor to sac+logos+ava1-l14-linearMSE.pth"
            )
        dims = tuple(int(state[f"layers.{i}.weight"].shape[1]) for i in (0, 2, 4, 6, 7))
        mlp = cls(dims)  # type: ignore[arg-type]
        try:
            mlp.load_state_dict({k: state[k].float() for k in _MLP_KEYS})
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise api.AlignPropError(
                f"aesthetic: predictor '{source}' has inconsistent layer shapes ({first})"
            ) from exc
        return mlp


class AestheticReward(api.FrozenReward):
    """Frozen differentiable aesthetic score: ``reward(images [B,3,H,W] in [0,1], prompts, metadata) -> [B]``."""

    def __init__(self, vision_model: torch.nn.Module, mlp: AestheticMLP, preprocessing: dict[str, Any]):
        super().__init__()
        self.vision_model = vision_model
        self.mlp = mlp
        self.preprocessing = dict(preprocessing)

    @classmethod
    def from_options(
        cls,
        clip_model: str = DEFAULT_CLIP_MODEL,
        predictor: str | None = None,
        dtype: str | None = None,
    ) -> "AestheticReward":
        """Build the reward.

        clip_model: HF hub id or local folder of a transformers CLIP checkpoint (CLIPModel or
            CLIPVisionModelWithProjection); only the image tower is loaded.
        predictor: local ``.pth``/``.safetensors`` state dict of the LAION predictor; ``None`` downloads
            ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth`` from the hub.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for the CLIP tower (the MLP stays float32).
        """
        torch_dtype = api.parse_dtype(dtype, REWARD_NAME)
        clip_model = api.folder_or_hub_id(OWNER, "clip_model", clip_model, what="clip_model folder",
                                          allowed=f"a hub id or a local folder with a copy of {DEFAULT_CLIP_MODEL} "
                                          "(config.json + weights)")
        predictor_path = api.path(OWNER, "predictor", predictor, kind="file", what="predictor file", optional=True,
                                  allowed=f"a local copy of {DEFAULT_PREDICTOR_REPO}/{DEFAULT_PREDICTOR_FILE} (or "
                                  "sac+logos+ava1-l14-linearMSE.pth), or null to download that file")
        mlp = AestheticMLP.from_state_dict(*_load_predictor_state(predictor_path))  # small: before the CLIP tower
        vision_model, embed_dim = _load_clip_image_tower(clip_model, torch_dtype)
        in_dim = mlp.layers[0].in_features
        if in_dim != embed_dim:
            raise api.AlignPropError(
                f"aesthetic: the predictor expects {in_dim}-d CLIP embeddings but clip_model '{clip_model}' produces "
                f"{embed_dim}-d ones; use the CLIP model the predictor was trained on (ViT-L/14: {DEFAULT_CLIP_MODEL})"
            )
        return cls(vision_model, mlp, api.read_image_processor_config(clip_model))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable equivalent of the CLIP model's image processor on ``[0,1]`` images."""
        return api.image_processor_preprocess(images, self.preprocessing)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values)
        return out.image_embeds if hasattr(out, "image_embeds") else out[0]

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """The L2-normalised CLIP image embeddings ``[B, D]`` the score is computed from (also the features of
        ``eval_diversity_features: aesthetic``)."""
        api.check_images(images, REWARD_NAME)
        param = next(self.vision_model.parameters())
        # resize/normalise in float32 (antialiased bicubic is not implemented for every half dtype), then cast
        pixel_values = self.preprocess(images.to(device=param.device, dtype=torch.float32)).to(param.dtype)
        embeds = self.image_embeds(pixel_values).float()
        return embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None, metadata: list[dict] | None = None):
        embeds = self.embed_images(images)
        mlp_param = next(self.mlp.parameters())
        return self.mlp(embeds.to(mlp_param.dtype)).squeeze(-1).float()


@api.hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        AestheticReward.from_options,
        description="LAION aesthetic predictor v2 (linearMSE MLP) on CLIP ViT-L/14 image embeddings; ~1-10 scale. "
        "options: clip_model, predictor, dtype",
        details={"source": "openai/clip-vit-large-patch14 + trl-lib/ddpo-aesthetic-predictor (aesthetic-model.pth)",
                 "license": "CLIP: MIT; predictor: Apache-2.0 (LAION improved-aesthetic-predictor)",
                 "scale": "LAION aesthetic score, trained on 1-10 ratings; prompt-independent",
                 "input_size": "224x224 (shortest side, centre crop)",
                 "suits": "any family; the AlignProp paper's main reward (aesthetics)"},
    )


# ----------------------------------------------------------------------------------------------- loading
def _load_clip_image_tower(source: str, dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
    """The CLIP vision tower + visual projection from a CLIPModel (or vision-only) checkpoint; text weights skipped."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    class _CLIPImageTower(CLIPVisionModelWithProjection):
        # A full CLIPModel checkpoint also holds the text tower: skip it silently instead of loading it.
        _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$",
                                              r"position_ids$"]

    try:
        config = AutoConfig.from_pretrained(source)
        if isinstance(config, CLIPConfig):
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
        elif isinstance(config, CLIPVisionConfig):
            vision_config = config
        else:
            raise api.AlignPropError(
                f"aesthetic: clip_model '{source}' is a '{config.model_type}' model, not CLIP; set options.clip_model "
                f"to {DEFAULT_CLIP_MODEL} or a local copy of it"
            )
        model = _CLIPImageTower.from_pretrained(source, config=vision_config, dtype=dtype)
    except api.AlignPropError:
        raise
    except Exception as exc:
        where = "local folder" if os.path.isdir(source) else "hub id"
        raise api.AlignPropError(
            f"aesthetic: could not load CLIP {where} '{source}' ({api.error_text(exc)}); "
            f"set options.clip_model to a local folder with a copy of {DEFAULT_CLIP_MODEL}"
        ) from exc
    return model, int(vision_config.projection_dim)


def _load_predictor_state(predictor: os.PathLike | None) -> tuple[dict[str, torch.Tensor], str]:
    """The predictor's state dict and where it came from: ``predictor`` (an existing file) or the hub file."""
    if predictor is None:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(DEFAULT_PREDICTOR_REPO, DEFAULT_PREDICTOR_FILE)
        except Exception as exc:
            raise api.AlignPropError(
                f"aesthetic: could not get {DEFAULT_PREDICTOR_FILE} from hub repo {DEFAULT_PREDICTOR_REPO} "
                f"({api.error_text(exc)}); download it (or LAION's sac+logos+ava1-l14-linearMSE.pth) "
                "and set options.predictor to its local path"
            ) from exc
    else:
        path = str(predictor)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:  # a pickle saved on cuda:0: map to CPU, refuse anything but tensors
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise api.AlignPropError(
            f"aesthetic: could not read predictor '{path}' ({api.weights_only_error(exc)}); "
            "set options.predictor to a .pth or .safetensors state dict of the LAION aesthetic predictor"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise api.AlignPropError(f"aesthetic: predictor '{path}' holds a {type(state).__name__}, not a state dict")
    return state, path

