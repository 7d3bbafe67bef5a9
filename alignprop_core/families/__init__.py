"""Model families: one module per kind of diffusers pipeline, each a :class:`~alignprop_core.families.base.Family`.

``FAMILIES`` lists them; everything outside this package finds a family here (by pipeline class name before
loading, by the loaded pipeline, by name, or by the components a LoRA file adapts) and then calls only its methods.
Adding a family: a module with a :class:`Family` subclass and its instance added to ``FAMILIES``. Nothing here
imports torch or diffusers at import time.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from alignprop_core.errors import AlignPropError, ConfigError
from alignprop_core.families.base import Evaluate, Family, PromptEmbeddings
from alignprop_core.families.flux import FLUX, TINY_FLUX_MODEL_ID, FluxFamily, FluxPromptEmbeddings
from alignprop_core.families.flux2_klein import FLUX2_KLEIN, TINY_FLUX2_KLEIN_MODEL_ID, Flux2KleinFamily
from alignprop_core.families.qwen_image import QWEN_IMAGE, TINY_QWEN_IMAGE_MODEL_ID, QwenImageFamily
from alignprop_core.families.sd import SD, TINY_MODEL_ID, StableDiffusionFamily
from alignprop_core.families.sd3 import SD3, TINY_SD3_MODEL_ID, SD3PromptEmbeddings, StableDiffusion3Family
from alignprop_core.families.sdxl import SDXL, TINY_SDXL_MODEL_ID, SDXLPromptEmbeddings, StableDiffusionXLFamily
from alignprop_core.families.z_image import TINY_Z_IMAGE_MODEL_ID, Z_IMAGE, ZImageFamily, ZImagePromptEmbeddings

__all__ = ["FAMILIES", "FLUX", "FLUX2_KLEIN", "QWEN_IMAGE", "SD", "SD3", "SDXL", "TINY_FLUX2_KLEIN_MODEL_ID",
           "TINY_QWEN_IMAGE_MODEL_ID", "QwenImageFamily",
           "Flux2KleinFamily", "TINY_FLUX_MODEL_ID", "TINY_MODEL_ID", "TINY_SD3_MODEL_ID",
           "TINY_SDXL_MODEL_ID", "Evaluate", "Family", "FluxFamily", "FluxPromptEmbeddings", "PromptEmbeddings",
           "SD3PromptEmbeddings", "SDXLPromptEmbeddings", "StableDiffusion3Family", "StableDiffusionFamily",
           "StableDiffusionXLFamily", "TINY_Z_IMAGE_MODEL_ID", "Z_IMAGE", "ZImageFamily", "ZImagePromptEmbeddings",
           "family_for_class_name",
           "family_for_lora", "family_named", "family_of", "lora_components", "prepare_pipeline",
           "supported_pipelines"]

#: every family, in the order they are tried; the first is the default (LoRA files, ``save_lora``)
FAMILIES: tuple[Family, ...] = (SD, SDXL, SD3, FLUX, FLUX2_KLEIN, QWEN_IMAGE, Z_IMAGE)


def supported_pipelines() -> str:
    """The "supported:" list of messages: each pipeline class with what it is."""
    return ", ".join(f"{cls} ({family.description})" for family in FAMILIES for cls in family.pipeline_classes)


def family_named(name: Optional[Family | str] = None) -> Family:
    """The family called ``name`` (a family passes through; None: the default family)."""
    if name is None:
        return FAMILIES[0]
    if isinstance(name, Family):
        return name
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(f"family: got {name!r}, allowed: one of {', '.join(f.name for f in FAMILIES)}")


def family_for_class_name(class_name: Optional[str], source: str) -> Family:
    """The family of a pipeline class name (``_class_name`` of a ``model_index.json``), checked before any weights
    are loaded; a one-line :class:`ConfigError` naming the supported classes for anything else."""
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    raise ConfigError(f"pretrained_model: '{source}' is a {class_name or 'pipeline of unknown class'}, which "
                      f"alignprop cannot train; supported: {supported_pipelines()}")


def family_of(pipe: Any) -> Family:
    """The family of a loaded pipeline: by class (subclasses included), else an :class:`AlignPropError` naming the
    supported classes."""
    for family in FAMILIES:
        if family.handles(pipe):
            return family
    raise AlignPropError(f"the pipeline is a {type(pipe).__name__}, which alignprop cannot train; supported: "
                         f"{supported_pipelines()}")


def prepare_pipeline(pipe: Any, scheduler: str, device: Any, dtype: Any) -> Family:
    """Set a loaded pipeline up for differentiable sampling (see :meth:`Family.prepare`); returns its family."""
    family = family_of(pipe)
    family.prepare(pipe, scheduler, device, dtype)
    return family


def lora_components() -> tuple[str, ...]:
    """Every pipeline component a LoRA file of some family may adapt, in family order, each once."""
    return tuple(dict.fromkeys(c for family in FAMILIES for c in family.lora_components))


def family_for_lora(modules: Iterable[str] | Mapping[str, Iterable[str]], recorded: Optional[str] = None) -> Family:
    """The family whose pipeline class writes and loads a LoRA adapting ``modules``: pipeline components (a LoRA
    file's key prefixes), or components -> adapted module names. Of the families whose pipelines have all the
    components: the one the file records (``recorded``, see ``lora_files.file_family``), else the first that
    recognises the module names (every flow family adapts a ``transformer``), else the first."""
    wanted = set(modules)
    candidates = [family for family in FAMILIES if wanted <= set(family.lora_components)]
    if not candidates:
        raise ConfigError(f"no supported pipeline has all of {sorted(wanted)}; supported: {supported_pipelines()}")
    for family in candidates:
        if family.name == recorded:
            return family
    if isinstance(modules, Mapping):
        for family in candidates:
            if family.recognises_lora_modules({c: list(names) for c, names in modules.items()}):
                return family
    return candidates[0]
