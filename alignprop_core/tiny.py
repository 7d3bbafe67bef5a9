"""Tiny Stable Diffusion 1.x and SDXL pipelines with random weights, built from configs, for offline demos and tests.

They have the real architectures (UNet2DConditionModel, AutoencoderKL with a VAE factor of 8, CLIPTextModel,
CLIPTokenizer, and for SDXL a second CLIPTextModelWithProjection and a ``text_time`` UNet; DDIMScheduler with
SD-1.5's settings / EulerDiscreteScheduler with SDXL-base's) at toy sizes, and are saved with ``save_pretrained`` so
that everything downstream loads them through the ordinary ``from_pretrained`` path. No file or network is needed: the
tokenizer is a character-level CLIP BPE (the 256 byte symbols, their ``</w>`` forms, two special tokens, no merges).
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_MODEL_ID = "alignprop:tiny-sd"
TINY_SDXL_MODEL_ID = "alignprop:tiny-sdxl"
TINY_VERSION = 1  # bump when the architecture below changes, so cached copies are rebuilt


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (as in OpenAI's simple_tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def tiny_clip_tokenizer():
    """Character-level ``CLIPTokenizer`` (514 tokens, max length 77)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_pipeline(path: str | os.PathLike, seed: int = 0, sample_size: int = 16):
    """Build the tiny SD-1.x pipeline with random weights (seeded) and save it to ``path``; returns ``path``.

    ``sample_size`` is the latent size: images are ``8 * sample_size`` pixels square by default.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=8 * sample_size)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _tiny_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def build_tiny_sdxl_pipeline(path: str | os.PathLike, seed: int = 0, sample_size: int = 16):
    """Build a tiny SDXL pipeline with random weights (seeded) and save it to ``path``; returns ``path``.

    Two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, hidden size 32 each, so the UNet's
    cross-attention width is 64) share the character-level tokenizer; the UNet has ``addition_embed_type=
    "text_time"`` with ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + projection_dim``
    (6 micro-conditioning ids + the pooled text embedding); the VAE has SDXL's scaling factor and
    ``force_upcast``. Images are ``8 * sample_size`` pixels square by default.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_config = _tiny_text_config(tokenizer)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=8 * sample_size, scaling_factor=0.13025,
        force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                                       use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


#: family -> (name in messages, builder)
TINY_FAMILIES = {"sd": ("SD-1.x", build_tiny_pipeline), "sdxl": ("SDXL", build_tiny_sdxl_pipeline)}


def check_tiny_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """A folder the tiny pipeline may be written to: new or empty, or any folder with ``overwrite``."""
    from alignprop_core.errors import ConfigError
    from alignprop_core.paths import check_output_dir

    folder = check_output_dir(path, "tiny-pipeline PATH")
    if folder.is_dir() and not overwrite and any(folder.iterdir()):
        raise ConfigError(f"tiny-pipeline PATH: folder '{path}' is not empty; choose a new or empty folder, or pass "
                          "--overwrite to write the pipeline files into it")
    return folder


def build_tiny(path: str | os.PathLike, family: str = "sd", overwrite: bool = False) -> Path:
    """Check ``path`` (see :func:`check_tiny_target`), then build the tiny ``family`` ("sd"/"sdxl") pipeline in it."""
    from alignprop_core.errors import ConfigError

    if family not in TINY_FAMILIES:
        raise ConfigError(f"family: got {family!r}, allowed: one of {', '.join(TINY_FAMILIES)}")
    folder = check_tiny_target(path, overwrite)
    return TINY_FAMILIES[family][1](folder)


def tiny_pipeline_path(cache_dir: str | os.PathLike | None = None, kind: str = "sd") -> Path:
    """Folder of the shared tiny pipeline (``kind`` "sd": ``alignprop:tiny-sd``; "sdxl": ``alignprop:tiny-sdxl``),
    building it on first use.

    Cached under ``$ALIGNPROP_CACHE`` (default ``~/.cache/alignprop``); built into a temporary folder and renamed,
    so an interrupted build is never picked up.
    """
    builders = {name: builder for name, (_, builder) in TINY_FAMILIES.items()}
    root = Path(cache_dir or os.environ.get("ALIGNPROP_CACHE") or Path.home() / ".cache" / "alignprop")
    path = root / f"tiny-{kind}-v{TINY_VERSION}"
    if (path / "model_index.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tiny-{kind}-v{TINY_VERSION}.tmp-{os.getpid()}"
    builders[kind](tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
