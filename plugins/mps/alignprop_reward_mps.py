"""alignprop reward ``mps``: MPS, the Multi-dimensional Preference Score (Zhang et al., CVPR 2024, Kwai-Kolors/MPS).

MPS is a CLIP ViT-H/14 (transformers ``CLIPModel``, laion2B base) plus a condition-aware cross-attention module.
For an image ``x``, its prompt ``p`` and the fixed condition text ``c`` (the preference aspects; for the overall
score "light, color, clarity, ..., things.") with ``P_t``/``P_v`` the text/visual projections::

    T   = P_t(text_last_hidden(ids(p)))     [77, D]  every prompt token after final_layer_norm (padded to 77, no
                                                     attention mask)
    e   = P_t(text_pooled(ids(p)))          [D]      the EOS embedding
    C   = P_t(text_last_hidden(ids(c)))     [77, D]
    s_j = max_k <T_j, C_k>,  s = s / max_j s_j,  m_j = 0 if s_j > tau else -inf       (tau = 0.3)
    V   = P_v(vision_last_hidden(pixels))   [N, D]   all tokens, before post_layernorm
    q   = CrossModel(V, T, m)[0]                     the CLS query after the condition-masked layers
    score = exp(logit_scale) * cos(e, q)

``CrossModel`` repeats (cross-attention of the image tokens to the prompt tokens, with the bias ``m`` and a
parallel SwiGLU feed-forward; then a parallel self-attention + SwiGLU block with rotary positions), both
multi-query (one key/value head) with bias-free pre-LayerNorms, each added residually. The reference scores one
prompt at a time (its eval scripts), so ``max_j s_j`` is taken per prompt here. Images: the CLIP processor's
pipeline as tensor ops (shortest side 224 bicubic, centre crop 224, CLIP normalisation). Text features, EOS
embeddings and masks are computed without gradient once per distinct prompt and cached.

The weights are a state dict in the reference layout (``model.*`` = the CLIPModel, ``cross_model.layers.*``), or
imscore's copy of it (``mps.`` prefix); the cross module's sizes are read from it and the CLIP config from the
processor. The published ``MPS_overall_checkpoint.pth`` pickles the whole module and is never unpickled here.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import torch
from torch import nn

from alignprop_core import plugin_api as api

REWARD_NAME = "mps"
OWNER = f"reward '{REWARD_NAME}'"
DEFAULT_HUB_REPO = "RE-N-Y/mpsv1"  # imscore's plain-weights copy of MPS_overall_checkpoint.pth
DEFAULT_HUB_FILE = "model.safetensors"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OVERALL_CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, "
                     "structure, instance, texture, quantity, attributes, position, number, location, word, things.")
DEFAULT_MASK_THRESHOLD = 0.3  # the reference eval scripts (its training forward uses 0.01)
TEXT_MAX_LENGTH = 77
TEXT_CACHE_SIZE = 512  # prompts kept (oldest dropped first); one entry is 77 x 1024 floats for the real model
PREFIXES = ("module.", "mps.")  # DDP; imscore's MPS wrapper
LEGACY_KEYS = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")
CONVERT_HINT = "convert it once to a state dict as docs/rewards/mps.md shows"


# --------------------------------------------------------------------------------------------- cross module
class _LayerNorm(nn.Module):
    """LayerNorm with a weight and a constant zero bias (a buffer, as in the reference layout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return x + self.fn(x, *args)


class _SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * nn.functional.silu(gate)


class _Rotary(nn.Module):
    """Rotary position angles ``[n, dim_head]`` from the stored ``inv_freq``."""

    def __init__(self, dim_head: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))

    def forward(self, n: int) -> torch.Tensor:
        angles = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq.float())
        return torch.cat((angles, angles), dim=-1)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos().to(x.dtype) + torch.cat((-second, first), dim=-1) * angles.sin().to(x.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*d] -> [B, H, N, d]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d] -> [B, N, H*d]``."""
    return x.transpose(1, 2).flatten(-2)


class _CrossAttention(nn.Module):
    """Multi-query cross-attention of ``x`` to ``context`` under an additive mask, plus a parallel SwiGLU FF."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = _LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * ff_inner, bias=False), _SwiGLU(),
                                nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q = _heads(self.to_q(h), self.heads) * self.scale  # [B, H, N, d]
        k, v = self.to_kv(context).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, L, d]: one key/value head
        attn = (q @ k.transpose(-1, -2) + bias).softmax(dim=-1)  # bias [B, 1, 1, L]
        return self.to_out(_merge(attn @ v)) + self.ff(h)


class _ParallelBlock(nn.Module):
    """Multi-query self-attention with rotary positions and a SwiGLU FF, both from one fused projection."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_inner)
        self.norm = _LayerNorm(dim)
        self.rotary_emb = _Rotary(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(_SwiGLU(), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.split, dim=-1)
        angles = self.rotary_emb(x.shape[1])
        q = _rotate(_heads(q, self.heads), angles) * self.scale
        k = _rotate(k, angles).unsqueeze(1)
        attn = (q @ k.transpose(-1, -2)).softmax(dim=-1)
        return self.attn_out(_merge(attn @ v.unsqueeze(1))) + self.ff_out(ff)


class CrossModel(nn.Module):
    """MPS's condition-aware module; state-dict keys ``layers.{i}.0.fn.*`` (cross) and ``layers.{i}.1.fn.*``."""

    def __init__(self, dim: int, layers: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_Residual(_CrossAttention(dim, heads, dim_head, ff_inner)),
                           _Residual(_ParallelBlock(dim, heads, dim_head, ff_inner))])
            for _ in range(layers))

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = image_tokens
        for cross, block in self.layers:
            x = block(cross(x, text_tokens, bias))
        return x


class MPSModel(nn.Module):
    """The reference's module layout: ``model`` (transformers CLIPModel) and ``cross_model``."""

    def __init__(self, clip: nn.Module, cross_model: CrossModel):
        super().__init__()
        self.model = clip
        self.cross_model = cross_model


# --------------------------------------------------------------------------------------------------- reward
class MPSReward(api.FrozenReward):
    """Frozen differentiable MPS: ``reward(images [B,3,H,W] in [0,1], prompts [B], metadata) -> [B]``."""

    def __init__(self, model: MPSModel, tokenizer: Any, preprocessing: dict[str, Any],
                 condition: str = OVERALL_CONDITION, mask_threshold: float = DEFAULT_MASK_THRESHOLD):
        super().__init__()
        self.mps = model
        self.tokenizer = tokenizer
        self.preprocessing = dict(preprocessing)
        self.condition = condition
        self.mask_threshold = float(mask_threshold)
        positions = getattr(model.model.config.text_config, "max_position_embeddings", TEXT_MAX_LENGTH)
        limit = getattr(tokenizer, "model_max_length", TEXT_MAX_LENGTH)
        self.text_max_length = min(int(positions), int(limit) if limit and limit < 10**6 else TEXT_MAX_LENGTH)
        self._condition: torch.Tensor | None = None
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_options(
        cls,
        checkpoint: str | None = None,
        processor: str = DEFAULT_PROCESSOR,
        condition: str = OVERALL_CONDITION,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
        dtype: str | None = None,
    ) -> "MPSReward":
        """Build the reward.

        checkpoint: local MPS state dict (.safetensors, or .pth/.pt/.bin read with weights_only=True); null: the hub
            file ``RE-N-Y/mpsv1/model.safetensors``.
        processor: hub id or local folder with the CLIP config.json, tokenizer and preprocessor_config.json
            (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the base MPS was built from).
        condition: the condition text (default: the overall-preference aspects).
        mask_threshold: prompt tokens whose normalised condition similarity is at most this are masked (0.3).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for the model.
        """
        torch_dtype = api.parse_dtype(dtype, REWARD_NAME)
        checkpoint = api.path(OWNER, "checkpoint", checkpoint, kind="file", what="checkpoint file", optional=True,
                              allowed=f"a local MPS state dict (.safetensors or .pth), or null for "
                              f"{DEFAULT_HUB_REPO}/{DEFAULT_HUB_FILE}")
        processor = api.folder_or_hub_id(OWNER, "processor", processor, what="processor folder",
                                         allowed=f"a hub id or a local copy of {DEFAULT_PROCESSOR} (config.json, "
                                         "tokenizer files, preprocessor_config.json)")
        if os.path.isdir(processor) and not os.path.isfile(os.path.join(processor, "config.json")):
            raise api.PluginError(f"{OWNER}: processor folder '{processor}' has no config.json (the CLIP "
                                  f"architecture); set the 'processor' option to a local copy of {DEFAULT_PROCESSOR}")
        condition = api.string(OWNER, "condition", condition, allowed="a non-empty condition text")
        threshold = api.number(OWNER, "mask_threshold", mask_threshold, minimum=0.0, maximum=1.0)
        if threshold >= 1.0:  # the most similar token has s = 1: a threshold of 1 would mask every token
            raise api.invalid(OWNER, "mask_threshold", mask_threshold, "a number in [0, 1)")

        from transformers import AutoTokenizer, CLIPConfig

        config = _load(CLIPConfig.from_pretrained, processor, "the CLIP config.json from")
        tokenizer = _load(AutoTokenizer.from_pretrained, processor, "the tokenizer from")
        path = _resolve_checkpoint(checkpoint)
        model = _build_model(_load_state_dict(path), config, path).to(torch_dtype)
        return cls(model, tokenizer, api.read_image_processor_config(processor), condition, threshold)

    # --------------------------------------------------------------------------------------------- pieces
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable equivalent of the processor's CLIPImageProcessor on ``[0,1]`` images."""
        return api.image_processor_preprocess(images, self.preprocessing)

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, max_length=self.text_max_length, padding="max_length", truncation=True,
                             return_tensors="pt")["input_ids"]
        return ids.to(next(self.mps.parameters()).device)

    def _encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features of every token ``[B, L, D]`` and of the EOS token ``[B, D]`` (no attention mask)."""
        clip = self.mps.model
        out = clip.text_model(input_ids=ids)
        return clip.text_projection(out.last_hidden_state), clip.text_projection(out.pooler_output)

    @torch.no_grad()
    def text_inputs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per prompt: token features ``[B, L, D]``, L2-normalised EOS embedding ``[B, D]`` and the condition mask
        as an additive bias ``[B, L]`` (0 kept, -inf masked); cached per prompt text."""
        device = next(self.mps.parameters()).device
        if self._condition is None or self._condition.device != device:
            self._condition = self._encode_text(self._tokens([self.condition]))[0][0]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tokens, eos = self._encode_text(self._tokens(missing))
            similarity = (tokens @ self._condition.T).amax(dim=-1).float()  # [B, L]: best condition token
            similarity = similarity / similarity.amax(dim=-1, keepdim=True)  # per prompt (the reference: batch 1)
            bias = torch.zeros_like(similarity).masked_fill(~(similarity > self.mask_threshold), float("-inf"))
            eos = eos / torch.linalg.vector_norm(eos, dim=-1, keepdim=True)
            for prompt, t, e, b in zip(missing, tokens, eos, bias):
                if len(self._text_cache) >= TEXT_CACHE_SIZE:
                    self._text_cache.pop(next(iter(self._text_cache)))
                self._text_cache[prompt] = (t, e, b)
        entries = [self._text_cache[p] for p in prompts]
        return tuple(torch.stack([entry[i] for entry in entries]).to(device)  # type: ignore[return-value]
                     for i in range(3))

    def image_queries(self, pixel_values: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The CLS query of the cross module ``[B, D]`` (differentiable w.r.t. ``pixel_values``)."""
        clip = self.mps.model
        image_tokens = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).last_hidden_state)
        bias = bias.to(image_tokens.dtype)[:, None, None, :]
        return self.mps.cross_model(image_tokens, tokens.to(image_tokens.dtype), bias)[:, 0]

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        _check_inputs(images, prompts)
        param = next(self.mps.parameters())
        # resize/normalise in float32 (antialiased bicubic is not implemented for every half dtype), then cast
        pixel_values = self.preprocess(images.to(device=param.device, dtype=torch.float32)).to(param.dtype)
        tokens, eos, bias = self.text_inputs(list(prompts))
        query = self.image_queries(pixel_values, tokens, bias).float()
        query = query / torch.linalg.vector_norm(query, dim=-1, keepdim=True)
        return self.mps.model.logit_scale.exp().float() * (query * eos.float()).sum(dim=-1)


@api.hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        MPSReward.from_options,
        description="MPS overall (CLIP ViT-H/14 + condition-aware cross-attention): exp(logit_scale) * "
        "cos(EOS(prompt), cross(image | prompt, condition)). options: checkpoint, processor, condition, "
        "mask_threshold, dtype",
        details={"source": f"{DEFAULT_HUB_REPO} ({DEFAULT_HUB_FILE}, imscore's plain-weights copy of Kwai-Kolors/MPS "
                 f"MPS_overall_checkpoint.pth), processor {DEFAULT_PROCESSOR}",
                 "license": "MIT (Kwai-Kolors/MPS repository); the RE-N-Y/mpsv1 copy's own terms not verified",
                 "scale": "100 x cosine, in [-100, 100]; compare images of one prompt (the paper uses softmax "
                 "of pairs)",
                 "input_size": "224x224 (shortest side, centre crop)",
                 "suits": "any family; overall human preference (aesthetics, detail, prompt alignment)"},
    )


# ----------------------------------------------------------------------------------------------- loading
def _load(loader: Any, source: str, what: str) -> Any:
    """``loader(folder or hub id)`` with a one-line error that names the ``processor`` option."""
    try:
        return loader(source)
    except Exception as exc:
        where = "local folder" if os.path.isdir(source) else "hub id"
        raise api.AlignPropError(
            f"mps: could not load {what} {where} '{source}' ({api.error_text(exc)}); "
            f"set options.processor to a local folder with a copy of {DEFAULT_PROCESSOR}"
        ) from exc


def _resolve_checkpoint(checkpoint: os.PathLike | None) -> str:
    """Local path of the weights: ``checkpoint`` (already checked to be a file) or the default hub file."""
    if checkpoint is not None:
        return str(checkpoint)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(DEFAULT_HUB_REPO, DEFAULT_HUB_FILE)
    except Exception as exc:
        raise api.AlignPropError(
            f"mps: could not load '{DEFAULT_HUB_FILE}' from the Hugging Face hub repo '{DEFAULT_HUB_REPO}' "
            f"({type(exc).__name__}); download it and set the reward option 'checkpoint' to its local path"
        ) from exc


def _read(path: str) -> Any:
    """The object in ``path``: safetensors, or a torch.save file read with ``weights_only=True``."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    is_safetensors = path.lower().endswith(".safetensors") or (len(head) > 9 and head[8:9] == b"{")
    if is_safetensors:
        try:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        except Exception as exc:
            raise api.AlignPropError(f"mps: cannot read checkpoint '{path}' as safetensors ({api.error_text(exc)}); "
                                     "point the option 'checkpoint' at an MPS state dict") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # a pickled Python object, e.g. the published whole-module MPS_overall_checkpoint.pth
            reason = (f"it pickles a Python object (class {found.group(1)}), not a state dict, and is never "
                      f"unpickled here; {CONVERT_HINT}, or leave 'checkpoint' unset for {DEFAULT_HUB_REPO}")
        else:
            reason = f"{api.weights_only_error(exc)}; point the option 'checkpoint' at an MPS state dict"
        raise api.AlignPropError(
            f"mps: cannot read checkpoint '{path}' with torch.load(weights_only=True) ({reason})") from exc


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The MPS weights in ``path`` with the keys of the reference module (``model.*``, ``cross_model.*``)."""
    state_dict = _read(path)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise api.AlignPropError(
            f"mps: checkpoint '{path}' holds no state dict (expected a dict of tensors); point the option "
            "'checkpoint' at an MPS state dict (.safetensors or .pth)")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    if not any(k.startswith("cross_model.") for k in state_dict) or not any(k.startswith("model.") for k in state_dict):
        sample = ", ".join(list(state_dict)[:2])
        raise api.AlignPropError(
            f"mps: checkpoint '{path}' is not an MPS state dict (no 'model.*' and 'cross_model.*' keys; found e.g. "
            f"{sample}); point the option 'checkpoint' at MPS weights")
    return {k: v for k, v in state_dict.items() if k not in LEGACY_KEYS}


def _cross_sizes(state_dict: dict[str, torch.Tensor], path: str) -> dict[str, int]:
    """The cross module's hyperparameters, read from the weights' shapes."""
    layers = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"cross_model\.layers\.(\d+)\.", k))})
    try:
        if layers != list(range(len(layers))):
            raise KeyError("cross_model.layers numbering")
        to_q = state_dict["cross_model.layers.0.0.fn.to_q.weight"]
        dim_head = state_dict["cross_model.layers.0.0.fn.to_kv.weight"].shape[0] // 2
        ff_inner = state_dict["cross_model.layers.0.0.fn.ff.2.weight"].shape[1]
    except KeyError as exc:
        raise api.AlignPropError(
            f"mps: checkpoint '{path}' lacks the MPS cross-attention weight {exc}; point the option 'checkpoint' "
            "at MPS weights") from None
    heads = to_q.shape[0] // max(dim_head, 1)
    return {"dim": to_q.shape[1], "layers": len(layers), "heads": heads, "dim_head": dim_head, "ff_inner": ff_inner}


def _no_init() -> Any:
    """transformers' context that skips random weight init (every weight is loaded next), when it has one."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _build_model(state_dict: dict[str, torch.Tensor], config: Any, path: str) -> MPSModel:
    """CLIPModel(config) + CrossModel sized from the weights, loaded strictly (one-line error otherwise)."""
    from transformers import CLIPModel

    sizes = _cross_sizes(state_dict, path)
    if sizes["dim"] != config.projection_dim:
        raise api.AlignPropError(
            f"mps: checkpoint '{path}' has a cross-attention width of {sizes['dim']} but the CLIP config of the "
            f"processor has projection_dim {config.projection_dim}; use the processor the checkpoint was built on "
            f"({DEFAULT_PROCESSOR} for MPS)")
    with _no_init():
        model = MPSModel(CLIPModel(config), CrossModel(**sizes))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        lines = [s.strip() for s in str(exc).splitlines()[1:3]]
        raise api.AlignPropError(
            f"mps: checkpoint '{path}' does not fit MPS on the processor's CLIP config ({'; '.join(lines)[:300]}); "
            f"use MPS weights and the processor they were built on ({DEFAULT_PROCESSOR} for MPS)") from exc
    return model.eval()


def _check_inputs(images: Any, prompts: Any) -> None:
    api.check_images(images, REWARD_NAME)
    api.check_prompts(prompts, images.shape[0], REWARD_NAME)
