"""alignprop reward ``imagereward``: ImageReward v1.0 (Xu et al., NeurIPS 2023), a BLIP-based human preference model.

    V     = ViT-L/16(pixels)                                 [197, 1024]  BLIP's image encoder, final LayerNorm
    h     = BERT(ids(prompt), cross-attention to V)[CLS]     [768]        BLIP's text encoder ("med" config)
    score = (MLP(h) - 0.16717362830052426) / 1.0333394966054072          normalised as the published model
    MLP   = Linear(768,1024) - Linear(1024,128) - Linear(128,64) - Linear(64,16) - Linear(16,1)   (no activations)

exactly the path of ``ImageReward.score`` in the ``image-reward`` package. The published ``ImageReward.pt`` is a state
dict (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``); it is read with
``torch.load(weights_only=True)`` and its encoders are loaded into transformers' BLIP classes, whose layers are those
of BLIP's ViT and "med" BERT (``BlipVisionModel``: ``cls_token``/``pos_embed``/``blocks`` renamed; ``BlipTextModel``:
the same names). The vision width, depth, patch and image size come from the weights; BLIP's heads are 64 wide.

Images: ImageReward's torchvision transform as tensor ops: shortest side to 224 (bicubic, antialiased), centre crop
224 (torchvision's rounding of the offset), CLIP normalisation. Text: the BERT tokenizer (``bert-base-uncased``, with
BLIP's ``[DEC]``/``[ENC]`` tokens added), padded to 35 tokens with truncation; the encoder runs once per image and
prompt (the text attends to the image, so nothing can be cached but the tokens).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from alignprop_core import plugin_api as api

REWARD_NAME = "imagereward"
OWNER = f"reward '{REWARD_NAME}'"
HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
SCORE_MEAN = 0.16717362830052426  # ImageReward.mean / .std: the published normalisation
SCORE_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
IMAGE_SIZE = 224
HEAD_DIM = 64  # BLIP's ViT: base 768 / 12 heads, large 1024 / 16 heads
MLP_WIDTHS = (1024, 128, 64, 16, 1)
MLP_DROPOUTS = (0.2, 0.2, 0.1)  # after the first three layers, as published (off: the reward is frozen)
#: BLIP ViT names -> transformers BlipVisionModel names (the prefix ``blocks.{i}.`` -> ``encoder.layers.{i}.``)
VISION_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
BLOCK_NAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


class ImageRewardMLP(nn.Module):
    """The published head; state-dict keys ``layers.{0,2,4,6,7}.*``."""

    def __init__(self, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        widths = (width, *MLP_WIDTHS)
        for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < len(MLP_DROPOUTS):
                layers.append(nn.Dropout(MLP_DROPOUTS[i]))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardReward(api.FrozenReward):
    """Frozen differentiable ImageReward: ``reward(images [B,3,H,W] in [0,1], prompts [B], metadata) -> [B]``."""

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: ImageRewardMLP, tokenizer: Any):
        super().__init__()
        self.vision = vision
        self.text = text
        self.mlp = mlp
        self.tokenizer = tokenizer
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_options(cls, checkpoint: str | None = None, med_config: str | None = None,
                     tokenizer: str = DEFAULT_TOKENIZER, dtype: str | None = None) -> "ImageRewardReward":
        """Build the reward.

        checkpoint: local ``ImageReward.pt`` (default: downloaded from the hub repo ``THUDM/ImageReward``).
        med_config: local ``med_config.json`` (default: the hub repo's).
        tokenizer: hub id or local folder of the BERT tokenizer (default ``bert-base-uncased``).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for the encoders and head.
        """
        torch_dtype = api.parse_dtype(dtype, REWARD_NAME)
        checkpoint = api.path(OWNER, "checkpoint", checkpoint, kind="file", what="checkpoint file", optional=True,
                              allowed=f"a local {CHECKPOINT_FILE}, or null to download it from {HUB_REPO}")
        med_config = api.path(OWNER, "med_config", med_config, kind="file", what="med_config file", optional=True,
                              allowed=f"a local {MED_CONFIG_FILE}, or null to download it from {HUB_REPO}")
        tokenizer = api.folder_or_hub_id(OWNER, "tokenizer", tokenizer, what="tokenizer folder",
                                         allowed=f"a hub id or a local copy of {DEFAULT_TOKENIZER}")
        med = _read_med_config(str(med_config or _hub_file(MED_CONFIG_FILE, "med_config")))
        state = _read_checkpoint(str(checkpoint or _hub_file(CHECKPOINT_FILE, "checkpoint")))
        vision, text, mlp = _build(state, med, str(checkpoint or CHECKPOINT_FILE))
        bert = _load_tokenizer(tokenizer)
        if len(bert) > med["vocab_size"]:  # ids past the embedding table would fail at the first prompt
            raise api.AlignPropError(
                f"imagereward: the tokenizer '{tokenizer}' has {len(bert)} tokens (with [DEC], [ENC]) but the text "
                f"encoder {med['vocab_size']}; set the option 'tokenizer' to {DEFAULT_TOKENIZER}'s files")
        return cls(vision.to(torch_dtype), text.to(torch_dtype), mlp.to(torch_dtype), bert)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """ImageReward's transform on ``[0,1]`` images: shortest side 224 bicubic, centre crop, CLIP norm."""
        resized = api.resize_shortest_side(images, IMAGE_SIZE)
        height, width = resized.shape[-2:]
        top, left = int(round((height - IMAGE_SIZE) / 2.0)), int(round((width - IMAGE_SIZE) / 2.0))  # torchvision
        return api.normalize(resized[..., top:top + IMAGE_SIZE, left:left + IMAGE_SIZE], api.CLIP_MEAN, api.CLIP_STD)

    def tokens(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and attention masks ``[B, 35]``, tokenised once per distinct prompt."""
        for prompt in dict.fromkeys(p for p in prompts if p not in self._tokens):
            out = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                                 return_tensors="pt")
            self._tokens[prompt] = (out["input_ids"][0], out["attention_mask"][0])
        ids, masks = zip(*(self._tokens[p] for p in prompts))
        return torch.stack(ids).to(device), torch.stack(masks).to(device)

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        api.check_images(images, REWARD_NAME)
        api.check_prompts(prompts, images.shape[0], REWARD_NAME)
        param = next(self.vision.parameters())
        # resize/normalise in float32 (antialiased bicubic is not implemented for every half dtype), then cast
        pixels = self.preprocess(images.to(device=param.device, dtype=torch.float32)).to(param.dtype)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        ids, mask = self.tokens(list(prompts), param.device)
        cross_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=param.device)
        text = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=cross_mask).last_hidden_state
        return ((self.mlp(text[:, 0, :]).squeeze(-1).float() - SCORE_MEAN) / SCORE_STD)


@api.hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        ImageRewardReward.from_options,
        description="ImageReward v1.0 (BLIP ViT-L/16 + BERT cross-attention + MLP): normalised human preference "
        "score of each image for its prompt. options: checkpoint, med_config, tokenizer, dtype",
        details={"source": f"{HUB_REPO} ({CHECKPOINT_FILE}, {MED_CONFIG_FILE}), tokenizer {DEFAULT_TOKENIZER}",
                 "license": "Apache-2.0 (image-reward package)",
                 "scale": "normalised by its published mean/std: about mean 0, std 1 over its training images",
                 "input_size": "224x224 (shortest side, centre crop)",
                 "suits": "any family; human preference incl. prompt alignment (the ReFL reward)"},
    )


# ----------------------------------------------------------------------------------------------- loading
def _hub_file(filename: str, option: str) -> str:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(HUB_REPO, filename)
    except Exception as exc:
        raise api.AlignPropError(
            f"imagereward: could not load '{filename}' from the hub repo '{HUB_REPO}' ({type(exc).__name__}); "
            f"download it and set the option '{option}' to its local path") from None


def _read_med_config(path: str) -> dict[str, Any]:
    text = api.read_text(OWNER, "med_config", api.path(OWNER, "med_config", path, what="med_config file"),
                         what="med_config file", allowed=f"a BLIP {MED_CONFIG_FILE}")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise api.PluginError(f"{OWNER}: med_config '{path}' is not valid JSON ({exc}); point the option "
                              f"'med_config' at {MED_CONFIG_FILE}") from None
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in needed if not isinstance(config, dict) or not isinstance(config.get(k), int)]
    if missing:
        raise api.PluginError(f"{OWNER}: med_config '{path}' is not a BERT config (missing {', '.join(missing)}); "
                              f"point the option 'med_config' at {MED_CONFIG_FILE}")
    return config


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise api.AlignPropError(f"imagereward: cannot read checkpoint '{path}' with torch.load(weights_only=True) "
                                 f"({api.weights_only_error(exc)}); point the option 'checkpoint' at "
                                 f"{CHECKPOINT_FILE}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(k.startswith("blip.visual_encoder.") for k in state):
        raise api.AlignPropError(f"imagereward: checkpoint '{path}' is not an ImageReward state dict (no "
                                 f"blip.visual_encoder.* weights); point the option 'checkpoint' at {CHECKPOINT_FILE}")
    return state


def _build(state: dict[str, torch.Tensor], med: dict[str, Any], where: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """transformers' BLIP vision and text models and the MLP, sized from the weights and the med config, loaded."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    part = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            for name in ("blip.visual_encoder", "blip.text_encoder", "mlp")}
    visual = part["blip.visual_encoder"]
    try:
        width, patch = visual["cls_token"].shape[-1], visual["patch_embed.proj.weight"].shape[-1]
        grid = int(round((visual["pos_embed"].shape[1] - 1) ** 0.5))
        depth = 1 + max(int(k.split(".")[1]) for k in visual if k.startswith("blocks."))
        ff_width = visual["blocks.0.mlp.fc1.weight"].shape[0]
        vision_config = BlipVisionConfig(hidden_size=width, intermediate_size=ff_width, num_hidden_layers=depth,
                                         num_attention_heads=max(1, width // HEAD_DIM), image_size=grid * patch,
                                         patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    except (KeyError, ValueError) as exc:
        raise api.AlignPropError(f"imagereward: checkpoint '{where}' lacks BLIP ViT weights ({exc}); point the option "
                                 f"'checkpoint' at {CHECKPOINT_FILE}") from None
    text_config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med.get("max_position_embeddings", 512), layer_norm_eps=med.get("layer_norm_eps",
                                                                                               1e-12),
        hidden_act=med.get("hidden_act", "gelu"), encoder_hidden_size=width, pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=None, sep_token_id=None, eos_token_id=None)
    vision, text, mlp = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False), \
        ImageRewardMLP(med["hidden_size"])
    renamed = {}
    for key, value in visual.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            module, _, leaf = rest.rpartition(".")
            renamed[f"encoder.layers.{index}.{BLOCK_NAMES.get(module, module)}.{leaf}"] = value
        else:
            renamed[VISION_NAMES.get(key, key)] = value
    text_state = {k: v for k, v in part["blip.text_encoder"].items() if not k.endswith("position_ids")}
    for name, module, weights in (("blip.visual_encoder", vision, renamed), ("blip.text_encoder", text, text_state),
                                  ("mlp", mlp, part["mlp"])):
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])[:300]
            raise api.AlignPropError(
                f"imagereward: the {name} weights of '{where}' do not fit (with the med_config given): {detail}; use "
                f"{CHECKPOINT_FILE} with its own {MED_CONFIG_FILE}") from None
    return vision, text, mlp


def _load_tokenizer(source: str) -> Any:
    """BLIP's tokenizer: BERT's, with ``[DEC]`` as bos and ``[ENC]`` added (``init_tokenizer``)."""
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(source)
    except Exception as exc:
        where = "local folder" if os.path.isdir(source) else "hub id"
        raise api.AlignPropError(f"imagereward: could not load the BERT tokenizer from {where} '{source}' "
                                 f"({api.error_text(exc)}); set the option 'tokenizer' to a local copy of "
                                 f"{DEFAULT_TOKENIZER}") from None
    if tokenizer.vocab_size <= len(set(tokenizer.all_special_tokens)):  # transformers 5 loads an empty folder too
        raise api.AlignPropError(f"imagereward: the tokenizer '{source}' has no vocabulary (no vocab.txt or "
                                 f"tokenizer.json); set the option 'tokenizer' to a local copy of {DEFAULT_TOKENIZER}")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer
