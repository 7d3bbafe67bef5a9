"""``AlignPropConfig``: every training setting, its default, its meaning and its allowed range.

Field names and defaults follow TRL's ``AlignPropConfig`` where TRL had the field. Loading from YAML/TOML,
command-line overrides and validation live here too; this module imports no torch so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from alignprop_core.config_files import coerce_text, preset_names, read_config_file, read_preset  # noqa: F401 (public names)
from alignprop_core.errors import ConfigError
from alignprop_core.eval_metrics import check_monitoring
from alignprop_core.hints import did_you_mean
from alignprop_core.model_setup import check_model_settings
from alignprop_core.models import DEFAULT_MODEL, SCHEDULERS, check_scheduler_name, default_output_dir
from alignprop_core.specs import PluginSpec, RewardSpec, as_list, as_plugin_spec, as_rewards
from alignprop_core.trl_fields import (
    TRL_TRUNCATION_FIELDS,
    apply_project_kwargs,
    apply_trl_truncation,
    hide_from_hf_argparser,
)
from alignprop_core.validation import (
    FLOAT32_MAX,
    HUB_ID_RULES,
    MAX_SEED,
    check_accelerator_kwargs,
    check_type,
    is_hub_id,
    require,
    type_name,
)

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
TRUNCATIONS = ("fixed", "uniform", "gaussian", "none", "draft_lv")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio", "all")
#: Section of the CLI help and the docs' field table, by the first field of each section (in declaration order).
GROUP_STARTS = {"pretrained_model": "model", "sample_num_steps": "sampling", "num_epochs": "training",
                "output_dir": "output", "kl_weight": "guards against reward hacking"}
MAX_IMAGE_SIZE = 8192  # larger images cannot even be allocated for the reward check (a MemoryError traceback)


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    # Only "help" goes into the metadata: HfArgumentParser passes every metadata key to argparse's add_argument.
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class AlignPropConfig:
    """Configuration of an AlignProp run. Every field has a default; ``validate()`` checks ranges."""

    # --- model and data
    pretrained_model: str = _f(
        DEFAULT_MODEL,
        "diffusers pipeline (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2 [klein], Qwen-Image, Z-Image): a hub id or a "
        "local folder ('alignprop:tiny-sd', -sdxl, -sd3, -flux, -flux2-klein, -qwen-image, -z-image = tiny models)")
    pretrained_revision: str = _f("main", "hub revision of pretrained_model")
    rewards: list[RewardSpec] = _f(
        help="rewards to maximise, weighted sum: list of {name, weight, options, views, normalize} (views: center, "
        "tiles:N, random_crops:N; normalize: running), or 'name:weight,name2:weight2'",
        factory=lambda: [RewardSpec("aesthetic", 1.0)])
    prompts: PluginSpec = _f(help="prompt source: {name, options} or a name (simple_animals, imagenet_animals, "
                             "nouns_activities, counting, from_file)",
                             factory=lambda: PluginSpec("simple_animals"))
    negative_prompts: Optional[str] = _f(None, "negative prompt used for classifier-free guidance")
    prompt_cache_size: int = _f(64, "distinct prompts whose text embeddings are kept (least recently used out; each "
                                "encoded alone); 0 = encode every batch together, as the pipeline does")
    resolution: Optional[int] = _f(None, "square image size in pixels (default: the model's own)")
    height: Optional[int] = _f(None, "image height in pixels, overrides resolution (multiple of the VAE factor)")
    width: Optional[int] = _f(None, "image width in pixels, overrides resolution (multiple of the VAE factor)")
    # --- sampling
    sample_num_steps: int = _f(50, "denoising steps per sample (>= 1)")
    scheduler: str = _f("auto", "sampler, built from the model's scheduler config: auto (ddim for SD/SDXL, "
                        "flow_euler for the flow-matching transformers) or " + ", ".join(SCHEDULERS))
    sample_eta: float = _f(1.0, "noise in [0, 1] (0 = deterministic): DDIM's eta (ddim), the SDE's noise level "
                           "(flow_sde); unused by the other schedulers")
    sample_guidance_scale: float = _f(5.0, "classifier-free guidance scale (<= 1 disables guidance); FLUX: the "
                                      "embedded guidance of guidance-distilled models (FLUX.1-dev: 3.5)")
    true_cfg_scale: float = _f(1.0, "FLUX.1 and Qwen-Image: true classifier-free guidance with negative_prompts "
                               "(a second transformer pass per step) when > 1")
    truncation: str = _f("uniform", "truncated backprop: fixed (last truncation_k steps), uniform (K ~ U[min, max]), "
                         "gaussian (K ~ N(mean, std) clipped), none (all steps), draft_lv (K = 1 with draft_lv_n "
                         "re-noised copies of the last step); K drawn once per batch")
    truncation_k: int = _f(1, "K for truncation=fixed: gradients flow through the last K steps, in [1, steps]")
    truncation_min: int = _f(1, "smallest K for truncation=uniform, in [1, steps]")
    truncation_max: Optional[int] = _f(None, "largest K for truncation=uniform, in [truncation_min, steps] "
                                       "(default: sample_num_steps)")
    truncation_mean: float = _f(8.0, "mean K for truncation=gaussian")
    truncation_std: float = _f(5.0, "std of K for truncation=gaussian (> 0); K is rounded and clipped to [1, steps]")
    draft_lv_n: int = _f(2, "truncation=draft_lv: re-noised copies of the last step whose reward gradients are "
                         "averaged (>= 1)")
    gradient_checkpointing: bool = _f(True, "recompute each denoiser call in backward instead of storing its "
                                      "activations")
    checkpoint_memory_budget_gb: Optional[float] = _f(None, "with gradient_checkpointing: keep the activations of "
                                                      "as many grad calls as fit in this many GB, recompute the rest")
    fuse_lora_prefix: bool = _f(True, "denoiser calls without gradients run with the LoRA folded into the weights")
    compile_prefix: bool = _f(False, "torch.compile the denoiser for the calls without gradients (compiles once)")
    compile_grad_calls: bool = _f(False, "torch.compile the denoiser for the calls with gradients (forward, backward)")
    block_checkpointing: bool = _f(False, "also checkpoint each block inside the denoiser (less memory for one "
                                   "call's backward: large transformers at 1024 px), ~1 more forward per grad call")
    vae_checkpointing: bool = _f(False, "checkpoint each block of the VAE decoder (where memory peaks at 1024 px: "
                                 "docs/flow-memory.md)")
    vae_tile_size: Optional[int] = _f(None, "decode in overlapping tiles of this many pixels (diffusers' VAE tiling, "
                                      "seams blended): less decode memory at large sizes; empty = one pass")
    channels_last: bool = _f(False, "denoiser and VAE weights in channels_last memory layout (for convolutions)")
    attention_backend: Optional[str] = _f(None, "diffusers attention backend of the FLUX.1/.2, Qwen-Image and "
                                          "Z-Image transformers (native, _native_cudnn, flash, ...); empty = default")
    truncated_backprop_rand: Optional[bool] = _f(None, "TRL's spelling (translated to truncation*): true = uniform "
                                                 "K, false = fixed K; see docs/trl-migration.md")
    truncated_backprop_timestep: Optional[int] = _f(None, "TRL's spelling: with truncated_backprop_rand false, the "
                                                    "last sample_num_steps - t steps keep gradients (t in [0, "
                                                    "steps - 1])")
    truncated_rand_backprop_minmax: Optional[list[int]] = _f(None, "TRL's spelling: [a, b] with "
                                                             "truncated_backprop_rand true = K ~ U[max(1, steps - b), "
                                                             "steps - a]")
    # --- training
    num_epochs: int = _f(100, "optimizer steps to run (TRL: one epoch = one optimizer update)")
    train_batch_size: int = _f(1, "images sampled per micro-batch per process")
    train_gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    train_learning_rate: float = _f(1e-3, "AdamW learning rate")
    train_adam_beta1: float = _f(0.9, "AdamW beta1 in [0, 1)")
    train_adam_beta2: float = _f(0.999, "AdamW beta2 in [0, 1)")
    train_adam_weight_decay: float = _f(1e-4, "AdamW weight decay (>= 0)")
    train_adam_epsilon: float = _f(1e-8, "AdamW epsilon (> 0)")
    train_use_8bit_adam: bool = _f(False, "use bitsandbytes 8-bit AdamW (needs bitsandbytes and a GPU)")
    train_max_grad_norm: float = _f(1.0, "clip the LoRA gradient norm to this value (> 0)")
    max_nonfinite_steps: int = _f(5, "stop after this many optimizer steps in a row with NaN/inf rewards or loss "
                                  "(each such step is skipped; the last good LoRA is kept)")
    mixed_precision: Optional[str] = _f("auto", "auto (on a GPU fp16 for SD/SDXL, bf16 for the flow transformers; "
                                        "fp32 on CPU), no, fp16 or bf16 (frozen weights in that dtype, trained "
                                        "weights in fp32; fp16 falls back to 'no' on CPU); None or 'none' = 'no'")
    allow_tf32: bool = _f(True, "allow TF32 matmuls on Ampere+ GPUs")
    seed: int = _f(0, "random seed (prompts, noise, truncation draws), in [0, 2**32 - 1]")
    num_threads: Optional[int] = _f(None, "CPU threads for torch (None: torch's default; see "
                                    "docs/configuration.md#cpu-threads)")
    use_lora: bool = _f(True, "train a LoRA (true) or every UNet parameter (false: full fine-tuning, fp32 master "
                        "weights, exported as a diffusers UNet in output_dir/unet; needs far more memory)")
    lora_rank: int = _f(4, "LoRA rank (>= 1)")
    lora_alpha: float = _f(4.0, "LoRA alpha (> 0); the update is scaled by alpha / rank")
    lora_target_modules: list[str] = _f(help="denoiser modules that get LoRA adapters (empty: the family's own: "
                                        "to_q,to_k,to_v,to_out.0; SD3/FLUX add add_q_proj,add_k_proj,add_v_proj,"
                                        "to_add_out)", factory=list)
    # --- output, checkpoints, logging
    output_dir: Optional[str] = _f(None, "where checkpoints, logs and the final LoRA are written (default: "
                                   "alignprop-output; alignprop-tiny-sd-output, alignprop-tiny-flux-output, ... for "
                                   "the tiny models)")
    save_freq: int = _f(1, "save a checkpoint every this many optimizer steps")
    num_checkpoint_limit: int = _f(5, "keep at most this many checkpoints (oldest pruned)")
    resume_from: str = _f("", "resume from a checkpoint folder, or 'latest' in output_dir/checkpoints")
    overwrite_output_dir: bool = _f(False, "start afresh in an output_dir that holds an earlier run, deleting its "
                                    "checkpoints (off: such a run is refused, so no work is lost)")
    eval_num_samples: int = _f(4, "fixed-seed samples scored before and after training (0 = skip)")
    eval_seed: int = _f(1234, "seed of the fixed evaluation samples and prompts")
    image_loggers: list[PluginSpec] = _f(help="image loggers (folder, tensorboard, wandb; see docs/evaluation.md): "
                                         "list of names or {name, options}", factory=list)
    log_image_freq: int = _f(1, "call image loggers / the image hook every this many optimizer steps")
    log_with: Optional[str] = _f(None, "accelerate tracker: tensorboard, wandb, ... (None = no tracker)")
    tracker_project_name: str = _f("alignprop", "tracker project name (TRL's default was 'trl')")
    exp_name: str = _f(help="experiment name, recorded with the run (default: the script's file name)",
                       factory=lambda: _script_name())
    run_name: str = _f("", "tracker run name (default: exp_name)")
    logdir: str = _f("logs", "tracker log folder, relative to output_dir (project_kwargs.logging_dir overrides)")
    tracker_kwargs: dict[str, Any] = _f(help="extra init_kwargs for the tracker", factory=dict)
    accelerator_kwargs: dict[str, Any] = _f(help="extra keyword arguments for accelerate.Accelerator",
                                            factory=dict)
    project_kwargs: dict[str, Any] = _f(help="accelerate ProjectConfiguration keys as in TRL: project_dir (= "
                                        "output_dir), logging_dir, total_limit (= num_checkpoint_limit), "
                                        "automatic_checkpoint_naming (checkpoints are always named by step), "
                                        "save_on_each_node", factory=dict)
    push_to_hub: bool = _f(False, "upload the final LoRA to the Hugging Face Hub")
    hub_model_id: Optional[str] = _f(None, "hub repo id for push_to_hub (default: output_dir's name)")
    # --- guards against reward hacking (docs/reward-hacking.md)
    kl_weight: float = _f(0.0, "beta of the KL to the base model: loss += beta * mean (eps_lora - eps_base)^2 over the "
                          "calls with gradients (>= 0; needs use_lora; one more no-grad call each)")
    eval_rewards: list[RewardSpec] = _f(help="held-out rewards, scored on the eval set and never trained on (same "
                                        "form as rewards)", factory=list)
    eval_freq: int = _f(0, "also evaluate every this many optimizer steps (0 = only before and after training)")
    eval_images_per_prompt: int = _f(1, "eval images per prompt (seeds differ); >= 2 measures diversity within a "
                                     "prompt")
    eval_diversity_features: str = _f("pixels", "features of eval/diversity: pixels (32x32, no weights) or the name "
                                      "of a reward with an embed_images method")
    early_stopping_patience: int = _f(0, "stop after this many eval rounds without improvement (0 = never)")
    early_stopping_metric: str = _f("", "eval metric to watch, higher is better (default: the first eval_rewards, "
                                    "else eval/reward_mean); its best weights are kept in best/")
    early_stopping_min_delta: float = _f(0.0, "an eval round improves when the metric beats the best by more than "
                                         "this (>= 0)")

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        self.rewards = as_rewards(self.rewards)
        self.eval_rewards = as_rewards(self.eval_rewards, "eval_rewards")
        self.prompts = as_plugin_spec(self.prompts, "prompts")
        self.image_loggers = [as_plugin_spec(x, "image_loggers") for x in as_list(self.image_loggers, "image_loggers")]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if self.mixed_precision is None or str(self.mixed_precision).lower() == "none":  # TRL's tests pass None
            self.mixed_precision = "no"
        # Python constructors get the same strings-to-types rules as YAML and the command line ("false" is False).
        for name in TRL_TRUNCATION_FIELDS + ("use_lora", "num_threads"):
            setattr(self, name, coerce(name, getattr(self, name)))
        if isinstance(self.truncated_rand_backprop_minmax, tuple):
            self.truncated_rand_backprop_minmax = list(self.truncated_rand_backprop_minmax)
        # A derived output_dir may still be replaced by TRL's project_kwargs.project_dir (see _apply_project_kwargs).
        self._output_dir_derived = self.output_dir is None
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.pretrained_model)
        for name in ("output_dir", "resume_from", "logdir"):  # "~/runs/x" means the home folder everywhere
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        self._apply_trl_spellings()

    def _apply_trl_spellings(self) -> None:
        """Map TRL's spellings (truncated_backprop_*, project_kwargs' project_dir / total_limit) onto the fields
        alignprop reads. Idempotent; called on construction and again by ``validate()`` because TRL scripts set
        ``project_kwargs`` after constructing the config."""
        if any(getattr(self, name) is not None for name in TRL_TRUNCATION_FIELDS):
            apply_trl_truncation(self)
        if isinstance(self.project_kwargs, dict) and self.project_kwargs:
            apply_project_kwargs(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AlignPropConfig":
        """Build from a mapping (e.g. a parsed YAML file). Unknown keys are an error naming the closest field."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of field: value, got {type(values).__name__}")
        values = dict(values)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                hint = did_you_mean(str(key), sorted(names))
                hint = f" ({hint})" if hint else ""
                raise ConfigError(f"unknown config field '{key}'{hint}; see `alignprop train --help` for all fields")
        converted = {key: coerce(key, value) for key, value in values.items()}
        return cls(**converted)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AlignPropConfig":
        """A bundled preset (``tiny``: the offline demo; ``sd15-aesthetic``: the defaults spelled out), with
        ``overrides`` on top, e.g. ``AlignPropConfig.from_preset("tiny", num_epochs=5)``."""
        return cls.from_dict({**read_preset(name), **overrides})

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
        """Raise a one-line :class:`ConfigError` naming the first invalid field and its allowed range (after
        mapping TRL's spellings onto alignprop's fields). Returns ``self``."""
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), field_type(f.name))
        for f in dataclasses.fields(self):  # NaN and inf pass every comparison test below: reject them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: got {value!r}, allowed: a finite number")
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # torch refuses such scalars (a traceback)
                raise ConfigError(f"{f.name}: got {value!r}, allowed: a finite number within float32's range "
                                  f"(|x| <= {FLOAT32_MAX:.4g})")
        self._apply_trl_spellings()
        steps = self.sample_num_steps
        require(steps >= 1, "sample_num_steps", steps, "an integer >= 1")
        require(0.0 <= self.sample_eta <= 1.0, "sample_eta", self.sample_eta, "a number in [0, 1]")
        require(self.sample_guidance_scale >= 0, "sample_guidance_scale", self.sample_guidance_scale, ">= 0")
        require(self.true_cfg_scale >= 0, "true_cfg_scale", self.true_cfg_scale, ">= 0")
        require(self.truncation in TRUNCATIONS, "truncation", self.truncation, "one of " + ", ".join(TRUNCATIONS))
        check_scheduler_name(self.scheduler)
        require(self.draft_lv_n >= 1, "draft_lv_n", self.draft_lv_n, "an integer >= 1")
        if self.truncation == "fixed":
            require(1 <= self.truncation_k <= steps, "truncation_k", self.truncation_k,
                     f"an integer in [1, sample_num_steps={steps}]")
        if self.truncation == "uniform":
            require(1 <= self.truncation_min <= steps, "truncation_min", self.truncation_min,
                     f"an integer in [1, sample_num_steps={steps}]")
            if self.truncation_max is not None:
                require(self.truncation_min <= self.truncation_max <= steps, "truncation_max", self.truncation_max,
                         f"an integer in [truncation_min={self.truncation_min}, sample_num_steps={steps}]")
        if self.truncation == "gaussian":
            require(self.truncation_std > 0, "truncation_std", self.truncation_std, "a number > 0")
        for name in ("num_epochs", "train_batch_size", "train_gradient_accumulation_steps", "save_freq",
                     "num_checkpoint_limit", "log_image_freq", "lora_rank", "max_nonfinite_steps",
                     "eval_images_per_prompt"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("eval_num_samples", "prompt_cache_size", "eval_freq", "early_stopping_patience"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        for name in ("kl_weight", "early_stopping_min_delta"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        check_monitoring(self)
        for name in ("seed", "eval_seed"):
            require(0 <= getattr(self, name) <= MAX_SEED, name, getattr(self, name), f"an integer in [0, {MAX_SEED}]")
        check_model_settings(self)
        require(self.num_threads is None or self.num_threads >= 1, "num_threads", self.num_threads,
                 "empty (torch's default) or an integer >= 1")
        for name in ("train_learning_rate", "train_adam_epsilon", "train_max_grad_norm", "lora_alpha"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, value, "a finite number > 0")
        for name in ("train_adam_beta1", "train_adam_beta2"):
            require(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "a number in [0, 1)")
        require(self.train_adam_weight_decay >= 0, "train_adam_weight_decay", self.train_adam_weight_decay, ">= 0")
        require(self.mixed_precision in MIXED_PRECISIONS, "mixed_precision", self.mixed_precision,
                 "one of " + ", ".join(MIXED_PRECISIONS))
        require(self.log_with is None or self.log_with in TRACKERS, "log_with", self.log_with,
                 "empty or one of " + ", ".join(TRACKERS))
        for name in ("resolution", "height", "width"):
            value = getattr(self, name)
            require(value is None or (8 <= value <= MAX_IMAGE_SIZE and value % 8 == 0), name, value,
                     f"empty or a positive multiple of 8 (the VAE downsampling factor), at most {MAX_IMAGE_SIZE}")
        require(all(isinstance(m, str) and m for m in self.lora_target_modules), "lora_target_modules",
                 self.lora_target_modules, "empty (the family's default) or a list of module names, e.g. to_q,to_v")
        require(bool(self.pretrained_model.strip()), "pretrained_model", self.pretrained_model,
                 "a hub id or a folder")
        require(not _looks_like_hub_id(self.pretrained_model) or is_hub_id(self.pretrained_model),
                 "pretrained_model", self.pretrained_model, "a local folder or a hub id (owner/name: " + HUB_ID_RULES
                 + ")")
        require(bool(self.pretrained_revision.strip()), "pretrained_revision", self.pretrained_revision,
                 "a hub branch, tag or commit, e.g. main")
        require(bool(str(self.output_dir or "").strip()), "output_dir", self.output_dir, "a folder path")
        require(bool(self.logdir.strip()), "logdir", self.logdir, "a folder path (relative to output_dir)")
        for name in ("tracker_project_name", "exp_name"):
            require(bool(getattr(self, name).strip()), name, getattr(self, name), "a name")
        require(self.run_name == "" or bool(self.run_name.strip()), "run_name", self.run_name,
                 "a name, or empty for exp_name")
        for key, value in self.tracker_kwargs.items():  # accelerate reads init_kwargs[<tracker name>] only
            hint = did_you_mean(str(key), TRACKERS[:-1])
            require(key in TRACKERS[:-1], "tracker_kwargs", f"key {key!r}",
                     "keys naming a tracker: " + ", ".join(TRACKERS[:-1]) + (f" ({hint})" if hint else ""))
            require(isinstance(value, dict), f"tracker_kwargs.{key}", value,
                     f"a mapping of {key}'s init arguments, e.g. {{{key}: {{name: run1}}}}")
        check_accelerator_kwargs(self.accelerator_kwargs)
        require(bool(self.rewards), "rewards", self.rewards, "at least one {name, weight}")
        for i, reward in enumerate(self.rewards):
            require(math.isfinite(reward.weight), f"rewards[{i}].weight", reward.weight, "a finite number")
            require(abs(reward.weight) <= FLOAT32_MAX, f"rewards[{i}].weight", reward.weight,
                     f"a finite number within float32's range (|x| <= {FLOAT32_MAX:.4g})")
        total = sum(r.weight for r in self.rewards)
        require(total > 0, "rewards", f"weights summing to {total:g}",
                 "weights whose sum is > 0 (the loss maximises the weighted sum)")
        names = [r.name for r in self.rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        require(not dupes, "rewards", ", ".join(dupes), "each reward name at most once (merge their weights)")
        if self.push_to_hub and not (self.hub_model_id or Path(self.output_dir).name):
            raise ConfigError("hub_model_id: required with push_to_hub")
        if self.push_to_hub:  # the repo id defaults to output_dir's name
            repo_id = self.hub_model_id or Path(self.output_dir).resolve().name
            if not is_hub_id(repo_id):
                raise ConfigError(f"hub_model_id: got {self.hub_model_id!r}"
                                  + ("" if self.hub_model_id else f" (so output_dir's name {repo_id!r})")
                                  + ", allowed: a hub repo id, name or owner/name: " + HUB_ID_RULES)
        return self

    # ------------------------------------------------------------------ derived values for the trainer
    @property
    def tracker_logging_dir(self) -> str:
        """Where trackers write: ``project_kwargs.logging_dir`` if given, else ``output_dir/logdir``."""
        given = self.project_kwargs.get("logging_dir") if isinstance(self.project_kwargs, dict) else None
        return os.path.expanduser(str(given)) if given else os.path.join(self.output_dir, self.logdir)

    @property
    def tracker_run_name(self) -> str:
        """The tracker's run name: ``run_name``, else ``exp_name``."""
        return self.run_name or self.exp_name


# ---------------------------------------------------------------------- helpers


def field_docs() -> list[tuple[str, str, Any, str, str]]:
    """(name, type name, default, help, group) for every field, in declaration order."""
    docs = []
    group = ""
    for f in dataclasses.fields(AlignPropConfig):
        group = GROUP_STARTS.get(f.name, group)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [dataclasses.asdict(d) for d in default]
        elif dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        if f.name == "exp_name":
            default = "<script name>"  # computed per process
        docs.append((f.name, field_type(f.name), default, f.metadata.get("help", ""), group))
    return docs


def coerce(name: str, value: Any) -> Any:
    """Turn a command-line string (or YAML value) into the type of field ``name``."""
    return coerce_text(name, field_type(name), value)


def _script_name() -> str:
    """TRL's ``exp_name`` default: the running script's file name without its extension."""
    return (Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "") or "alignprop"


def _looks_like_hub_id(model: str) -> bool:
    """``model`` is what ``pipelines.resolve_model_path`` treats as a hub id (not a tiny id, alias or local path)."""
    from alignprop_core.models import MODEL_ALIASES
    from alignprop_core.tiny import TINY_MODELS

    if model in TINY_MODELS or model in MODEL_ALIASES:
        return False
    return not (Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
                or "\\" in model)


def field_type(name: str) -> str:
    """The declared type of field ``name`` as written in the class (e.g. ``Optional[int]``). Read from the class
    annotations, not from ``dataclasses.fields``: HfArgumentParser overwrites ``Field.type`` in place."""
    return type_name(AlignPropConfig.__annotations__[name])


hide_from_hf_argparser(AlignPropConfig)
