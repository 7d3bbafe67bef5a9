"""LoRA on the denoiser with peft, saved and loaded in diffusers' format (``pytorch_lora_weights.safetensors``)
through the model family's own ``save_lora_weights`` / ``lora_state_dict`` (see :mod:`alignprop_core.families`)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from alignprop_core.errors import ConfigError
from alignprop_core.families import Family, family_named
from alignprop_core.lora_files import (  # noqa: F401 (public)
    LORA_WEIGHTS_NAME,
    canonicalize_safetensors_header,
    sorted_sets,
    unet_lora_state_dict,
)


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
        raise ConfigError(f"lora_target_modules: {list(target_modules)} matched no module of the denoiser ({exc}); "
                          "use attention projections such as to_q,to_k,to_v,to_out.0, or leave it empty for the "
                          "family's default") from None
    from diffusers.training_utils import cast_training_params

    cast_training_params(unet, dtype=torch.float32)  # trainable parameters stay fp32 whatever the compute dtype
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def fused_lora(denoiser: torch.nn.Module) -> Iterator[int]:
    """The denoiser's active LoRA folded into its base weights for the block, ``W <- W + scale * B @ A`` (peft's
    ``merge``), so that each adapted layer runs one matmul instead of three; yields the number of layers fused.

    For calls without gradients only: inside the block the LoRA factors are not used, so nothing reaches them. On
    exit every base weight is restored from a copy taken before the merge, bit for bit. peft's ``unmerge`` would
    subtract the delta again, which leaves rounding error in the frozen weights at every step, and then a resumed run
    (which reloads the base weights) would no longer equal an uninterrupted one. The copy costs one more set of the
    adapted base weights while the block runs.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer) and not m.merged and m.active_adapters
              and not getattr(m, "disable_adapters", False)]
    originals = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, originals):
                layer.get_base_layer().weight.copy_(weight)
                layer.merged_adapters.clear()


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike, family: Optional[Family | str] = None) -> None:
    """Write ``directory/pytorch_lora_weights.safetensors`` loadable by ``family``'s pipeline class
    ``.load_lora_weights`` (a :class:`Family` or its name; default: the first registered family, SD 1.x/2.x)."""
    family_named(family).save_lora(unet, directory)


def load_lora(unet: torch.nn.Module, directory: str | os.PathLike, family: Optional[Family | str] = None) -> None:
    """Load diffusers-format LoRA weights from ``directory`` into the denoiser's existing peft adapter."""
    family_named(family).load_lora(unet, directory)


#: Where full fine-tuning (``use_lora: false``) of a UNet writes it in checkpoints and in the export; a transformer
#: goes to ``transformer/`` (the folder is the family's ``denoiser_name``, as in a pipeline folder).
UNET_DIR = "unet"
DENOISER_DIRS = ("unet", "transformer")


def save_full_unet(unet: torch.nn.Module, directory: str | os.PathLike, subfolder: str = UNET_DIR) -> None:
    """Write the whole denoiser as a diffusers model folder ``directory/<subfolder>`` (safetensors,
    ``from_pretrained``)."""
    unet.save_pretrained(Path(directory) / subfolder, safe_serialization=True)


def load_full_unet(unet: torch.nn.Module, directory: str | os.PathLike, subfolder: str = UNET_DIR) -> None:
    """Load the weights saved by :func:`save_full_unet` into ``unet`` (same architecture)."""
    from safetensors.torch import load_file

    folder = Path(directory) / subfolder
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"'{folder}' holds no safetensors weights; pick another checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ConfigError(f"the {subfolder} in '{folder}' does not fit this model "
                          f"({'missing' if missing else 'unexpected'} weight {key}); resume with the same "
                          "pretrained_model")


class TrainedWeights:
    """What a run trains and how those weights are saved: a LoRA on the family's denoiser (exported in the family's
    own LoRA format), or with ``use_lora`` off the whole denoiser (exported as a diffusers model folder ``unet/``)."""

    def __init__(self, family: Any, use_lora: bool):
        self.family, self.use_lora = family, use_lora

    @property
    def export_name(self) -> str:
        return LORA_WEIGHTS_NAME if self.use_lora else self.family.denoiser_name

    def attach(self, denoiser: torch.nn.Module, config: Any) -> list[torch.nn.Parameter]:
        """Make the weights trainable (add the LoRA, or unfreeze every weight as fp32 master weights; autocast
        computes in the mixed-precision dtype) and return them."""
        if self.use_lora:
            return add_lora(denoiser, config.lora_rank, config.lora_alpha, config.lora_target_modules)
        denoiser.to(torch.float32).requires_grad_(True)
        return list(denoiser.parameters())

    def save(self, denoiser: torch.nn.Module, folder: Path) -> None:
        if self.use_lora:
            save_lora(denoiser, folder, self.family)
        else:
            save_full_unet(denoiser, folder, self.family.denoiser_name)

    def load(self, denoiser: torch.nn.Module, folder: Path) -> None:
        if self.use_lora:
            load_lora(denoiser, folder, self.family)
        else:
            load_full_unet(denoiser, folder, self.family.denoiser_name)
