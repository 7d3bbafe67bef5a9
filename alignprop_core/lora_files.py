"""The diffusers LoRA file format: file name, peft -> diffusers key names, and a byte-stable safetensors header.

The family adapters (``alignprop_core.families``) write and read LoRA files with these; :mod:`alignprop_core.lora`
(which calls the families) re-exports them. No torch, diffusers or peft at import time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def unet_lora_state_dict(unet: Any) -> dict[str, Any]:
    """The denoiser's LoRA weights with diffusers' key names, ready for ``save_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # diffusers renames only attention projections (to_q.lora_A -> to_q.lora.down); its loader converts the whole
    # file only when the first key is not in peft format, so a LoRA that also targets other modules (proj_in, convs,
    # ...) would silently load only in part. Use the diffusers names for every module.
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in state.items()}


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


#: metadata key naming the family whose pipeline wrote a LoRA file, where the adapted components cannot tell (every
#: flow-matching family adapts a ``transformer``)
FAMILY_KEY = "alignprop_family"


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors file's JSON header (tensor entries and ``__metadata__``)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def file_family(path: str | os.PathLike) -> str | None:
    """The family name a LoRA file records (:data:`FAMILY_KEY`), or None (SD/SDXL files, files of other tools)."""
    try:
        return (read_header(path).get("__metadata__") or {}).get(FAMILY_KEY)
    except (OSError, ValueError, struct.error):
        return None


def canonicalize_safetensors_header(path: Path, extra_metadata: dict[str, str] | None = None) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted (``extra_metadata`` added). The
    safetensors writer keeps metadata in a hash map whose order differs between processes (measured: six saves of
    the same tensors, six different files), so identical LoRAs would not be byte-identical. Tensor entries and data
    are unchanged."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        data = handle.read()
    if extra_metadata:
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra_metadata}
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data)
    os.replace(tmp, path)
