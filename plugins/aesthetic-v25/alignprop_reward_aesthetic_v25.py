"""alignprop reward ``aesthetic_v25``: Aesthetic Predictor v2.5 (discus0434), a SigLIP-based aesthetic score.

    e     = pooler_output(SiglipVisionModel(pixels))        [1152]  the attention-pooled (MAP head) embedding
    score = MLP(e / ||e||)                                           about 1-10; "5.5+ is great" (its authors)
    MLP   = Linear(1152, 1024) - Linear(1024, 128) - Linear(128, 64) - Linear(64, 16) - Linear(16, 1)

with dropouts between the layers (off: the reward is frozen) and no activations, as the published head. The vision
tower is ``google/siglip-so400m-patch14-384``; the head weights are ``aesthetic_predictor_v2_5.pth`` (a state dict
``scoring_head.{0,2,4,6,8}.{weight,bias}``), published in the predictor's GitHub repository. The score does not
depend on the prompt.

Images: SigLIP's image processor as tensor ops: resize to exactly 384x384 (bicubic, antialiased; the aspect ratio
is squashed, there is no crop), rescale to [0, 1], normalise with mean 0.5 and std 0.5 (read from the processor's
preprocessor_config.json).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from alignprop_core import plugin_api as api

REWARD_NAME = "aesthetic_v25"
OWNER = f"reward '{REWARD_NAME}'"
DEFAULT_SIGLIP = "google/siglip-so400m-patch14-384"
HEAD_URL = "https://github.com/discus0434/aesthetic-predictor-v2-5/raw/main/models/aesthetic_predictor_v2_5.pth"
HEAD_FILE = "aesthetic_predictor_v2_5.pth"
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUTS = (0.5, 0.5, 0.5, 0.2)
#: SigLIP's image processor (it has no centre crop); a folder's preprocessor_config.json overrides these
SIGLIP_PROCESSOR_CONFIG = {"do_resize": True, "size": {"height": 384, "width": 384}, "do_center_crop": False,
                           "crop_size": None, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}


class AestheticV25Head(nn.Module):
    """The published scoring head; its state-dict keys are ``scoring_head.{0,2,4,6,8}.*``."""

    def __init__(self, embed_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        widths = (embed_dim, *HEAD_WIDTHS)
        for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < len(HEAD_DROPOUTS):
                layers.append(nn.Dropout(HEAD_DROPOUTS[i]))
        self.scoring_head = nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.scoring_head(embeds)


class AestheticV25Reward(api.FrozenReward):
    """Frozen differentiable Aesthetic Predictor v2.5: ``reward(images [B,3,H,W] in [0,1], prompts, metadata) ->
    [B]``."""

    def __init__(self, vision: nn.Module, head: AestheticV25Head, preprocessing: dict[str, Any]):
        super().__init__()
        self.vision = vision
        self.head = head
        self.preprocessing = dict(preprocessing)

    @classmethod
    def from_options(cls, siglip: str = DEFAULT_SIGLIP, head: str | None = None,
                     dtype: str | None = None) -> "AestheticV25Reward":
        """Build the reward.

        siglip: hub id or local folder of the SigLIP model (a ``SiglipModel`` or ``SiglipVisionModel`` checkpoint
            with its preprocessor_config.json; default ``google/siglip-so400m-patch14-384``).
        head: local ``aesthetic_predictor_v2_5.pth`` (default: downloaded from the predictor's GitHub repository).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for the SigLIP tower and head.
        """
        torch_dtype = api.parse_dtype(dtype, REWARD_NAME)
        siglip = api.folder_or_hub_id(OWNER, "siglip", siglip, what="SigLIP folder",
                                      allowed=f"a hub id or a local copy of {DEFAULT_SIGLIP} (config.json + weights + "
                                      "preprocessor_config.json)")
        head = api.path(OWNER, "head", head, kind="file", what="head file", optional=True,
                        allowed=f"a local {HEAD_FILE}, or null to download it from the predictor's repository")
        state_dict = _read_head(head)  # every option is checked, and the small head read, before the large tower
        vision = _load_vision(siglip, torch_dtype)
        embed_dim = int(vision.config.hidden_size)
        scorer = AestheticV25Head(embed_dim)
        try:
            scorer.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])[:300]
            raise api.AlignPropError(
                f"aesthetic_v25: head '{head or HEAD_URL}' does not fit a {embed_dim}-wide SigLIP ({detail}); point "
                f"the option 'head' at {HEAD_FILE} and 'siglip' at {DEFAULT_SIGLIP} (or the tower it was trained on)"
            ) from None
        return cls(vision, scorer.to(torch_dtype), api.read_image_processor_config(siglip, SIGLIP_PROCESSOR_CONFIG))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable equivalent of SiglipImageProcessor on ``[0,1]`` images."""
        return api.image_processor_preprocess(images, self.preprocessing)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised SigLIP embeddings ``[B, D]`` (differentiable): what the head scores."""
        api.check_images(images, REWARD_NAME)
        param = next(self.vision.parameters())
        # resize/normalise in float32 (antialiased bicubic is not implemented for every half dtype), then cast
        pixels = self.preprocess(images.to(device=param.device, dtype=torch.float32)).to(param.dtype)
        embeds = self.vision(pixel_values=pixels).pooler_output
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None,
                metadata: list[dict] | None = None) -> torch.Tensor:
        return self.head(self.embed_images(images)).squeeze(-1).float()


@api.hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        AestheticV25Reward.from_options,
        description="Aesthetic Predictor v2.5 (SigLIP so400m-patch14-384 + MLP head): aesthetics on ~1-10, "
        "prompt-independent. options: siglip, head, dtype",
        details={"source": f"{DEFAULT_SIGLIP} + {HEAD_FILE} (github discus0434/aesthetic-predictor-v2-5)",
                 "license": "AGPL-3.0 (aesthetic-predictor-v2-5); SigLIP: Apache-2.0",
                 "scale": "about 1-10, prompt-independent; its authors call 5.5+ great",
                 "input_size": "384x384 (resized without crop: the aspect ratio is squashed)",
                 "suits": "any family; aesthetics of photos and illustrations (wider domain than 'aesthetic')"},
    )


def _read_head(path: str | None) -> dict[str, torch.Tensor]:
    """The head state dict from ``path`` (or the published URL), read with ``weights_only=True``."""
    where = path or HEAD_URL
    try:
        if path is None:
            state = torch.hub.load_state_dict_from_url(HEAD_URL, map_location="cpu", weights_only=True,
                                                       file_name=HEAD_FILE)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if path is None:
            reason = f"could not download it ({api.error_text(exc)})"
            fix = f"download {HEAD_URL} and set the option 'head' to its local path"
        else:
            reason = api.weights_only_error(exc)
            fix = f"point the option 'head' at {HEAD_FILE}"
        raise api.AlignPropError(f"aesthetic_v25: cannot read the head '{where}' ({reason}); {fix}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise api.AlignPropError(f"aesthetic_v25: head '{where}' holds no state dict of tensors; point the option "
                                 f"'head' at {HEAD_FILE}")
    return state


def _load_vision(source: str, dtype: torch.dtype) -> nn.Module:
    """The SigLIP vision tower from a SiglipModel or SiglipVisionModel checkpoint (hub id or folder)."""
    from transformers import SiglipVisionModel

    where = "local folder" if os.path.isdir(source) else "hub id"
    try:
        model, info = SiglipVisionModel.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except Exception as exc:
        raise api.AlignPropError(
            f"aesthetic_v25: could not load the SigLIP vision model from {where} '{source}' ({api.error_text(exc)}); "
            f"set the option 'siglip' to a local copy of {DEFAULT_SIGLIP}"
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them randomly and only warn: a wrong checkpoint, not SigLIP's
        raise api.AlignPropError(
            f"aesthetic_v25: {where} '{source}' lacks {len(missing)} SigLIP vision weights (e.g. {missing[0]}); set "
            f"the option 'siglip' to a local copy of {DEFAULT_SIGLIP}"
        )
    return model
