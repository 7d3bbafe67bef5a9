"""Finding and loading the base pipeline: tiny model ids, local folders, hub ids (with a fast offline check), aliases
of removed hub ids, and a fingerprint of the base model that checkpoints record."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from alignprop_core.errors import AlignPropError, ConfigError, first_line
from alignprop_core.families import family_for_class_name, family_of, prepare_pipeline
from alignprop_core.model_setup import apply_model_settings
from alignprop_core.models import MODEL_ALIASES, pipeline_class_name
from alignprop_core.tiny import tiny_model_path


def resolve_model_path(model: str) -> str:
    """A tiny model id (``alignprop:tiny-sd``, ...) -> the cached tiny pipeline; a removed hub id -> its maintained
    copy (with a one-line note); a local path must be a diffusers pipeline folder of a supported class; anything else
    is treated as a hub id."""
    tiny = tiny_model_path(model)
    if tiny is not None:
        return str(tiny)
    if model in MODEL_ALIASES:
        print(f"note: '{model}' was removed from the Hugging Face Hub; using its maintained copy "
              f"'{MODEL_ALIASES[model]}'", file=sys.stderr)
        return MODEL_ALIASES[model]
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local:
        if path.is_file():
            raise ConfigError(f"pretrained_model: '{model}' is a file; give a diffusers pipeline folder (the one "
                              "holding model_index.json) or a hub id")
        if not path.is_dir():
            raise ConfigError(f"pretrained_model: folder '{model}' does not exist; give a diffusers pipeline folder "
                              "or a hub id")
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"pretrained_model: '{model}' has no model_index.json, so it is not a diffusers "
                              "pipeline folder (save one with pipe.save_pretrained)")
        family_for_class_name(pipeline_class_name(path), model)  # a supported family, checked before any loading
        check_component_folders(path, model)
        return str(path)
    return model


def hub_unreachable_reason(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot come from the hub right now without waiting for retries (offline mode and not
    cached, or no connection to the hub's host within 3 s), or None when loading may go ahead."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    if constants.HF_HUB_OFFLINE:
        return None if cached else "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    if not hub_host_reachable():
        if cached:
            os.environ["HF_HUB_OFFLINE"] = "1"  # only the cache can serve it: skip the hub's retries
            constants.HF_HUB_OFFLINE = True
            return None
        return f"the Hugging Face Hub ({hub_host()}) cannot be reached (no network?) and it is not in the local cache"
    return None


def hub_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def hub_host_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds (no retries)."""
    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_pipeline(model: str, revision: str = "main"):
    """Load a supported pipeline from a hub id or folder: the class named in its ``model_index.json``, loaded by its
    family (without the parts sampling never uses, such as a safety checker); any other class is a one-line error
    naming the supported ones, raised before weights are fetched."""
    from diffusers import DiffusionPipeline

    local = Path(model).is_dir()
    if not local:
        reason = hub_unreachable_reason(model)
        if reason:
            raise AlignPropError(f"could not load pipeline '{model}': {reason}; download it where there is network "
                                 "(huggingface-cli download) and pass the local folder as pretrained_model, or set "
                                 "HF_HUB_OFFLINE=1 to use only the cache")
    try:
        class_name = (pipeline_class_name(model) if local
                      else DiffusionPipeline.load_config(model, revision=revision).get("_class_name"))
        family = family_for_class_name(class_name, model)
        pipe = family.load(model, local_files_only=True) if local else family.load(model, revision=revision)
        check_components(pipe, model)
        return pipe
    except AlignPropError:
        raise
    except Exception as exc:  # a missing or broken component: name it, never a traceback
        first = first_line(exc) or type(exc).__name__
        hint = ("the folder is incomplete or damaged: re-save it with pipe.save_pretrained" if local else
                "without network, download it elsewhere and pass the local folder as pretrained_model")
        raise AlignPropError(f"could not load pipeline '{model}' ({type(exc).__name__}: {first[:200]}); {hint}") \
            from None


def check_component_folders(path: Path, source: str) -> None:
    """Every component that ``model_index.json`` lists must have its folder: without ``tokenizer/`` diffusers builds
    a 2-token tokenizer with no length limit and sampling fails (or hangs) much later."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    for name, entry in index.items():
        listed = isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
        if not name.startswith("_") and listed and not (path / name).is_dir():
            raise ConfigError(f"pretrained_model: '{source}' lists a {name} in model_index.json but has no {name}/ "
                              "folder; re-save the pipeline with pipe.save_pretrained, or download it again")


def check_components(pipe: Any, source: str) -> None:
    """A one-line error when a required part of the pipeline is missing (diffusers loads a folder without, say,
    its tokenizer as ``tokenizer=None``, and sampling would fail later with a traceback)."""
    optional = set(getattr(pipe, "_optional_components", []) or [])
    missing = [name for name, part in pipe.components.items() if part is None and name not in optional]
    if missing:
        raise AlignPropError(f"pipeline '{source}' has no {missing[0]} (the folder lacks {missing[0]}/ or its "
                             "files); re-save the pipeline with pipe.save_pretrained, or download it again")


def denoiser_fingerprint(denoiser: Any) -> str:
    """A short hash of the denoiser's config and first weight tensor (rounded to fp16, so the compute dtype does not
    change it): two checkpoints of the same base model agree, two different fine-tunes almost surely do not."""
    import torch

    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    digest = hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=8)
    first = next(iter(denoiser.parameters()), None)
    if first is not None:
        digest.update(first.detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()


def unwrap_pipeline(sd_pipeline: Any, use_lora: bool) -> tuple[Any, bool]:
    """A diffusers pipeline as given, or the ``.sd_pipeline`` of a TRL-style wrapper, whose ``use_lora`` wins."""
    if sd_pipeline is not None and hasattr(sd_pipeline, "sd_pipeline"):
        return sd_pipeline.sd_pipeline, bool(getattr(sd_pipeline, "use_lora", use_lora))
    return sd_pipeline, use_lora


def check_steps_fit_the_scheduler(num_steps: int, pipe: Any) -> None:
    """``sample_num_steps`` may not exceed the timesteps the model was trained with."""
    trained = int(getattr(pipe.scheduler.config, "num_train_timesteps", 0) or 0)
    if trained and num_steps > trained:
        raise ConfigError(f"sample_num_steps: got {num_steps}, allowed: at most the model's {trained} training "
                          "timesteps")


def image_size(config: Any, pipe: Any) -> tuple[int, int]:
    """``(height, width)`` from the config, defaulting to the model's own size; a multiple of the VAE factor."""
    family = family_of(pipe)
    factor = family.size_multiple(pipe)
    default = family.default_size(pipe)
    height = config.height or config.resolution or default
    width = config.width or config.resolution or default
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise ConfigError(f"{name}: got {value}, allowed: a multiple of this model's VAE factor {factor}")
    return height, width


def compute_dtype(mixed_precision: str) -> Any:
    """The dtype of frozen weights for ``mixed_precision`` (no, fp16, bf16): the trainer's and eval's one rule."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def resolve_mixed_precision(mixed_precision: str, family: Any) -> str:
    """``auto`` -> the family's default on a GPU (fp16 for SD/SDXL, bf16 for SD3/FLUX), ``no`` on CPU; any other
    value as given."""
    import torch

    if mixed_precision != "auto":
        return mixed_precision
    return family.default_mixed_precision if torch.cuda.is_available() else "no"


def inference_device() -> Any:
    """Where eval and sample run: the GPU when there is one."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_inference_pipeline(config: Any) -> tuple[Any, Any]:
    """``(pipe, dtype)``: the config's pipeline set up as the trainer sets it up, prepared by its family (its
    ``scheduler``, frozen, on :func:`inference_device`, in the ``mixed_precision`` dtype on a GPU, fp32 on CPU)."""
    import torch

    pipe = load_pipeline(resolve_model_path(config.pretrained_model), config.pretrained_revision)
    device = inference_device()
    dtype = (compute_dtype(resolve_mixed_precision(config.mixed_precision, family_of(pipe))) if device.type == "cuda"
             else torch.float32)
    prepare_pipeline(pipe, config.scheduler, device, dtype)
    family = family_of(pipe)
    apply_model_settings(pipe, family.denoiser(pipe), family, config, training=False)
    return pipe, dtype
