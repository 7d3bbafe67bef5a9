"""LoRA on the UNet with peft, saved and loaded in diffusers' format (``pytorch_lora_weights.safetensors``)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from alignprop_core.errors import ConfigError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Add a gaussian-initialised LoRA adapter (B = 0, so the model is unchanged at start); returns its params."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    if "default" in (getattr(unet, "peft_config", None) or {}):
        raise ConfigError("the pipeline's UNet already has a LoRA adapter (another trainer added it): give each "
                          "trainer its own freshly loaded pipeline")
    try:
        unet.add_adapter(config)
    except ValueError as exc:
        raise ConfigError(f"lora_target_modules: {list(target_modules)} matched no UNet module ({exc}); "
                          "use attention projections such as to_q,to_k,to_v,to_out.0") from None
    from diffusers.training_utils import cast_training_params

    cast_training_params(unet, dtype=torch.float32)  # trainable parameters stay fp32 whatever the compute dtype
    return [p for p in unet.parameters() if p.requires_grad]


def unet_lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights with diffusers' key names, ready for ``save_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # diffusers renames only attention projections (to_q.lora_A -> to_q.lora.down); its loader converts the whole
    # file only when the first key is not in peft format, so a LoRA that also targets other modules (proj_in, convs,
    # ...) would silently load only in part. Use the diffusers names for every module.
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in state.items()}


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike, family: str = "sd") -> None:
    """Write ``directory/pytorch_lora_weights.safetensors`` loadable by the family's pipeline class
    (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``) ``.load_lora_weights``."""
    from alignprop_core.models import pipeline_class

    # The adapter config (rank, alpha, targets) goes into the safetensors metadata: without it diffusers would load
    # a LoRA trained with lora_alpha != lora_rank at the wrong scale.
    pipeline_class(family).save_lora_weights(save_directory=str(directory),
                                             unet_lora_layers=unet_lora_state_dict(unet),
                                             unet_lora_adapter_metadata=sorted_sets(unet.peft_config["default"]
                                                                                    .to_dict()),
                                             safe_serialization=True)
    canonicalize_safetensors_header(Path(directory) / LORA_WEIGHTS_NAME)


def sorted_sets(value: Any) -> Any:
    """``value`` with every set replaced by a sorted list (peft keeps target_modules as a set, whose order changes
    from one Python process to the next), so the metadata JSON is the same for the same adapter."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, dict):
        return {k: sorted_sets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sorted_sets(v) for v in value]
    return value


def canonicalize_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted. The safetensors writer keeps
    metadata in a hash map whose order differs between processes (measured: six saves of the same tensors, six
    different files), so identical LoRAs would not be byte-identical. Tensor entries and data are unchanged."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        data = handle.read()
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data)
    os.replace(tmp, path)


def load_lora(unet: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load diffusers-format LoRA weights from ``directory`` into the UNet's existing peft adapter."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(directory))
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ConfigError(f"LoRA in '{directory}' does not fit this UNet (unexpected keys such as {unexpected[0]}); "
                          "resume with the same lora_rank and lora_target_modules")


#: Where full fine-tuning (``use_lora: false``) writes the UNet in checkpoints and in the export.
UNET_DIR = "unet"


def save_full_unet(unet: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write the whole UNet as a diffusers model folder ``directory/unet`` (safetensors, ``from_pretrained``)."""
    unet.save_pretrained(Path(directory) / UNET_DIR, safe_serialization=True)


def load_full_unet(unet: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load the weights saved by :func:`save_full_unet` into ``unet`` (same architecture)."""
    from safetensors.torch import load_file

    folder = Path(directory) / UNET_DIR
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"'{folder}' holds no safetensors weights; pick another checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ConfigError(f"the UNet in '{folder}' does not fit this model ({'missing' if missing else 'unexpected'} "
                          f"weight {key}); resume with the same pretrained_model")
