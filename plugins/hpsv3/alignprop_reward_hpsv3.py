"""alignprop reward ``hpsv3``: HPSv3 (Ma et al., ICCV 2025), a Qwen2-VL-7B human preference model.

    text   = chat(INSTRUCTION(prompt) + "... ratings of this image: <|Reward|> ...")   one user turn, image first
    E      = embed(ids(text));  E[image pad tokens] = Qwen2-VL ViT(patches(pixels))    the merged 2x2 patch tokens
    h      = Qwen2-VL decoder(E)[position of <|Reward|>]                              positions 0..L-1 (see below)
    (mu, sigma) = Linear(D,1024) - ReLU - Linear(1024,16) - ReLU - Linear(16,2) (h)    the RankNet head, float32
    score  = mu

exactly the path of ``HPSv3RewardInferencer.reward`` in the ``hpsv3`` package (1.0.0): its ``Qwen2VLRewardModelBT``
embeds the tokens, scatters the image features into the image pad tokens and runs the decoder without position ids,
so the decoder gets plain positions 0..L-1 in all three M-RoPE sections (transformers 4.45's default there), not
Qwen2-VL's 2-D image positions. The published ``HPSv3.safetensors`` is the whole model in transformers 4.45 names
(``visual.*``, ``model.*``, ``lm_head.*``, ``rm_head.*``); its ``visual`` and decoder go into transformers'
``Qwen2VLModel`` (``model.visual``, ``model.language_model``); ``lm_head`` is not needed for the score and is not
loaded. The architecture and the tokenizer are those of ``Qwen/Qwen2-VL-7B-Instruct`` (option ``base_model``), with
``<|Reward|>`` added; the vocabulary size comes from the weights (HPSv3 resized the embeddings to the tokenizer).

Images: HPSv3 asks for ``min_pixels = max_pixels = 256*28*28``: the image is resized (bicubic, antialiased, as PIL) to
Qwen2-VL's ``smart_resize`` size for that budget (sides multiples of 28, about 200k pixels, aspect kept), scaled by
1/255 and CLIP-normalised, then cut into 14 px patches in the processor's order (2x2 merge groups, each patch repeated
twice in time). The processor's second resize is then the identity. A 512x512 image gives 448x448, 256 image tokens.

The ``INSTRUCTION`` and answer texts below are the model's input format from the ``hpsv3`` package (MIT licence):
the head was trained on exactly these tokens, so they are kept character for character.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignprop_core import plugin_api as api

REWARD_NAME = "hpsv3"
OWNER = f"reward '{REWARD_NAME}'"
HUB_REPO = "MizzenAI/HPSv3"
CHECKPOINT_FILE = "HPSv3.safetensors"
BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
PIXEL_BUDGET = 256 * 28 * 28  # HPSv3RewardInferencer: min_pixels = max_pixels = 200704
PATCH, MERGE, TEMPORAL = 14, 2, 2  # Qwen2-VL: 14 px patches, 2x2 merged into one token, 2 frames per patch
FACTOR = PATCH * MERGE
MAX_ASPECT = 200  # smart_resize refuses more
HEAD_WIDTHS = (1024, 16, 2)  # the "ranknet" head without rm_head_kwargs: outputs (mu, sigma)

INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501, W291 (the trained text, trailing spaces included)

ANSWER = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def smart_resize(height: int, width: int) -> tuple[int, int]:
    """Qwen2-VL's size for HPSv3's budget: sides multiples of 28 near ``height`` x ``width``, scaled down (floor)
    to at most 200704 pixels or up (ceil) to at least that many, aspect ratio kept (``qwen_vl_utils`` rounding)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise api.AlignPropError(f"hpsv3: a {height}x{width} image is more than {MAX_ASPECT}:1, which Qwen2-VL "
                                 "refuses; use a less extreme aspect ratio or views")
    h_bar, w_bar = max(FACTOR, round(height / FACTOR) * FACTOR), max(FACTOR, round(width / FACTOR) * FACTOR)
    if h_bar * w_bar > PIXEL_BUDGET:
        beta = math.sqrt(height * width / PIXEL_BUDGET)
        h_bar, w_bar = math.floor(height / beta / FACTOR) * FACTOR, math.floor(width / beta / FACTOR) * FACTOR
    elif h_bar * w_bar < PIXEL_BUDGET:
        beta = math.sqrt(PIXEL_BUDGET / (height * width))
        h_bar, w_bar = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
    return h_bar, w_bar


def patchify(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, H, W]`` normalised pixels -> (``[B*gh*gw, C*2*14*14]`` patches, ``[B, 3]`` grids ``(1, gh, gw)``), in
    the order of Qwen2-VL's image processor: 2x2 merge groups row by row, each patch repeated over 2 frames."""
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // PATCH, width // PATCH
    blocks = pixels.reshape(batch, channels, grid_h // MERGE, MERGE, PATCH, grid_w // MERGE, MERGE, PATCH)
    blocks = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh/2, gw/2, 2, 2, C, 14, 14
    frames = blocks.unsqueeze(-3).expand(*blocks.shape[:-2], TEMPORAL, PATCH, PATCH)
    patches = frames.reshape(batch * grid_h * grid_w, channels * TEMPORAL * PATCH * PATCH)
    grids = torch.tensor([[1, grid_h, grid_w]] * batch, dtype=torch.long, device=pixels.device)
    return patches, grids


class HPSv3Model(nn.Module):
    """Qwen2-VL's vision tower and decoder (transformers ``Qwen2VLModel``) with HPSv3's RankNet head."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import Qwen2VLModel

        self.model = Qwen2VLModel(config)
        width = config.get_text_config().hidden_size
        self.rm_head = nn.Sequential(nn.Linear(width, HEAD_WIDTHS[0]), nn.ReLU(), nn.Dropout(0.05),
                                     nn.Linear(HEAD_WIDTHS[0], HEAD_WIDTHS[1]), nn.ReLU(),
                                     nn.Linear(HEAD_WIDTHS[1], HEAD_WIDTHS[2]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, patches: torch.Tensor,
                grids: torch.Tensor, reward_token_id: int) -> torch.Tensor:
        """``(mu, sigma)`` ``[B, 2]`` (float32) at the ``<|Reward|>`` token of each sequence."""
        decoder, visual = self.model.language_model, self.model.visual
        embeds = decoder.embed_tokens(input_ids)
        image_tokens = visual(patches.to(visual.get_dtype()), grid_thw=grids).pooler_output
        image_mask = (input_ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_tokens.to(embeds.dtype))
        # no position ids: 0..L-1 in every M-RoPE section, as HPSv3 was trained (module docstring)
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        at_reward = hidden[input_ids == reward_token_id]  # one per sequence (checked when tokenising)
        return self.rm_head(at_reward.to(self.rm_head[0].weight.dtype)).float()  # float32, unless cast


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Recompute each block in the backward pass instead of keeping its activations (torch's non-reentrant
    checkpointing). transformers' own switch acts only in training mode, and a reward is always in eval mode."""
    for block in blocks:
        def forward(*args: Any, _forward: Any = block.forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)
        block.forward = forward


class HPSv3Reward(api.FrozenReward):
    """Frozen differentiable HPSv3: ``reward(images [B,3,H,W] in [0,1], prompts [B], metadata) -> [B]`` (mu)."""

    def __init__(self, model: HPSv3Model, tokenizer: Any, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            checkpoint_blocks(model.model.visual.blocks)
            checkpoint_blocks(model.model.language_model.layers)
        self._texts: dict[str, str] = {}

    @classmethod
    def from_options(cls, checkpoint: str | None = None, base_model: str = BASE_MODEL, dtype: str | None = "bfloat16",
                     gradient_checkpointing: bool = False) -> "HPSv3Reward":
        """Build the reward.

        checkpoint: local ``HPSv3.safetensors`` (default: downloaded from the hub repo ``MizzenAI/HPSv3``).
        base_model: hub id or local folder with Qwen2-VL-7B-Instruct's ``config.json`` and tokenizer (no weights
            are read from it). dtype: ``bfloat16`` (default, as HPSv3 runs), ``float32`` or ``float16``; the head
            stays float32. gradient_checkpointing: recompute the vision and decoder blocks in the backward pass.
        """
        torch_dtype = api.parse_dtype(dtype or "bfloat16", REWARD_NAME)
        if not isinstance(gradient_checkpointing, bool):
            raise api.invalid(OWNER, "gradient_checkpointing", gradient_checkpointing, "true or false")
        checkpoint = api.path(OWNER, "checkpoint", checkpoint, kind="file", what="checkpoint file", optional=True,
                              allowed=f"a local {CHECKPOINT_FILE}, or null to download it from {HUB_REPO}")
        base_model = api.folder_or_hub_id(OWNER, "base_model", base_model, what="base model folder",
                                          allowed=f"a hub id or a local copy of {BASE_MODEL}'s config and tokenizer")
        config, tokenizer = _load_base(base_model)
        where = str(checkpoint or CHECKPOINT_FILE)
        state = _read_checkpoint(str(checkpoint or _hub_file()), where)
        model = _build(config, state, torch_dtype, where)
        vocab = model.model.language_model.embed_tokens.num_embeddings
        if len(tokenizer) > vocab:
            raise api.AlignPropError(f"hpsv3: the tokenizer of '{base_model}' has {len(tokenizer)} tokens (with "
                                     f"{REWARD_TOKEN}) but the checkpoint's embeddings {vocab}; set the option "
                                     f"'base_model' to {BASE_MODEL}'s files")
        return cls(model, tokenizer, gradient_checkpointing)

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[0,1]`` images -> Qwen2-VL patches and grids, as HPSv3's resize and the image processor."""
        height, width = smart_resize(*images.shape[-2:])
        pixels = api.normalize(api.resize(images, height, width), api.CLIP_MEAN, api.CLIP_STD)
        return patchify(pixels)

    def chat_text(self, prompt: str, image_tokens: int) -> str:
        """The chat-templated text of one prompt with its ``image_tokens`` image pad tokens."""
        if prompt not in self._texts:
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + ANSWER}]}]
            self._texts[prompt] = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
        return self._texts[prompt].replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * image_tokens)

    def tokens(self, prompts: list[str], image_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Input ids and attention mask ``[B, L]``, right-padded as HPSv3's processor."""
        texts = [self.chat_text(p, image_tokens) for p in prompts]
        out = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids = out["input_ids"]
        if not ((ids == self.reward_token_id).sum(-1) == 1).all():  # a prompt that contains the reward token
            raise api.AlignPropError(f"hpsv3: a prompt contains {REWARD_TOKEN} (or the template lost it); remove that "
                                     "text from the prompt")
        return ids.to(device), out["attention_mask"].to(device)

    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        api.check_images(images, REWARD_NAME)
        api.check_prompts(prompts, images.shape[0], REWARD_NAME)
        device = self.model.rm_head[0].weight.device
        # resize/normalise in float32 (antialiased bicubic is not implemented for every half dtype)
        patches, grids = self.preprocess(images.to(device=device, dtype=torch.float32))
        image_tokens = int(grids[0].prod()) // (MERGE * MERGE)
        ids, mask = self.tokens(list(prompts), image_tokens, device)
        return self.model(ids, mask, patches, grids, self.reward_token_id)[:, 0]


@api.hookimpl
def register_rewards(register):
    register(
        REWARD_NAME,
        HPSv3Reward.from_options,
        description="HPSv3 (Qwen2-VL-7B + RankNet head): human preference score (mu) of each image for its prompt. "
        "options: checkpoint, base_model, dtype, gradient_checkpointing",
        details={"source": f"{HUB_REPO} ({CHECKPOINT_FILE}), architecture and tokenizer {BASE_MODEL}",
                 "license": "MIT (hpsv3 package and weights); Qwen2-VL-7B-Instruct: Apache-2.0",
                 "scale": "mu of a RankNet score, unbounded; higher is better, only differences mean something",
                 "input_size": "about 200k pixels (448x448 for square), aspect kept, sides multiples of 28",
                 "suits": "any family; a 7B model: bfloat16 and gradient_checkpointing on one large GPU"},
    )


# ----------------------------------------------------------------------------------------------- loading
def _hub_file() -> str:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(HUB_REPO, CHECKPOINT_FILE)
    except Exception as exc:
        raise api.AlignPropError(
            f"hpsv3: could not load '{CHECKPOINT_FILE}' from the hub repo '{HUB_REPO}' ({type(exc).__name__}); "
            "download it and set the option 'checkpoint' to its local path") from None


def _load_base(source: str) -> tuple[Any, Any]:
    """Qwen2-VL's config (architecture only) and its tokenizer with ``<|Reward|>`` added, as HPSv3 builds them."""
    from transformers import AutoConfig, AutoTokenizer

    where = "local folder" if os.path.isdir(source) else "hub id"
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="right")
    except Exception as exc:
        raise api.AlignPropError(f"hpsv3: could not load the Qwen2-VL config and tokenizer from {where} '{source}' "
                                 f"({api.error_text(exc)}); set the option 'base_model' to a local copy of "
                                 f"{BASE_MODEL}'s config.json and tokenizer files") from None
    if getattr(config, "model_type", None) != "qwen2_vl":
        raise api.AlignPropError(f"hpsv3: '{source}' holds a {getattr(config, 'model_type', '?')} config, not "
                                 f"Qwen2-VL's; set the option 'base_model' to {BASE_MODEL}")
    if not getattr(tokenizer, "chat_template", None) or IMAGE_PAD_TOKEN not in tokenizer.get_vocab():
        raise api.AlignPropError(f"hpsv3: the tokenizer of '{source}' has no Qwen2-VL chat template or no "
                                 f"{IMAGE_PAD_TOKEN} token; set the option 'base_model' to {BASE_MODEL}'s files")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return config, tokenizer


def _read_checkpoint(path: str, where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under transformers' current names (``model.visual.*``, ``model.language_model.*``,
    ``rm_head.*``); ``lm_head.*`` is dropped. The names of transformers 4.45 (HPSv3's) and of 5.x are both read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise api.AlignPropError(f"hpsv3: cannot read checkpoint '{where}' as safetensors ({api.error_text(exc)}); "
                                 f"point the option 'checkpoint' at {CHECKPOINT_FILE}") from None
    state = {}
    for key, value in stored.items():
        if key.startswith("lm_head."):
            continue
        if key.startswith(("model.visual.", "model.language_model.", "rm_head.")):
            state[key] = value
        elif key.startswith("visual."):
            state["model." + key] = value
        elif key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
        else:
            state[key] = value
    if "model.language_model.embed_tokens.weight" not in state or not any(k.startswith("rm_head.") for k in state):
        raise api.AlignPropError(f"hpsv3: checkpoint '{where}' is not an HPSv3 model (no embed_tokens or rm_head "
                                 f"weights); point the option 'checkpoint' at {CHECKPOINT_FILE}")
    return state


def _build(config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> HPSv3Model:
    """The model with its parameters on the meta device, then the checkpoint's tensors assigned in place (so a 7B
    model is held once, in ``dtype``; the head in float32 as HPSv3 keeps it)."""
    from accelerate import init_empty_weights

    config.get_text_config().vocab_size = state["model.language_model.embed_tokens.weight"].shape[0]
    config._attn_implementation = "sdpa"
    with init_empty_weights(include_buffers=False):
        model = HPSv3Model(config)
    cast = {k: v.to(torch.float32 if k.startswith("rm_head.") else dtype) for k, v in state.items()}
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])[:300]
        raise api.AlignPropError(f"hpsv3: the weights of '{where}' do not fit the Qwen2-VL architecture of the "
                                 f"option 'base_model': {detail}; use {CHECKPOINT_FILE} with {BASE_MODEL}") from None
    return model.eval()
