"""``AlignPropTrainer``: reward backpropagation into UNet LoRA weights.

One optimizer step, top to bottom (``_train_micro_batch``)::

    prompts, metadata = prompt source            (train_batch_size per process)
    embeddings        = pipe.encode_prompt(...)   (frozen text encoder)
    K                 = draw_truncation_k(...)    (once per batch)
    images            = sample_images(...)        (gradients through the last K UNet calls + VAE decode)
    r_j               = reward_j(images, prompts, metadata)      for each configured reward j
    loss              = -mean_over_batch( sum_j weight_j * r_j )
    accelerator.backward(loss); on sync: clip_grad_norm_, optimizer.step(), zero_grad()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from alignprop_core import plugins
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import AlignPropError, ConfigError, PluginError, first_line
from alignprop_core.evaluate import image_size
from alignprop_core.image_loggers import ImageLogSink, require_package
from alignprop_core.lora import LORA_WEIGHTS_NAME, add_lora, load_lora, save_lora
from alignprop_core.rewards import call_reward, freeze
from alignprop_core.sampler import draw_truncation_k, encode_prompts, sample_images
from alignprop_core.models import family_of_class, pipeline_class, pipeline_class_name, prepare_pipeline
from alignprop_core.tiny import TINY_MODEL_ID, TINY_SDXL_MODEL_ID, tiny_pipeline_path

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"


@dataclass
class NamedReward:
    """A reward of the weighted sum."""

    name: str
    weight: float
    fn: Callable[..., Any]


@dataclass
class TrainingResult:
    """What ``train()`` returns: final step, fixed-seed eval rewards before/after, where the LoRA is."""

    global_step: int
    lora_dir: Path
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class TrainerState:
    """What resume needs besides accelerate's state (LoRA, optimizer), saved as JSON (no pickle).

    No RNG state is stored: every random draw is seeded from ``(seed, step, micro-batch, sample index)`` (see
    ``derive_seed``), so the step counter alone reproduces the prompts, noise and truncation of any step.
    """

    def __init__(self) -> None:
        self.global_step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0

    def save(self, directory: Path) -> None:
        (directory / TRAINER_STATE_NAME).write_text(json.dumps(vars(self)))

    def load(self, directory: Path) -> None:
        state = json.loads((directory / TRAINER_STATE_NAME).read_text())
        self.global_step = int(state["global_step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints/strings), identical in every process and Python run."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's and numpy's global RNGs (which TRL-style prompt functions use) and restore them after."""
    import numpy as np

    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


class AlignPropTrainer:
    """Fine-tune a diffusers text-to-image pipeline's UNet LoRA by backpropagating differentiable rewards.

    Args:
        config: the run's settings; defaults to ``AlignPropConfig()``.
        reward_function: optional TRL-style ``fn(images, prompts, metadata) -> Tensor[B]`` (or
            ``(Tensor[B], metadata)``); when given it replaces ``config.rewards``.
        prompt_function: optional TRL-style ``fn() -> (prompt, metadata)``; replaces ``config.prompts``.
        sd_pipeline: optional ready ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``; replaces loading
            ``config.pretrained_model``.
        image_samples_hook: optional ``hook(image_data, global_step, accelerate_logger)`` called every
            ``log_image_freq`` steps on the main process, besides the configured ``image_loggers``.
    """

    def __init__(self, config: Optional[AlignPropConfig] = None, reward_function: Optional[Callable] = None,
                 prompt_function: Optional[Callable] = None, sd_pipeline: Any = None,
                 image_samples_hook: Optional[Callable] = None):
        self.config = config = (config or AlignPropConfig()).validate()
        self.output_dir = Path(config.output_dir)

        # Everything that can be wrong with names, paths and folders is checked before any model is loaded.
        reward_names = [] if reward_function is not None else [r.name for r in config.rewards]
        for name in reward_names:
            plugins.get("reward", name)
        if prompt_function is None:
            plugins.get("prompt source", config.prompts.name)
        for spec in config.image_loggers:
            plugins.get("image logger", spec.name)
        model_path = None if sd_pipeline is not None else resolve_model_path(config.pretrained_model)
        self.resume_dir = self._find_resume_dir()
        self._check_output_dir()  # nothing is written before train() starts

        if config.log_with in ("tensorboard", "wandb"):
            require_package(config.log_with, f"log_with: {config.log_with}")
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        mixed_precision = config.mixed_precision
        if mixed_precision == "fp16" and not torch.cuda.is_available():
            print("note: mixed_precision=fp16 needs a GPU; training in fp32 on this machine", file=sys.stderr)
            mixed_precision = "no"
        accelerator_kwargs = dict(config.accelerator_kwargs)
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # several processes without a GPU (`accelerate launch --multi_gpu --num_processes N` or torchrun on
            # CPU): accelerate only picks its gloo MULTI_CPU mode when told to run on the CPU
            accelerator_kwargs.setdefault("cpu", True)
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=config.train_gradient_accumulation_steps,
            log_with=config.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), **config.project_kwargs),
            **accelerator_kwargs,
        )
        accelerator = self.accelerator
        set_seed(config.seed)  # global RNGs; the draws that matter are seeded per sample (derive_seed)
        self.state = TrainerState()
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                torch.float32)

        # Prompts, rewards, loggers (reward factories may load their own models).
        self.prompt_fn = prompt_function or plugins.build("prompt source", config.prompts.name,
                                                          config.prompts.options)
        if reward_function is not None:
            self.rewards = [NamedReward("reward", 1.0, reward_function)]
        else:
            self.rewards = [NamedReward(r.name, r.weight, plugins.build("reward", r.name, r.options))
                            for r in config.rewards]
        for reward in self.rewards:
            freeze(reward.fn, accelerator.device)
        self.image_loggers = [plugins.build("image logger", s.name, s.options, output_dir=str(self.output_dir))
                              for s in config.image_loggers]
        self.image_samples_hook = image_samples_hook

        # The pipeline: everything frozen in the compute dtype, LoRA on the UNet in fp32.
        pipe = sd_pipeline if sd_pipeline is not None else load_pipeline(model_path, config.pretrained_revision)
        self.family = prepare_pipeline(pipe, config.scheduler, accelerator.device, self.weight_dtype)  # sd / sdxl
        self.pipe = pipe
        self.height, self.width = image_size(self.config, self.pipe)
        params = add_lora(pipe.unet, config.lora_rank, config.lora_alpha, config.lora_target_modules)
        self.trainable_params = params
        optimizer = self._make_optimizer(params)
        self.unet, self.optimizer = accelerator.prepare(pipe.unet, optimizer)

        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)
        if config.log_with and accelerator.is_main_process:
            accelerator.init_trackers(config.tracker_project_name, config=_flat_config(config),
                                      init_kwargs=config.tracker_kwargs)
        self._check_rewards()
        if self.resume_dir is not None:
            try:
                accelerator.load_state(str(self.resume_dir))
                self.state.load(self.resume_dir)
            except Exception as exc:
                first = (first_line(exc) or type(exc).__name__)[:200]
                raise ConfigError(f"resume_from: checkpoint '{self.resume_dir}' is damaged and cannot be loaded "
                                  f"({type(exc).__name__}: {first}); pick an older folder under "
                                  f"{CHECKPOINTS_DIR}/") from None
            accelerator.print(f"resumed from {self.resume_dir} at step {self.state.global_step}")

    # ------------------------------------------------------------------ training
    def train(self) -> TrainingResult:
        """Run ``num_epochs`` optimizer steps (from the resumed step), export the LoRA, return a summary."""
        config, accelerator = self.config, self.accelerator
        result = TrainingResult(self.state.global_step, self.output_dir)
        if accelerator.is_main_process:
            if self.resume_dir is None and config.overwrite_output_dir:  # explicitly asked to replace a run
                shutil.rmtree(self.output_dir / CHECKPOINTS_DIR, ignore_errors=True)
                (self.output_dir / METRICS_NAME).unlink(missing_ok=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for stale in (self.output_dir / CHECKPOINTS_DIR).glob(".*-checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while saving or pruning
        if config.eval_num_samples and accelerator.is_main_process:
            result.eval_before = self.evaluate()
            accelerator.print("eval before: " + _format(result.eval_before))
        from tqdm.auto import tqdm

        progress = tqdm(total=config.num_epochs, initial=self.state.global_step, desc="alignprop",
                        disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        try:
            while self.state.global_step < config.num_epochs:
                metrics = self.train_step()
                step = self.state.global_step
                result.history.append(metrics)
                accelerator.log(metrics, step=step)
                if accelerator.is_main_process:
                    with open(self.output_dir / METRICS_NAME, "a", encoding="utf-8") as log:
                        log.write(json.dumps({"step": step, **metrics}) + "\n")
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.4g}", loss=f"{metrics['loss']:.4g}",
                                     k=int(metrics["k"]))
                if self.state.nonfinite_in_a_row >= config.max_nonfinite_steps:
                    self._stop_nonfinite()
                if step % config.save_freq == 0 or step == config.num_epochs:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            accelerator.print(f"interrupted at step {self.state.global_step}: saving a checkpoint and the LoRA")
            self.save_checkpoint()
            self.save_lora()
            raise
        finally:
            progress.close()
        self.save_lora()
        if config.eval_num_samples and accelerator.is_main_process:
            result.eval_after = self.evaluate()
            accelerator.print("eval after:  " + _format(result.eval_after))
        for image_logger in self.image_loggers:
            getattr(image_logger, "close", lambda: None)()
        accelerator.end_training()
        result.global_step = self.state.global_step
        if config.push_to_hub and accelerator.is_main_process:
            self.push_to_hub()
        return result

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``train_gradient_accumulation_steps`` micro-batches; returns its metrics.

        A step whose rewards or loss are NaN/inf on any process (or whose gradient norm is, without a loss
        scaler) is skipped: its gradients are dropped and the weights stay as they were.
        """
        config, accelerator = self.config, self.accelerator
        start = time.perf_counter()
        totals, components, ks = [], {r.name: [] for r in self.rewards}, []
        grad_norm = float("nan")
        nonfinite = False
        last_batch = None
        self.unet.train()
        for micro_step in range(config.train_gradient_accumulation_steps):
            with accelerator.accumulate(self.unet):
                batch = self._train_micro_batch(micro_step)
                gathered = accelerator.gather(batch["rewards"])
                nonfinite = nonfinite or not bool(torch.isfinite(gathered).all())
                if accelerator.sync_gradients:
                    if not nonfinite:
                        norm = accelerator.clip_grad_norm_(self.trainable_params, config.train_max_grad_norm)
                        grad_norm = float(norm) if norm is not None else float("nan")
                        nonfinite = not math.isfinite(grad_norm) and accelerator.scaler is None
                    if not nonfinite:
                        self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            totals.append(gathered)
            for name, values in batch["reward_components"].items():
                components[name].append(accelerator.gather(values))
            ks.append(batch["k"])
            last_batch = batch
        self.state.global_step += 1
        self.state.nonfinite_total += int(nonfinite)
        self.state.nonfinite_in_a_row = self.state.nonfinite_in_a_row + 1 if nonfinite else 0
        total = torch.cat(totals).float()
        # the loss over all processes' samples (each process's own loss only covers its share of the batch)
        metrics = {"reward_mean": total.mean().item(), "reward_std": _std(total), "loss": -total.mean().item(),
                   "grad_norm": grad_norm, "k": sum(ks) / len(ks), "step_time": time.perf_counter() - start,
                   "lr": self.optimizer.param_groups[0]["lr"], "skipped_nonfinite": float(nonfinite),
                   "nonfinite_steps": float(self.state.nonfinite_total)}
        for name, values in components.items():
            joined = torch.cat(values).float()
            metrics[f"reward/{name}_mean"] = joined.mean().item()
            metrics[f"reward/{name}_std"] = _std(joined)
        if self.state.global_step % config.log_image_freq == 0 and accelerator.is_main_process:
            self._log_images(last_batch, self.state.global_step)
        return metrics

    def _train_micro_batch(self, micro_step: int) -> dict[str, Any]:
        """Sample, score and backpropagate one micro-batch. Sample ``j`` of the global micro-batch (all processes
        together) always gets the same prompt and noise, so N processes with batch B see exactly what one process
        with batch N*B sees; K is drawn once per global micro-batch."""
        config, accelerator = self.config, self.accelerator
        batch_size = config.train_batch_size
        where = (config.seed, self.state.global_step, micro_step)
        first = accelerator.process_index * batch_size
        seeds = [derive_seed(*where, "sample", j) for j in range(first, first + batch_size)]
        prompts, metadata = self._draw_prompts(seeds)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        k = draw_truncation_k(config, random.Random(derive_seed(*where, "truncation")))
        draft_lv_n = config.draft_lv_n if config.truncation == "draft_lv" else 0
        with self.accelerator.autocast():
            embeddings = encode_prompts(self.pipe, prompts, config.negative_prompts, config.sample_guidance_scale,
                                        self.accelerator.device)
            images = sample_images(
                self.pipe, embeddings, num_steps=config.sample_num_steps, guidance_scale=config.sample_guidance_scale,
                eta=config.sample_eta, height=self.height, width=self.width, grad_steps=k,
                generator=generators, gradient_checkpointing=config.gradient_checkpointing, unet=self.unet,
                draft_lv_n=draft_lv_n)
            draws = images.shape[0] // len(prompts)  # DRaFT-LV: draft_lv_n draws of the batch, draw-major
            prompts, metadata = prompts * draws, metadata * draws
            total, components = self.score(images, prompts, metadata)
        loss = -total.mean()  # DRaFT-LV: mean over draws and batch = the draws' gradients averaged
        self.accelerator.backward(loss)
        return {"images": images.detach(), "prompts": prompts, "metadata": metadata, "rewards": total.detach(),
                "reward_components": {n: v.detach() for n, v in components.items()}, "k": k, "loss": loss.item()}

    def score(self, images: torch.Tensor, prompts: list[str],
              metadata: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the rewards (``[B]``) and each reward's own scores."""
        components = {r.name: call_reward(r.name, r.fn, images, prompts, metadata) for r in self.rewards}
        total = sum(r.weight * components[r.name] for r in self.rewards)
        return total, components

    def _draw_prompts(self, seeds: list[int]) -> tuple[list[str], list[dict]]:
        """One prompt per seed, each drawn with the global RNGs seeded by it (and restored afterwards)."""
        pairs = []
        for seed in seeds:
            with seeded_global_rngs(seed):
                pairs.append(self.prompt_fn())
        for pair in pairs[:1]:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise AlignPropError(f"the prompt source returned {pair!r}; it must return (prompt: str, metadata: dict)")
        return [p for p, _ in pairs], [dict(m or {}) for _, m in pairs]

    # ------------------------------------------------------------------ evaluation and sampling
    @torch.no_grad()
    def evaluate(self, num_samples: Optional[int] = None, seed: Optional[int] = None) -> dict[str, float]:
        """Mean rewards on fixed-seed samples: the same prompts and noise every call, so values are comparable
        across training. Does not disturb the training RNG streams."""
        from alignprop_core.evaluate import SampleSet, eval_seeds, sample_and_score  # shared with `alignprop eval`

        config = self.config
        num_samples = num_samples or config.eval_num_samples
        seed = config.eval_seed if seed is None else seed
        seeds = eval_seeds(seed, num_samples)
        prompts, metadata = self._draw_prompts(seeds)
        scored = sample_and_score(self.pipe, SampleSet(prompts, metadata, seeds), config, self.score,
                                  height=self.height, width=self.width, device=self.accelerator.device,
                                  batch_size=config.train_batch_size, autocast=self.accelerator.autocast)
        return scored.means()

    @torch.no_grad()
    def generate(self, prompts: list[str],
                 generator: Optional[torch.Generator | list[torch.Generator]] = None) -> torch.Tensor:
        """Sample images ``[B, 3, H, W]`` in ``[0, 1]`` with the current LoRA, without gradients."""
        config = self.config
        with self.accelerator.autocast():
            embeddings = encode_prompts(self.pipe, prompts, config.negative_prompts, config.sample_guidance_scale,
                                        self.accelerator.device)
            return sample_images(self.pipe, embeddings, num_steps=config.sample_num_steps,
                                 guidance_scale=config.sample_guidance_scale, eta=config.sample_eta,
                                 height=self.height, width=self.width, grad_steps=0, generator=generator)

    def _log_images(self, batch: dict[str, Any], step: int) -> None:
        image_data = {"images": batch["images"].float().cpu(), "prompts": batch["prompts"],
                      "prompt_metadata": batch["metadata"], "rewards": batch["rewards"].float().cpu(),
                      "reward_components": {n: v.float().cpu() for n, v in batch["reward_components"].items()}}
        if getattr(self, "_image_sink", None) is None:  # with no tracker, hook images go to PNGs here
            self._image_sink = ImageLogSink(self.accelerator, self.output_dir / "images" / "hook")
        sink = self._image_sink
        for image_logger in self.image_loggers:
            image_logger(image_data, step, sink)
        if self.image_samples_hook is not None:
            self.image_samples_hook(image_data, step, sink)

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self) -> Optional[Path]:
        """Save accelerate state + LoRA + trainer state to ``checkpoints/checkpoint-<step>``; the folder appears only
        when complete (written under a temporary name, then renamed); then prune beyond ``num_checkpoint_limit``."""
        accelerator = self.accelerator
        root = self.output_dir / CHECKPOINTS_DIR
        final = root / f"checkpoint-{self.state.global_step}"
        tmp = root / f".tmp-checkpoint-{self.state.global_step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            self.state.save(tmp)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.output_dir)[:-self.config.num_checkpoint_limit]:
                trash = old.with_name(f".trash-{old.name}")
                os.replace(old, trash)  # atomic: a kill mid-delete never leaves a half checkpoint that looks whole
                shutil.rmtree(trash, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def save_lora(self, directory: Optional[str | os.PathLike] = None) -> Path:
        """Export the LoRA in diffusers format (main process only); returns the folder."""
        directory = Path(directory or self.output_dir)
        if self.accelerator.is_main_process:
            staging = directory / ".tmp-lora-export"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            save_lora(self.accelerator.unwrap_model(self.unet), staging, self.family)
            (staging / "alignprop_config.yaml").write_text(self.config.to_yaml())
            for file in staging.iterdir():  # each file appears complete or not at all
                os.replace(file, directory / file.name)
            staging.rmdir()
        self.accelerator.wait_for_everyone()
        return directory

    def _stop_nonfinite(self) -> None:
        """Stop after ``max_nonfinite_steps`` skipped steps in a row, keeping the last good weights."""
        self.save_lora()  # skipped steps never changed the weights: this is the last good LoRA
        good = list_checkpoints(self.output_dir)
        where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved yet"
        raise AlignPropError(
            f"stopped at step {self.state.global_step}: {self.state.nonfinite_in_a_row} steps in a row had NaN/inf "
            f"rewards or loss and were skipped; {where} and {self.output_dir / LORA_WEIGHTS_NAME} holds the last "
            "good LoRA; check the reward for NaN/inf, or lower train_learning_rate")

    def push_to_hub(self) -> None:
        from huggingface_hub import create_repo, upload_folder

        repo_id = self.config.hub_model_id or self.output_dir.resolve().name
        create_repo(repo_id, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(self.output_dir),
                      allow_patterns=[LORA_WEIGHTS_NAME, "alignprop_config.yaml"])

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for model in models:
                save_lora(self.accelerator.unwrap_model(model), output_dir, self.family)
        weights.clear()  # the frozen base weights are not checkpointed, only the LoRA

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        while models:
            load_lora(self.accelerator.unwrap_model(models.pop()), input_dir)

    # ------------------------------------------------------------------ set-up helpers
    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        config = self.config
        optimizer_cls = torch.optim.AdamW
        if config.train_use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise AlignPropError("train_use_8bit_adam needs bitsandbytes: pip install bitsandbytes "
                                     "(or set train_use_8bit_adam false)") from None
            optimizer_cls = bnb.optim.AdamW8bit
        return optimizer_cls(params, lr=config.train_learning_rate, betas=(config.train_adam_beta1,
                             config.train_adam_beta2), weight_decay=config.train_adam_weight_decay,
                             eps=config.train_adam_epsilon)

    def _find_resume_dir(self) -> Optional[Path]:
        resume = self.config.resume_from
        if not resume:
            return None
        if resume == "latest":
            found = list_checkpoints(self.output_dir)
            if not found:
                raise ConfigError(f"resume_from: no checkpoint in {self.output_dir / CHECKPOINTS_DIR}; "
                                  "drop resume_from to start a new run")
            return found[-1]
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"resume_from: '{resume}' is not a folder; give a checkpoint folder or 'latest'")
        missing = [n for n in (TRAINER_STATE_NAME, LORA_WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise ConfigError(f"resume_from: '{resume}' is not a complete alignprop checkpoint (missing "
                              f"{', '.join(missing)}); pick another folder under {CHECKPOINTS_DIR}/")
        return path

    def _check_output_dir(self) -> None:
        """Refuse to mix with an earlier run's checkpoints, and check the folder can be written, without
        creating anything (it is created when training starts)."""
        if self.resume_dir is None and list_checkpoints(self.output_dir) and not self.config.overwrite_output_dir:
            raise ConfigError(f"output_dir: '{self.output_dir}' already has checkpoints from an earlier run; pass "
                              "resume_from=latest to continue it, overwrite_output_dir=true to replace it, or "
                              "choose a new output_dir")
        existing = self.output_dir.absolute()
        while not existing.exists():
            existing = existing.parent
        problem = None
        if not existing.is_dir():
            problem = f"'{existing}' is a file"
        elif existing == self.output_dir.absolute():
            try:
                probe = existing / ".alignprop-write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                problem = exc.strerror
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"'{existing}' is not writable"
        if problem:
            raise ConfigError(f"output_dir: cannot write to '{self.output_dir}' ({problem}); choose a writable "
                              "folder")

    def _check_rewards(self) -> None:
        """Call every reward once on random images of the training size, before anything is written, so a
        reward that breaks the contract (shape, type, no gradient) fails now with a clear message."""
        images = torch.rand(2, 3, self.height, self.width, device=self.accelerator.device, requires_grad=True)
        prompts, metadata = self._draw_prompts([derive_seed(self.config.seed, "check", i) for i in range(2)])
        with self.accelerator.autocast():
            total, _ = self.score(images, prompts, metadata)
        if not torch.isfinite(total).all():
            return  # the non-finite guard handles NaN/inf during training
        (grad,) = torch.autograd.grad(total.sum(), images, allow_unused=True)
        if grad is None:
            raise PluginError("the rewards do not depend on the images (no gradient reaches them); a reward must "
                              "be computed from its images argument with differentiable torch ops")


# ---------------------------------------------------------------------- module helpers


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (p / TRAINER_STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_model_path(model: str) -> str:
    """``alignprop:tiny-sd`` / ``alignprop:tiny-sdxl`` -> the cached tiny pipeline; a local path must be a
    diffusers pipeline folder of a supported class; anything else is treated as a hub id."""
    if model in (TINY_MODEL_ID, TINY_SDXL_MODEL_ID):
        return str(tiny_pipeline_path(kind="sd" if model == TINY_MODEL_ID else "sdxl"))
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local:
        if not path.is_dir():
            raise ConfigError(f"pretrained_model: folder '{model}' does not exist; give a diffusers pipeline folder "
                              "or a hub id")
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"pretrained_model: '{model}' has no model_index.json, so it is not a diffusers "
                              "pipeline folder (save one with pipe.save_pretrained)")
        family_of_class(pipeline_class_name(path), model)  # a supported family, checked before any loading
        return str(path)
    return model


def load_pipeline(model: str, revision: str = "main"):
    """Load a supported pipeline from a hub id or folder: the class named in its ``model_index.json``
    (``StableDiffusionPipeline`` without safety checker, or ``StableDiffusionXLPipeline`` without watermarker);
    any other class is a one-line error naming the supported ones, raised before weights are fetched."""
    from diffusers import DiffusionPipeline

    local = Path(model).is_dir()
    try:
        class_name = (pipeline_class_name(model) if local
                      else DiffusionPipeline.load_config(model, revision=revision).get("_class_name"))
        family = family_of_class(class_name, model)
        kwargs: dict[str, Any] = ({"safety_checker": None, "requires_safety_checker": False} if family == "sd"
                                  else {"add_watermarker": False})
        if local:
            return pipeline_class(family).from_pretrained(model, local_files_only=True, **kwargs)
        return pipeline_class(family).from_pretrained(model, revision=revision, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = (first_line(exc) or type(exc).__name__)
        raise AlignPropError(f"could not load pipeline '{model}' ({first[:200]}); without network, download it "
                             "elsewhere and pass the local folder as pretrained_model") from None


def _std(values: torch.Tensor) -> float:
    return values.std().item() if values.numel() > 1 else 0.0


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4f}" for name, value in values.items())


def _flat_config(config: AlignPropConfig) -> dict[str, Any]:
    flat = {}
    for key, value in config.to_dict().items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
    return flat


def _fsync_dir(directory: Path) -> None:
    """Flush every file of a finished checkpoint to disk before it is renamed into place."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
