"""LoRA soup (``alignprop mix``): a weighted combination of diffusers-format LoRAs as one LoRA.

A LoRA changes a weight by ``delta = scale * B @ A`` with ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with
rsLoRA). The mix must change it by ``sum_i w_i * delta_i``. Scaling both factors of each LoRA by ``w_i`` (what the
original AlignProp code did) scales the change by ``w_i ** 2`` instead. Here the factors are concatenated along the
rank, which is exact for any number of LoRAs, ranks, alphas and target modules::

    A = [A_1; A_2; ...]                                  (rank r_1 + r_2 + ...)
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]                  so B @ A = sum_i w_i s_i B_i A_i
    alpha = rank                                          (scale 1, written to the adapter metadata)

A module that only some LoRAs adapt gets only their blocks (its own rank, recorded in ``rank_pattern``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from alignprop_core.errors import ConfigError
from alignprop_core.families import FAMILIES, family_for_lora, lora_components
from alignprop_core.lora import LORA_WEIGHTS_NAME
from alignprop_core.lora_files import file_family
from alignprop_core.paths import check_output_dir

#: pipeline components a LoRA file can hold: those of every family
COMPONENTS = lora_components()
MIX_INFO_NAME = "alignprop_mix.json"


@dataclass
class LoraModule:
    """One adapted module: ``delta = scale * up @ down`` (down = A ``[r, in, ...]``, up = B ``[out, r, ...]``)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module changes: ``[out, in, ...]``."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """The weight change this module adds (float32)."""
        down, up = self.down.float(), self.up.float()
        return self.scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def read_lora(directory: str | os.PathLike) -> dict[str, dict[str, LoraModule]]:
    """``{component: {module name: LoraModule}}`` of a diffusers-format LoRA folder, each module with its scale
    ``alpha / rank`` from the file's adapter metadata (``alpha_pattern``, ``use_rslora`` honoured), from kohya
    network alphas, or 1 (alpha = rank) when the file says nothing."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils.other import get_pattern_key

    path = Path(directory)
    if not (path / LORA_WEIGHTS_NAME).is_file():
        raise ConfigError(f"LoRA folder '{directory}' has no {LORA_WEIGHTS_NAME}; pass folders written by "
                          "alignprop train (or any diffusers-format LoRA folder)")
    try:
        # the default family's reader: diffusers' lora_state_dict reads any family's file of these components
        state, network_alphas, metadata = FAMILIES[0].lora_state_dict(
            path, weight_name=LORA_WEIGHTS_NAME, return_lora_metadata=True, local_files_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"cannot read the LoRA in '{directory}' ({type(exc).__name__}: {first})") from None
    metadata, network_alphas = metadata or {}, network_alphas or {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            raise ConfigError(f"LoRA '{directory}' has weights for '{component}' ({key}); alignprop mix handles "
                              f"LoRAs of {', '.join(f.description for f in FAMILIES)} ({', '.join(COMPONENTS)})")
        grouped.setdefault(component, {})[rest] = value
    result: dict[str, dict[str, LoraModule]] = {}
    for component, weights in grouped.items():
        # every diffusers/peft naming (lora.down, to_q_lora.down, lora_linear_layer.down, lora_A) -> lora_A/lora_B
        weights = {k.replace(".lora_linear_layer.down.", ".lora_A.").replace(".lora_linear_layer.up.", ".lora_B."): v
                   for k, v in convert_unet_state_dict_to_peft(weights).items()}
        unsupported = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if unsupported:
            what = ("DoRA magnitudes or LoRA biases" if any(w in unsupported[0] for w in ("magnitude", "bias"))
                    else "an unknown key format")
            raise ConfigError(f"LoRA '{directory}' has weights alignprop mix cannot combine (e.g. {unsupported[0]}: "
                              f"{what}); only plain LoRA factors can be mixed")
        config = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")}
        alpha_pattern = config.get("alpha_pattern") or {}
        modules = {}
        for key in weights:
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[:-len(".lora_A.weight")]
            up = weights.get(f"{name}.lora_B.weight")
            if up is None:
                raise ConfigError(f"LoRA '{directory}' has {key} but no matching lora_B/up weight")
            down = weights[key]
            rank = down.shape[0]
            if up.dim() < 2 or up.shape[1] != rank:
                raise ConfigError(f"LoRA '{directory}' is damaged: {component}.{name} has lora_A of rank {rank} but "
                                  f"lora_B of shape {list(up.shape)}; re-export it or leave it out")
            if "lora_alpha" in config:
                alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), config["lora_alpha"]))
            else:
                alpha = float(network_alphas.get(f"{component}.{name}.alpha", network_alphas.get(f"{name}.alpha",
                                                                                               rank)))
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            modules[name] = LoraModule(down, up, scale)
        result[component] = modules
    return result


def check_same_shapes(loras: Sequence[dict[str, dict[str, LoraModule]]], directories: Sequence[Path]) -> None:
    """Every module adapted by several LoRAs changes a weight of the same shape in each, or a one-line error naming
    both folders (LoRAs of different base models, e.g. SD 1.x and SDXL, differ here)."""
    first: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for lora, directory in zip(loras, directories):
        for component, modules in lora.items():
            for name, module in modules.items():
                key = f"{component}.{name}"
                seen = first.setdefault(key, (directory, module.delta_shape))
                if seen[1] != module.delta_shape:
                    raise ConfigError(
                        f"cannot mix '{seen[0]}' and '{directory}': they adapt {key} with different shapes "
                        f"({list(seen[1])} vs {list(module.delta_shape)}), so they were trained on different base "
                        "models (e.g. SD 1.x and SDXL); mix only LoRAs of the same base model")


def check_lora_folder(directory: str | os.PathLike) -> Path:
    """An existing folder (not a file, not an empty path) given as a LoRA folder."""
    if not str(directory).strip():
        raise ConfigError("LoRA folder: got an empty path; pass folders written by alignprop train")
    path = Path(directory)
    if path.is_file():
        where = f" (pass its folder '{path.parent}')" if path.name == LORA_WEIGHTS_NAME else ""
        raise ConfigError(f"LoRA folder '{directory}' is a file, not a folder{where}; pass the folder that holds "
                          f"{LORA_WEIGHTS_NAME}")
    if not path.is_dir():
        raise ConfigError(f"LoRA folder '{directory}' does not exist; pass a folder written by alignprop train (it "
                          f"holds {LORA_WEIGHTS_NAME})")
    return path


def check_mix_output(out_dir: str | os.PathLike, directories: Sequence[Path], overwrite: bool) -> Path:
    """The output folder: creatable, not one of the inputs, and holding no LoRA unless ``overwrite``."""
    out = check_output_dir(out_dir, "-o")
    if any(out.resolve() == d.resolve() for d in directories):
        raise ConfigError(f"-o: '{out_dir}' is one of the inputs; write the mix to a new folder")
    if (out / LORA_WEIGHTS_NAME).exists() and not overwrite:
        raise ConfigError(f"-o: '{out_dir}' already holds a LoRA ({LORA_WEIGHTS_NAME}); pass --overwrite to replace "
                          "it, or choose another folder")
    return out


def mix_modules(loras: Sequence[dict[str, dict[str, LoraModule]]],
                weights: Sequence[float]) -> dict[str, dict[str, LoraModule]]:
    """Exact weighted combination: per module, factors concatenated along the rank with scale 1."""
    mixed: dict[str, dict[str, LoraModule]] = {}
    components = sorted({c for lora in loras for c in lora})
    for component in components:
        names = sorted({n for lora in loras for n in lora.get(component, {})})
        out: dict[str, LoraModule] = {}
        for name in names:
            parts = [(w, lora[component][name]) for lora, w in zip(loras, weights)
                     if w != 0 and name in lora.get(component, {})]
            if not parts:
                continue
            dtype = parts[0][1].down.dtype
            for _, module in parts[1:]:
                dtype = torch.promote_types(dtype, module.down.dtype)
            down = torch.cat([m.down.float() for _, m in parts], dim=0)
            up = torch.cat([w * m.scale * m.up.float() for w, m in parts], dim=1)
            out[name] = LoraModule(down.to(dtype), up.to(dtype), 1.0)
        if out:
            mixed[component] = out
    return mixed


def adapter_metadata(modules: dict[str, LoraModule]) -> dict:
    """peft ``LoraConfig`` for the mixed modules: alpha = rank everywhere (scale 1); modules whose rank differs
    from the most common one are listed in ``rank_pattern``/``alpha_pattern`` by full name."""
    from peft import LoraConfig

    ranks = {name: module.rank for name, module in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(ranks), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), init_lora_weights=True)
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def save_modules(modules: dict[str, dict[str, LoraModule]], directory: str | os.PathLike,
                 recorded_family: Optional[str] = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` (diffusers format, with adapter metadata) through the
    family of the adapted modules (``recorded_family``: the one the source files record, if they agree)."""
    layers, metadata = {}, {}
    for component in COMPONENTS:
        if component not in modules:
            continue
        # peft key names (lora_A/lora_B) for every module: diffusers loads them as they are, for any module type
        state = {}
        for name, module in modules[component].items():
            state[f"{name}.lora_A.weight"] = module.down.contiguous()
            state[f"{name}.lora_B.weight"] = module.up.contiguous()
        layers[component] = state
        metadata[component] = adapter_metadata(modules[component])
    family_for_lora(modules, recorded_family).save_lora_weights(directory, layers, metadata)
    return Path(directory) / LORA_WEIGHTS_NAME


def _numbers(weights: Sequence[Any]) -> list[float]:
    try:
        return [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"--weights: got {list(weights)}; give one number per LoRA") from None


def mix_loras(directories: Sequence[str | os.PathLike], weights: Optional[Sequence[float]] = None,
              out_dir: str | os.PathLike = "alignprop-mix", overwrite: bool = False) -> Path:
    """Combine the LoRAs in ``directories`` with ``weights`` (default: equal, summing to 1) into ``out_dir``, so
    that ``pipe.load_lora_weights(out_dir)`` changes the model by ``sum_i w_i * delta_i``. Returns the file.
    A LoRA already in ``out_dir`` is replaced only with ``overwrite``; nothing is written before every check passed."""
    if not directories:
        raise ConfigError("give at least one LoRA folder to mix")
    weights = [1.0 / len(directories)] * len(directories) if weights is None else _numbers(weights)
    if len(weights) != len(directories):
        raise ConfigError(f"--weights: got {len(weights)} weights for {len(directories)} LoRAs; give one weight "
                          "per LoRA")
    if not all(math.isfinite(w) for w in weights) or not any(weights):
        raise ConfigError(f"--weights: got {weights}; give finite numbers, not all zero")
    directories = [check_lora_folder(d) for d in directories]
    out = check_mix_output(out_dir, directories, overwrite)
    loras = [read_lora(d) for d in directories]
    check_same_shapes(loras, directories)
    mixed = mix_modules(loras, weights)
    recorded = {file_family(Path(d) / LORA_WEIGHTS_NAME) for d in directories}
    out.mkdir(parents=True, exist_ok=True)
    file = save_modules(mixed, out, recorded.pop() if len(recorded) == 1 else None)
    info = {"method": "concatenate along the rank: delta = sum_i weight_i * alpha_i/rank_i * B_i @ A_i",
            "sources": [str(d) for d in directories], "weights": weights,
            "modules": {c: len(m) for c, m in mixed.items()},
            "rank": {c: sorted({m.rank for m in mods.values()}) for c, mods in mixed.items()}}
    (out / MIX_INFO_NAME).write_text(json.dumps(info, indent=1))
    return file
