"""``AlignPropConfig``: every training setting, its default, its meaning and its allowed range.

Field names and defaults follow TRL's ``AlignPropConfig`` where TRL had the field. Loading from YAML/TOML,
command-line overrides and validation live here too; this module imports no torch so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from alignprop_core.errors import ConfigError, first_line
from alignprop_core.models import SCHEDULERS

MIXED_PRECISIONS = ("no", "fp16", "bf16")
TRUNCATIONS = ("fixed", "uniform", "gaussian", "none", "draft_lv")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio", "all")
#: TRL's truncation fields, accepted in config files and translated (see ``_translate_trl_truncation``).
TRL_TRUNCATION_FIELDS = ("truncated_backprop_rand", "truncated_backprop_timestep", "truncated_rand_backprop_minmax")


@dataclass
class RewardSpec:
    """One reward of the weighted sum: ``name`` (as registered by a plugin), ``weight``, factory ``options``."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginSpec:
    """A prompt source or image logger selected by ``name``, with factory ``options``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING, group: str = ""):
    meta = {"help": help, "group": group}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AlignPropConfig:
    """Configuration of an AlignProp run. Every field has a default; ``validate()`` checks ranges."""

    # --- model and data
    pretrained_model: str = _f(
        "runwayml/stable-diffusion-v1-5",
        "diffusers pipeline: a hub id or a local folder ('alignprop:tiny-sd' = tiny random-weight offline model)",
        group="model")
    pretrained_revision: str = _f("main", "hub revision of pretrained_model", group="model")
    rewards: list[RewardSpec] = _f(
        help="rewards to maximise, weighted sum: list of {name, weight, options}, or 'name:weight,name2:weight2'",
        factory=lambda: [RewardSpec("aesthetic", 1.0)], group="model")
    prompts: PluginSpec = _f(help="prompt source: {name, options} or a name (simple_animals, imagenet_animals, "
                             "nouns_activities, counting, from_file)",
                             factory=lambda: PluginSpec("simple_animals"), group="model")
    negative_prompts: Optional[str] = _f(None, "negative prompt used for classifier-free guidance", group="model")
    resolution: Optional[int] = _f(None, "square image size in pixels (default: the model's own)", group="model")
    height: Optional[int] = _f(None, "image height in pixels, overrides resolution (multiple of the VAE factor)",
                               group="model")
    width: Optional[int] = _f(None, "image width in pixels, overrides resolution (multiple of the VAE factor)",
                              group="model")
    # --- sampling
    sample_num_steps: int = _f(50, "denoising steps per sample (>= 1)", group="sampling")
    scheduler: str = _f("ddim", "sampler, built from the model's scheduler config: " + ", ".join(SCHEDULERS),
                        group="sampling")
    sample_eta: float = _f(1.0, "DDIM eta in [0, 1] (0 = deterministic); used by scheduler=ddim only",
                           group="sampling")
    sample_guidance_scale: float = _f(5.0, "classifier-free guidance scale (<= 1 disables guidance)",
                                      group="sampling")
    truncation: str = _f("uniform", "truncated backprop: fixed (last truncation_k steps), uniform (K ~ U[min, max]), "
                         "gaussian (K ~ N(mean, std) clipped), none (all steps), draft_lv (K = 1 with draft_lv_n "
                         "re-noised copies of the last step); K drawn once per batch", group="sampling")
    truncation_k: int = _f(1, "K for truncation=fixed: gradients flow through the last K steps, in [1, steps]",
                           group="sampling")
    truncation_min: int = _f(1, "smallest K for truncation=uniform, in [1, steps]", group="sampling")
    truncation_max: Optional[int] = _f(None, "largest K for truncation=uniform, in [truncation_min, steps] "
                                       "(default: sample_num_steps)", group="sampling")
    truncation_mean: float = _f(8.0, "mean K for truncation=gaussian", group="sampling")
    truncation_std: float = _f(5.0, "std of K for truncation=gaussian (> 0); K is rounded and clipped to "
                               "[1, steps]", group="sampling")
    draft_lv_n: int = _f(2, "truncation=draft_lv: re-noised copies of the last step whose reward gradients are "
                         "averaged (>= 1)", group="sampling")
    gradient_checkpointing: bool = _f(True, "recompute each UNet call in backward instead of storing activations",
                                      group="sampling")
    # --- training
    num_epochs: int = _f(100, "optimizer steps to run (TRL: one epoch = one optimizer update)", group="training")
    train_batch_size: int = _f(1, "images sampled per micro-batch per process", group="training")
    train_gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", group="training")
    train_learning_rate: float = _f(1e-3, "AdamW learning rate", group="training")
    train_adam_beta1: float = _f(0.9, "AdamW beta1 in [0, 1)", group="training")
    train_adam_beta2: float = _f(0.999, "AdamW beta2 in [0, 1)", group="training")
    train_adam_weight_decay: float = _f(1e-4, "AdamW weight decay (>= 0)", group="training")
    train_adam_epsilon: float = _f(1e-8, "AdamW epsilon (> 0)", group="training")
    train_use_8bit_adam: bool = _f(False, "use bitsandbytes 8-bit AdamW (needs bitsandbytes and a GPU)",
                                   group="training")
    train_max_grad_norm: float = _f(1.0, "clip the LoRA gradient norm to this value (> 0)", group="training")
    max_nonfinite_steps: int = _f(5, "stop after this many optimizer steps in a row with NaN/inf rewards or loss "
                                  "(each such step is skipped; the last good LoRA is kept)", group="training")
    mixed_precision: str = _f("fp16", "no, fp16 or bf16 (frozen weights in that dtype, LoRA in fp32; "
                              "falls back to 'no' on CPU)", group="training")
    allow_tf32: bool = _f(True, "allow TF32 matmuls on Ampere+ GPUs", group="training")
    seed: int = _f(0, "random seed (prompts, noise, truncation draws)", group="training")
    lora_rank: int = _f(4, "LoRA rank (>= 1)", group="training")
    lora_alpha: float = _f(4.0, "LoRA alpha (> 0); the update is scaled by alpha / rank", group="training")
    lora_target_modules: list[str] = _f(help="UNet modules that get LoRA adapters",
                                        factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], group="training")
    # --- output, checkpoints, logging
    output_dir: str = _f("alignprop-output", "where checkpoints, logs and the final LoRA are written",
                         group="output")
    save_freq: int = _f(1, "save a checkpoint every this many optimizer steps", group="output")
    num_checkpoint_limit: int = _f(5, "keep at most this many checkpoints (oldest pruned)", group="output")
    resume_from: str = _f("", "resume from a checkpoint folder, or 'latest' in output_dir/checkpoints",
                          group="output")
    overwrite_output_dir: bool = _f(False, "start afresh in an output_dir that holds an earlier run, deleting its "
                                    "checkpoints (off: such a run is refused, so no work is lost)", group="output")
    eval_num_samples: int = _f(4, "fixed-seed samples scored before and after training (0 = skip)",
                               group="output")
    eval_seed: int = _f(1234, "seed of the fixed evaluation samples and prompts", group="output")
    image_loggers: list[PluginSpec] = _f(help="image loggers (folder, tensorboard, wandb; see docs/evaluation.md): "
                                         "list of names or {name, options}", factory=list, group="output")
    log_image_freq: int = _f(1, "call image loggers / the image hook every this many optimizer steps",
                             group="output")
    log_with: Optional[str] = _f(None, "accelerate tracker: tensorboard, wandb, ... (None = no tracker)",
                                 group="output")
    tracker_project_name: str = _f("alignprop", "tracker project name", group="output")
    tracker_kwargs: dict[str, Any] = _f(help="extra init_kwargs for the tracker", factory=dict, group="output")
    accelerator_kwargs: dict[str, Any] = _f(help="extra keyword arguments for accelerate.Accelerator",
                                            factory=dict, group="output")
    project_kwargs: dict[str, Any] = _f(help="extra keyword arguments for accelerate's ProjectConfiguration",
                                        factory=dict, group="output")
    push_to_hub: bool = _f(False, "upload the final LoRA to the Hugging Face Hub", group="output")
    hub_model_id: Optional[str] = _f(None, "hub repo id for push_to_hub (default: output_dir's name)",
                                     group="output")

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        self.rewards = _as_rewards(self.rewards)
        self.prompts = _as_plugin_spec(self.prompts, "prompts")
        self.image_loggers = [_as_plugin_spec(x, "image_loggers") for x in _as_list(self.image_loggers, "image_loggers")]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AlignPropConfig":
        """Build from a mapping (e.g. a parsed YAML file). Unknown keys are an error naming the closest field."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of field: value, got {type(values).__name__}")
        values = dict(values)
        _translate_trl_truncation(values)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config field '{key}'{hint}; see `alignprop train --help` for all fields")
        converted = {key: coerce(key, value) for key, value in values.items()}
        return cls(**converted)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "AlignPropConfig":
        """Load a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file."""
        return cls.from_dict(read_config_file(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides: Any) -> "AlignPropConfig":
        """A copy with ``overrides`` (values coerced like command-line strings when they are strings)."""
        merged = self.to_dict()
        merged.update(overrides)
        return AlignPropConfig.from_dict(merged)

    # ------------------------------------------------------------------ derived values
    @property
    def truncation_range(self) -> tuple[int, int]:
        """Inclusive range of K for the configured strategy, after defaults."""
        steps = self.sample_num_steps
        if self.truncation == "fixed":
            return self.truncation_k, self.truncation_k
        if self.truncation == "none":
            return steps, steps
        if self.truncation == "draft_lv":
            return 1, 1
        if self.truncation == "uniform":
            return self.truncation_min, self.truncation_max if self.truncation_max is not None else steps
        return 1, steps

    # ------------------------------------------------------------------ validation
    def validate(self) -> "AlignPropConfig":
        """Raise a one-line :class:`ConfigError` naming the first invalid field and its allowed range."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        steps = self.sample_num_steps
        _require(steps >= 1, "sample_num_steps", steps, "an integer >= 1")
        _require(0.0 <= self.sample_eta <= 1.0, "sample_eta", self.sample_eta, "a number in [0, 1]")
        _require(self.sample_guidance_scale >= 0, "sample_guidance_scale", self.sample_guidance_scale, ">= 0")
        _require(self.truncation in TRUNCATIONS, "truncation", self.truncation, "one of " + ", ".join(TRUNCATIONS))
        _require(self.scheduler in SCHEDULERS, "scheduler", self.scheduler, "one of " + ", ".join(SCHEDULERS))
        _require(self.draft_lv_n >= 1, "draft_lv_n", self.draft_lv_n, "an integer >= 1")
        if self.truncation == "fixed":
            _require(1 <= self.truncation_k <= steps, "truncation_k", self.truncation_k,
                     f"an integer in [1, sample_num_steps={steps}]")
        if self.truncation == "uniform":
            _require(1 <= self.truncation_min <= steps, "truncation_min", self.truncation_min,
                     f"an integer in [1, sample_num_steps={steps}]")
            if self.truncation_max is not None:
                _require(self.truncation_min <= self.truncation_max <= steps, "truncation_max", self.truncation_max,
                         f"an integer in [truncation_min={self.truncation_min}, sample_num_steps={steps}]")
        if self.truncation == "gaussian":
            _require(self.truncation_std > 0, "truncation_std", self.truncation_std, "a number > 0")
        for name in ("num_epochs", "train_batch_size", "train_gradient_accumulation_steps", "save_freq",
                     "num_checkpoint_limit", "log_image_freq", "lora_rank", "max_nonfinite_steps"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        _require(self.eval_num_samples >= 0, "eval_num_samples", self.eval_num_samples, "an integer >= 0")
        for name in ("train_learning_rate", "train_adam_epsilon", "train_max_grad_norm", "lora_alpha"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, value, "a finite number > 0")
        for name in ("train_adam_beta1", "train_adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "a number in [0, 1)")
        _require(self.train_adam_weight_decay >= 0, "train_adam_weight_decay", self.train_adam_weight_decay, ">= 0")
        _require(self.mixed_precision in MIXED_PRECISIONS, "mixed_precision", self.mixed_precision,
                 "one of " + ", ".join(MIXED_PRECISIONS))
        _require(self.log_with is None or self.log_with in TRACKERS, "log_with", self.log_with,
                 "empty or one of " + ", ".join(TRACKERS))
        for name in ("resolution", "height", "width"):
            value = getattr(self, name)
            _require(value is None or (value >= 8 and value % 8 == 0), name, value,
                     "empty or a positive multiple of 8 (the VAE downsampling factor)")
        _require(bool(self.lora_target_modules), "lora_target_modules", self.lora_target_modules,
                 "a non-empty list of module names, e.g. to_q,to_k,to_v,to_out.0")
        _require(bool(self.pretrained_model), "pretrained_model", self.pretrained_model, "a hub id or a folder")
        _require(bool(self.output_dir), "output_dir", self.output_dir, "a folder path")
        _require(bool(self.rewards), "rewards", self.rewards, "at least one {name, weight}")
        for i, reward in enumerate(self.rewards):
            _require(math.isfinite(reward.weight), f"rewards[{i}].weight", reward.weight, "a finite number")
        total = sum(r.weight for r in self.rewards)
        _require(total > 0, "rewards", f"weights summing to {total:g}",
                 "weights whose sum is > 0 (the loss maximises the weighted sum)")
        names = [r.name for r in self.rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, "rewards", ", ".join(dupes), "each reward name at most once (merge their weights)")
        if self.push_to_hub and not (self.hub_model_id or Path(self.output_dir).name):
            raise ConfigError("hub_model_id: required with push_to_hub")
        return self


# ---------------------------------------------------------------------- helpers


def field_docs() -> list[tuple[str, str, Any, str, str]]:
    """(name, type name, default, help, group) for every field, in declaration order."""
    docs = []
    for f in dataclasses.fields(AlignPropConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [dataclasses.asdict(d) for d in default]
        elif dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        docs.append((f.name, _type_name(f.type), default, f.metadata.get("help", ""), f.metadata.get("group", "")))
    return docs


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path to a .yaml or .toml file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:
        first = first_line(exc) or type(exc).__name__
        raise ConfigError(f"config file '{path}' is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                          f"{first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of field: value")
    return data


def coerce(name: str, value: Any) -> Any:
    """Turn a command-line string (or YAML value) into the type of field ``name``."""
    types = {f.name: f.type for f in dataclasses.fields(AlignPropConfig)}
    kind = _type_name(types[name])
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind.startswith("Optional") and text.lower() in ("", "none", "null"):
        return None
    base = kind.removeprefix("Optional[").removesuffix("]")
    try:
        if base == "bool":
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}: expected {base}, got '{value}'") from None
    if base == "str":
        return value
    if name == "rewards" and not text.startswith(("[", "{", "-")):
        return [_parse_reward_shorthand(item) for item in text.split(",") if item.strip()]
    if name in ("image_loggers", "lora_target_modules") and not text.startswith(("[", "{", "-")):
        return [item.strip() for item in text.split(",") if item.strip()]
    if name == "prompts" and not text.startswith(("[", "{")):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: could not parse '{value}' as YAML") from None


def _parse_reward_shorthand(item: str) -> dict[str, Any]:
    name, _, weight = item.strip().partition(":")
    try:
        return {"name": name.strip(), "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise ConfigError(f"rewards: bad weight in '{item}'; write name:weight, e.g. aesthetic:1.0") from None


def _as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, dict)) or dataclasses.is_dataclass(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")


def _as_plugin_spec(value: Any, name: str) -> PluginSpec:
    if isinstance(value, PluginSpec):
        return value
    if isinstance(value, str):
        return PluginSpec(value)
    if isinstance(value, dict):
        extra = set(value) - {"name", "options"}
        if "name" not in value or extra:
            raise ConfigError(f"{name}: each entry needs 'name' and optional 'options', got keys {sorted(value)}")
        options = value.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{name}: 'options' must be a mapping, got {type(options).__name__}")
        return PluginSpec(str(value["name"]), dict(options))
    raise ConfigError(f"{name}: expected a name or {{name, options}}, got {type(value).__name__}")


def _as_rewards(value: Any) -> list[RewardSpec]:
    specs = []
    for item in _as_list(value, "rewards"):
        if isinstance(item, RewardSpec):
            specs.append(item)
            continue
        if isinstance(item, str):
            item = _parse_reward_shorthand(item)
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "weight", "options"}:
            raise ConfigError("rewards: each entry needs 'name' and optional 'weight' and 'options', "
                              f"got {item!r}")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"rewards: 'options' of '{item['name']}' must be a mapping")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"rewards: weight of '{item['name']}' must be a number, got {weight!r}")
        specs.append(RewardSpec(str(item["name"]), float(weight), dict(options)))
    return specs


def _translate_trl_truncation(values: dict[str, Any]) -> None:
    """Map TRL's truncation fields onto ours. TRL counts *detached* steps: with ``truncated_backprop_timestep`` t
    of N steps, the last N - t steps keep gradients; with ``truncated_rand_backprop_minmax`` (a, b) TRL detaches a
    random count in [a, b]. We translate to K = N - t (fixed) or K ~ U[max(1, N - b), N - a] (uniform)."""
    if not any(k in values for k in TRL_TRUNCATION_FIELDS):
        return
    if "truncation" in values:
        raise ConfigError("use either 'truncation' or TRL's truncated_backprop_* fields, not both")
    steps = int(values.get("sample_num_steps", 50))
    rand = values.pop("truncated_backprop_rand", True)
    timestep = int(values.pop("truncated_backprop_timestep", 49))
    low, high = values.pop("truncated_rand_backprop_minmax", (0, 50))
    if rand:
        values.update(truncation="uniform", truncation_min=max(1, steps - int(high)),
                      truncation_max=max(1, steps - int(low)))
    else:
        values.update(truncation="fixed", truncation_k=max(1, steps - timestep))


def _type_name(tp: Any) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def _check_type(name: str, value: Any, tp: Any) -> None:
    kind = _type_name(tp)
    if kind.startswith("Optional["):
        if value is None:
            return
        kind = kind[len("Optional["):-1]
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(kind)
    if expected is None:
        if kind.startswith("dict") and not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        if kind.startswith("list") and not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        return
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, expected):
        raise ConfigError(f"{name}: expected {kind}, got {value!r} ({type(value).__name__})")


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}, allowed: {allowed}")
