"""``AlignPropTrainer``: reward backpropagation into UNet LoRA weights (or, with ``use_lora: false``, the whole UNet).

One optimizer step, top to bottom (``train_step`` -> ``_train_micro_batch``)::

    prompts, metadata = prompt source            (train_batch_size per process)
    embeddings        = pipe.encode_prompt(...)   (frozen text encoder)
    K                 = draw_truncation_k(...)    (once per batch)
    images            = sample_images(...)        (gradients through the last K UNet calls + VAE decode)
    r_j               = reward_j(images, prompts, metadata)      for each configured reward j
    loss              = calculate_loss(sum_j weight_j * r_j)  = -mean over the batch
    accelerator.backward(loss); on sync: clip_grad_norm_, optimizer.step(), zero_grad()
    weights not finite after the step -> the step is rolled back (and counted as skipped)

TRL's ``AlignPropTrainer`` API is kept: ``step(epoch, global_step)``, ``train(epochs)``, ``compute_rewards``,
``calculate_loss``, ``_generate_samples``, ``save_model``; see docs/trl-migration.md.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from alignprop_core import checkpoints, plugins
from alignprop_core.checkpoints import CONFIG_NAME, TrainerState, list_checkpoints  # noqa: F401 (public names)
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import AlignPropError, ConfigError, PluginError, first_line
from alignprop_core.evaluate import image_size
from alignprop_core.image_loggers import ImageLogSink, require_package
from alignprop_core.lora import (LORA_WEIGHTS_NAME, UNET_DIR, add_lora, load_full_unet, load_lora, save_full_unet,
                                 save_lora)
from alignprop_core.models import prepare_pipeline
from alignprop_core.pipelines import denoiser_fingerprint, load_pipeline, resolve_model_path  # noqa: F401
from alignprop_core.rewards import call_reward, freeze
from alignprop_core.sampler import draw_truncation_k, encode_prompts, sample_images
from alignprop_core.seeding import derive_seed, draw_prompts, eval_seeds, seeded_global_rngs  # noqa: F401

#: Signals that stop a run gracefully: Ctrl-C, ``kill``/``docker stop``/SLURM preemption, SLURM's advance warning.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ())


@dataclass
class NamedReward:
    """A reward of the weighted sum. ``trl_style``: a ``reward_function`` given to the constructor; TRL checked
    nothing about it, so the constructor only warns about a broken one and ``train()`` refuses it (see
    ``_check_rewards``), which lets TRL's own tests build trainers with their placeholder scorer."""

    name: str
    weight: float
    fn: Callable[..., Any]
    trl_style: bool = False


@dataclass
class TrainingResult:
    """What ``train()`` returns: final step, fixed-seed eval rewards before/after, where the output is."""

    global_step: int
    output_dir: Path
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def lora_dir(self) -> Path:
        """TRL-era name of ``output_dir``."""
        return self.output_dir


class TrainingInterrupted(AlignPropError):
    """A stop signal ended the run at a safe point after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class AlignPropTrainer:
    """Fine-tune a diffusers text-to-image pipeline's UNet (LoRA by default) by backpropagating differentiable rewards.

    Args:
        config: the run's settings; defaults to ``AlignPropConfig()``.
        reward_function: optional TRL-style ``fn(images, prompts, metadata) -> Tensor[B]`` (or
            ``(Tensor[B], metadata)``); when given it replaces ``config.rewards``.
        prompt_function: optional TRL-style ``fn() -> (prompt, metadata)``; replaces ``config.prompts``.
        sd_pipeline: optional ready ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, or a TRL-style
            wrapper holding one as ``.sd_pipeline`` (its ``use_lora`` then decides LoRA vs full fine-tuning);
            replaces loading ``config.pretrained_model``.
        image_samples_hook: optional ``hook(image_data, global_step, accelerate_logger)`` called every
            ``log_image_freq`` steps on the main process, besides the configured ``image_loggers``.
    """

    def __init__(self, config: Optional[AlignPropConfig] = None, reward_function: Optional[Callable] = None,
                 prompt_function: Optional[Callable] = None, sd_pipeline: Any = None,
                 image_samples_hook: Optional[Callable] = None):
        # The caller's config, as in TRL: validate() maps TRL's spellings in place, so e.g. a project_dir set after
        # construction shows as config.output_dir. use_lora stays the config's: a TRL pipeline wrapper decides it
        # per trainer (TRL's tests build two trainers with one config).
        config = config if config is not None else AlignPropConfig()
        pipe, self.use_lora = _unwrap_pipeline(sd_pipeline, config.use_lora)
        self.config = config = config.validate()
        self._output_ready = False
        self.output_dir = Path(config.output_dir)

        # Everything that can be wrong with names, paths and folders is checked before any model is loaded.
        if reward_function is None:
            for reward in config.rewards:
                plugins.get("reward", reward.name)
        if prompt_function is None:
            plugins.get("prompt source", config.prompts.name)
        for spec in config.image_loggers:
            plugins.get("image logger", spec.name)
        model_path = None if pipe is not None else resolve_model_path(config.pretrained_model)
        self.resume_dir = checkpoints.find_resume_dir(config.resume_from, self.output_dir)
        checkpoints.check_output_dir(self.output_dir, self.resume_dir is not None, config.overwrite_output_dir)
        if config.log_with in ("tensorboard", "wandb"):
            require_package(config.log_with, f"log_with: {config.log_with}")
        if config.log_with:
            problem = checkpoints.writable_problem(Path(config.tracker_logging_dir))
            if problem:
                raise ConfigError(f"logdir: cannot write tracker logs to '{config.tracker_logging_dir}' ({problem}); "
                                  "choose a writable folder")
        if config.push_to_hub:
            _check_hub_reachable()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)

        self.accelerator = accelerator = _make_accelerator(config)
        from accelerate.utils import set_seed

        set_seed(config.seed)  # global RNGs; the draws that matter are seeded per sample (derive_seed)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                torch.float32)

        # Prompts, rewards, loggers (reward factories may load their own models).
        self.prompt_fn = prompt_function or plugins.build("prompt source", config.prompts.name,
                                                          config.prompts.options)
        if reward_function is not None:
            self.rewards = [NamedReward("reward", 1.0, reward_function, trl_style=True)]
        else:
            self.rewards = [NamedReward(r.name, r.weight, plugins.build("reward", r.name, r.options))
                            for r in config.rewards]
        for reward in self.rewards:
            freeze(reward.fn, accelerator.device)
        self.image_loggers = [plugins.build("image logger", s.name, s.options, output_dir=str(self.output_dir))
                              for s in config.image_loggers]
        self.image_samples_hook = image_samples_hook
        self._image_sink: Optional[ImageLogSink] = None
        self._generate_calls = 0

        # The pipeline: frozen parts in the compute dtype; trained weights (LoRA, or the whole UNet) in fp32.
        if pipe is None:
            pipe = load_pipeline(model_path, config.pretrained_revision)
        base_fingerprint = denoiser_fingerprint(pipe.unet)
        self.family = prepare_pipeline(pipe, config.scheduler, accelerator.device, self.weight_dtype)  # sd / sdxl
        self.pipe = pipe
        _check_steps_fit_the_scheduler(config, pipe)
        self.height, self.width = image_size(config, pipe)
        if self.use_lora:
            params = add_lora(pipe.unet, config.lora_rank, config.lora_alpha, config.lora_target_modules)
        else:  # full fine-tuning: fp32 master weights, autocast computes in the mixed-precision dtype
            pipe.unet.to(torch.float32).requires_grad_(True)
            params = list(pipe.unet.parameters())
        self.trainable_params = params
        self.state = TrainerState(run=self._run_description(base_fingerprint))
        optimizer = self._make_optimizer(params)
        self.unet, self.optimizer = accelerator.prepare(pipe.unet, optimizer)

        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)
        if config.log_with and accelerator.is_main_process:
            accelerator.init_trackers(config.tracker_project_name, config=_flat_config(config),
                                      init_kwargs=_tracker_init_kwargs(config))
        self._check_rewards(warn_only=any(r.trl_style for r in self.rewards))
        if self.resume_dir is not None:
            self._resume()

    # ------------------------------------------------------------------ training
    def train(self, epochs: Optional[int] = None) -> TrainingResult:
        """Run optimizer steps up to ``epochs`` (default ``num_epochs``; TRL: one epoch = one optimizer update),
        from the resumed step; export the trained weights; return a summary. SIGINT, SIGTERM and SIGUSR1 stop the
        run after the current step with a checkpoint and the export (:class:`TrainingInterrupted`); a second signal
        stops at once."""
        config, accelerator = self.config, self.accelerator
        total = config.num_epochs if epochs is None else int(epochs)
        result = TrainingResult(self.state.global_step, self.output_dir)
        self._prepare_output_dir()
        with _StopSignals() as stop:
            if config.eval_num_samples:
                result.eval_before = self._evaluate_and_log("before")
            from tqdm.auto import tqdm

            progress = tqdm(total=total, initial=min(self.state.global_step, total), desc="alignprop",
                            disable=not accelerator.is_local_main_process, dynamic_ncols=True)
            try:
                while self.state.global_step < total and not stop.requested(accelerator):
                    metrics = self._run_step(total)
                    result.history.append(metrics)
                    progress.update(1)
                    progress.set_postfix(reward=f"{metrics['reward_mean']:.4g}", loss=f"{metrics['loss']:.4g}",
                                         k=int(metrics["k"]))
            finally:
                progress.close()
            if stop.requested(accelerator):
                self._stop_for_signal(stop.signal_name, stop.signal_number, total)
        self.save_model()
        if config.eval_num_samples:
            result.eval_after = self._evaluate_and_log("after")
        for image_logger in self.image_loggers:
            getattr(image_logger, "close", lambda: None)()
        accelerator.end_training()
        result.global_step = self.state.global_step
        if config.push_to_hub and accelerator.is_main_process:
            self.push_to_hub()
        return result

    def step(self, epoch: int, global_step: int) -> int:
        """TRL's ``step``: one optimizer step (logged, checkpointed when due); returns ``global_step + 1``."""
        self._prepare_output_dir()
        self._run_step(self.config.num_epochs)
        return global_step + 1

    def _prepare_output_dir(self) -> None:
        """Before the first step (of ``train()`` or TRL's ``step()``): refuse a reward function that the constructor
        only warned about, then create ``output_dir`` (replacing an earlier run only with ``overwrite_output_dir``),
        drop stale temporaries and metrics rows past the resumed step, and write the run's config."""
        if self._reward_problem is not None:  # the constructor only warned (TRL compatibility); nothing written yet
            raise self._reward_problem
        if self._output_ready:
            return
        if self.accelerator.is_main_process:
            if self.resume_dir is None and self.config.overwrite_output_dir:  # explicitly asked to replace a run
                checkpoints.clear_run(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_stale_temporaries(self.output_dir)
            checkpoints.truncate_metrics(self.output_dir, self.state.global_step)
            (self.output_dir / CONFIG_NAME).write_text(self._config_yaml())
        self._output_ready = True

    def _config_yaml(self) -> str:
        """The run's config as YAML, with the ``use_lora`` this trainer actually uses (a TRL wrapper may decide)."""
        run_config = copy.copy(self.config)
        run_config.use_lora = self.use_lora
        return run_config.to_yaml()

    def _run_step(self, total: int) -> dict[str, float]:
        """One optimizer step, then its bookkeeping: log, stop on too many non-finite steps, checkpoint when due."""
        config, accelerator = self.config, self.accelerator
        metrics = self.train_step()
        step = self.state.global_step
        accelerator.log(metrics, step=step)
        if accelerator.is_main_process:
            checkpoints.append_metrics(self.output_dir, {"step": step, **metrics})
        if self.state.nonfinite_in_a_row >= config.max_nonfinite_steps:
            self._stop_nonfinite()
        if step % config.save_freq == 0 or step == total:
            self.save_checkpoint()
        return metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``train_gradient_accumulation_steps`` micro-batches; returns its metrics.

        A step whose rewards or loss are NaN/inf on any process (or whose gradient norm is, without a loss
        scaler) is skipped: its gradients are dropped and the weights stay as they were. A step that makes the
        weights non-finite (a huge learning rate, say) is rolled back and counted the same way.
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
                        nonfinite = not self._optimizer_step_keeping_weights_finite()
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
        metrics = {"reward_mean": total.mean().item(), "reward_std": _std(total),
                   "loss": self.calculate_loss(total).item(),
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

    def _optimizer_step_keeping_weights_finite(self) -> bool:
        """``optimizer.step()``; if that leaves a trained weight NaN/inf, undo it (weights and optimizer state) and
        return False, so that "the last good weights" stay true. With full fine-tuning a copy of every weight per
        step would double the memory: there a non-finite step stops the run, the last checkpoint being good."""
        snapshot = None
        if self.use_lora:
            snapshot = ([p.detach().clone() for p in self.trainable_params],
                        copy.deepcopy(self.optimizer.state_dict()))
        self.optimizer.step()
        if all(bool(torch.isfinite(p).all()) for p in self.trainable_params):
            return True
        if snapshot is None:
            raise AlignPropError(f"step {self.state.global_step + 1} made the UNet weights NaN/inf; nothing after "
                                 f"the last checkpoint was saved ({_newest_checkpoint(self.output_dir)}); lower "
                                 "train_learning_rate or train_adam_weight_decay and resume")
        weights, optimizer_state = snapshot
        with torch.no_grad():
            for param, saved in zip(self.trainable_params, weights):
                param.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)
        return False

    def _train_micro_batch(self, micro_step: int) -> dict[str, Any]:
        """Sample, score and backpropagate one micro-batch. Sample ``j`` of the global micro-batch (all processes
        together) always gets the same prompt and noise, so N processes with batch B see exactly what one process
        with batch N*B sees; K is drawn once per global micro-batch."""
        config, accelerator = self.config, self.accelerator
        batch_size = config.train_batch_size
        where = (config.seed, self.state.global_step, micro_step)
        first = accelerator.process_index * batch_size
        seeds = [derive_seed(*where, "sample", j) for j in range(first, first + batch_size)]
        prompts, metadata = draw_prompts(self.prompt_fn, seeds)
        with accelerator.autocast():
            images, k = self._sample(prompts, seeds, where, with_grad=True)
            draws = images.shape[0] // len(prompts)  # DRaFT-LV: draft_lv_n draws of the batch, draw-major
            prompts, metadata = prompts * draws, metadata * draws
            total, components = self.score(images, prompts, metadata)
        loss = self.calculate_loss(total)  # DRaFT-LV: mean over draws and batch = the draws' gradients averaged
        accelerator.backward(loss)
        return {"images": images.detach(), "prompts": prompts, "metadata": metadata, "rewards": total.detach(),
                "reward_components": {n: v.detach() for n, v in components.items()}, "k": k, "loss": loss.item()}

    def _sample(self, prompts: list[str], seeds: list[int], where: tuple, with_grad: bool) -> tuple[torch.Tensor, int]:
        """Images for ``prompts`` (noise of image ``j`` seeded by ``seeds[j]``) and the K used: gradients through the
        last K UNet calls when ``with_grad``, K drawn from ``where`` (once per batch)."""
        config = self.config
        k = draw_truncation_k(config, random.Random(derive_seed(*where, "truncation"))) if with_grad else 0
        draft_lv_n = config.draft_lv_n if config.truncation == "draft_lv" and with_grad else 0
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        with torch.set_grad_enabled(with_grad):
            embeddings = encode_prompts(self.pipe, prompts, config.negative_prompts, config.sample_guidance_scale,
                                        self.accelerator.device)
            images = sample_images(
                self.pipe, embeddings, num_steps=config.sample_num_steps, guidance_scale=config.sample_guidance_scale,
                eta=config.sample_eta, height=self.height, width=self.width, grad_steps=k, generator=generators,
                gradient_checkpointing=config.gradient_checkpointing, unet=self.unet, draft_lv_n=draft_lv_n)
        return images, k

    def score(self, images: torch.Tensor, prompts: list[str],
              metadata: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the rewards (``[B]``) and each reward's own scores, each checked against the reward
        contract (``call_reward``)."""
        components = {r.name: call_reward(r.name, r.fn, images, prompts, metadata) for r in self.rewards}
        total = sum(r.weight * components[r.name] for r in self.rewards)
        return total, components

    def calculate_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """TRL's ``calculate_loss``: the scalar loss for rewards ``[B]``, here ``-mean(rewards)`` (TRL: ``10 -
        mean``, the same gradient). Override it in a subclass to train on another loss."""
        return -rewards.mean()

    def compute_rewards(self, prompt_image_pairs: dict[str, Any]) -> torch.Tensor:
        """TRL's ``compute_rewards``: the weighted reward ``[B]`` of ``{"images", "prompts", "prompt_metadata"}``.
        Like TRL it returns what the rewards return (a ``(scores, metadata)`` tuple unpacked), unchecked; training
        checks the contract."""
        images = prompt_image_pairs["images"]
        prompts, metadata = list(prompt_image_pairs["prompts"]), list(prompt_image_pairs["prompt_metadata"])
        total = 0
        for reward in self.rewards:
            out = reward.fn(images, prompts, metadata)
            total = total + reward.weight * (out[0] if isinstance(out, tuple) and len(out) == 2 else out)
        return total

    def _generate_samples(self, batch_size: int, with_grad: bool = True,
                          prompts: Optional[list[str]] = None) -> dict[str, Any]:
        """TRL's ``_generate_samples``: ``{"images": [B,3,H,W] in [0,1], "prompts", "prompt_metadata"}`` from the
        prompt source (or ``prompts``, with empty metadata); with ``with_grad`` the images keep the graph through the
        last K UNet calls exactly as a training step's. Each call draws fresh (seeded) noise."""
        where = (self.config.seed, self.state.global_step, "generate", self._generate_calls)
        self._generate_calls += 1
        count = batch_size if prompts is None else len(prompts)
        seeds = [derive_seed(*where, "sample", j) for j in range(count)]
        if prompts is None:
            prompts, metadata = draw_prompts(self.prompt_fn, seeds)
        else:
            prompts, metadata = list(prompts), [{} for _ in prompts]
        with self.accelerator.autocast():
            images, _ = self._sample(prompts, seeds, where, with_grad=with_grad)
        return {"images": images, "prompts": prompts, "prompt_metadata": metadata}

    # ------------------------------------------------------------------ evaluation and sampling
    @torch.no_grad()
    def evaluate(self, num_samples: Optional[int] = None, seed: Optional[int] = None) -> dict[str, float]:
        """Mean rewards on fixed-seed samples: the same prompts and noise every call, so values are comparable
        across training. Does not disturb the training RNG streams."""
        from alignprop_core.evaluate import SampleSet, sample_and_score  # shared with `alignprop eval`

        config = self.config
        num_samples = num_samples or config.eval_num_samples
        seeds = eval_seeds(config.eval_seed if seed is None else seed, num_samples)
        prompts, metadata = draw_prompts(self.prompt_fn, seeds)
        scored = sample_and_score(self.pipe, SampleSet(prompts, metadata, seeds), config, self.score,
                                  height=self.height, width=self.width, device=self.accelerator.device,
                                  batch_size=config.train_batch_size, autocast=self.accelerator.autocast)
        return scored.means()

    def _evaluate_and_log(self, when: str) -> dict[str, float]:
        """``evaluate()`` on the main process, printed and written to metrics.jsonl as an ``eval`` row."""
        if not self.accelerator.is_main_process:
            return {}
        means = self.evaluate()
        self.accelerator.print(f"eval {when}:{' ' if when == 'after' else ''} " + _format(means))
        row = {"step": self.state.global_step, "eval": when,
               **{f"eval/{'reward' if name == 'reward' else name}_mean": value for name, value in means.items()}}
        checkpoints.append_metrics(self.output_dir, row)
        return means

    @torch.no_grad()
    def generate(self, prompts: list[str],
                 generator: Optional[torch.Generator | list[torch.Generator]] = None) -> torch.Tensor:
        """Sample images ``[B, 3, H, W]`` in ``[0, 1]`` with the current weights, without gradients."""
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
        if self._image_sink is None:  # with no tracker, hook images go to PNGs here
            self._image_sink = ImageLogSink(self.accelerator, self.output_dir / "images" / "hook")
        if self.image_loggers:
            image_data["fixed"] = self._fixed_samples()
        for image_logger in self.image_loggers:
            image_logger(image_data, step, self._image_sink)
        if self.image_samples_hook is not None:
            self.image_samples_hook(image_data, step, self._image_sink)

    def _fixed_samples(self, count: int = 2) -> dict[str, Any]:
        """The first ``count`` fixed evaluation samples rendered with the current weights: the same prompt and noise
        at every logging step, so image loggers can show progress as a strip."""
        seeds = eval_seeds(self.config.eval_seed, count)
        prompts, _ = draw_prompts(self.prompt_fn, seeds)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        images = self.generate(prompts, generator=generators)
        return {"images": images.float().cpu(), "prompts": prompts, "seeds": seeds}

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self) -> Path:
        """Save accelerate state + trained weights + trainer state to ``checkpoints/checkpoint-<step>`` (appears only
        when complete); then prune beyond ``num_checkpoint_limit``."""
        return checkpoints.save_checkpoint(self.accelerator, self.output_dir, self.state,
                                           self.config.num_checkpoint_limit)

    def save_model(self, directory: Optional[str | os.PathLike] = None) -> Path:
        """Export the trained weights (main process only): the LoRA in diffusers format
        (``pipe.load_lora_weights(dir)``), or with full fine-tuning the UNet as ``dir/unet``
        (``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``), plus the run's config. Returns the folder."""
        directory = Path(directory or self.output_dir)
        if self.accelerator.is_main_process:
            staging = directory / ".tmp-export"
            try:
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                unet = self.accelerator.unwrap_model(self.unet)
                if self.use_lora:
                    save_lora(unet, staging, self.family)
                else:
                    save_full_unet(unet, staging)
                (staging / CONFIG_NAME).write_text(self._config_yaml())
                for item in staging.iterdir():  # each file appears complete or not at all
                    target = directory / item.name
                    if item.is_dir() and target.is_dir():
                        shutil.rmtree(target)
                    os.replace(item, target)
                staging.rmdir()
            except OSError as exc:
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
                raise AlignPropError(f"could not export the trained weights to '{directory}' "
                                     f"({checkpoints.describe_os_error(exc)}); the checkpoints are intact: free space "
                                     "and resume with resume_from=latest") from None
        self.accelerator.wait_for_everyone()
        return directory

    save_lora = save_model  # the pre-TRL-compatibility name

    def _stop_nonfinite(self) -> None:
        """Stop after ``max_nonfinite_steps`` skipped steps in a row, keeping the last good weights."""
        self.save_model()  # skipped steps never changed the weights: this is the last good export
        where = _newest_checkpoint(self.output_dir)
        raise AlignPropError(
            f"stopped at step {self.state.global_step}: {self.state.nonfinite_in_a_row} steps in a row had NaN/inf "
            f"rewards, loss or weights and were skipped; {where} and {self.output_dir / self._export_name()} holds the "
            "last good weights; check the reward for NaN/inf, or lower train_learning_rate")

    def _stop_for_signal(self, name: str, number: int, total: int) -> None:
        step = self.state.global_step
        saved = list_checkpoints(self.output_dir)
        if not saved or saved[-1].name != f"checkpoint-{step}":
            self.save_checkpoint()
        self.save_model()
        raise TrainingInterrupted(
            f"stopped by {name} at step {step} of {total}: saved {self.output_dir / 'checkpoints' / f'checkpoint-{step}'}"
            f" and {self.output_dir / self._export_name()}; continue with resume_from=latest", 128 + number)

    def _export_name(self) -> str:
        return LORA_WEIGHTS_NAME if self.use_lora else UNET_DIR

    def push_to_hub(self, repo_id: Optional[str] = None, **_trl_arguments: Any) -> None:
        """Upload the exported weights and config (TRL passed ``dataset_name`` and more: accepted, unused)."""
        from huggingface_hub import create_repo, upload_folder

        repo_id = repo_id or self.config.hub_model_id or self.output_dir.resolve().name
        create_repo(repo_id, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(self.output_dir),
                      allow_patterns=[LORA_WEIGHTS_NAME, f"{UNET_DIR}/*", CONFIG_NAME])

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for model in models:
                unet = self.accelerator.unwrap_model(model)
                save_lora(unet, output_dir, self.family) if self.use_lora else save_full_unet(unet, output_dir)
        weights.clear()  # the frozen base weights are not checkpointed, only the trained ones (saved above)

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        while models:
            unet = self.accelerator.unwrap_model(models.pop())
            load_lora(unet, input_dir) if self.use_lora else load_full_unet(unet, input_dir)

    def _resume(self) -> None:
        """Load the checkpoint in ``resume_dir`` after checking it was trained with this run's settings."""
        saved = TrainerState()
        saved.load(self.resume_dir)
        _check_same_run(saved.run, self.state.run, self.resume_dir)
        try:
            self.accelerator.load_state(str(self.resume_dir))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"resume_from: checkpoint '{self.resume_dir}' is damaged and cannot be loaded "
                              f"({_load_failure(exc)}); pick an older folder under checkpoints/") from None
        self.state.global_step = saved.global_step
        self.state.nonfinite_total = saved.nonfinite_total
        self.state.nonfinite_in_a_row = saved.nonfinite_in_a_row
        self.accelerator.print(f"resumed from {self.resume_dir} at step {self.state.global_step}")

    # ------------------------------------------------------------------ set-up helpers
    def _run_description(self, base_fingerprint: str) -> dict[str, Any]:
        config = self.config
        lora = {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
                "lora_target_modules": sorted(config.lora_target_modules)} if self.use_lora else {}
        name = getattr(self.pipe, "name_or_path", None) or config.pretrained_model
        return {"base_model": str(name), "base_fingerprint": base_fingerprint, "use_lora": self.use_lora, **lora}

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

    def _check_rewards(self, warn_only: bool = False) -> None:
        """Call every reward once on random images of the training size, before anything is written, so a
        reward that breaks the contract (shape, type, no gradient) fails now with a clear message. With
        ``warn_only`` (the constructor, for TRL-style reward functions) the problem is printed as a warning and
        kept for ``train()`` to raise."""
        self._reward_problem: Optional[PluginError] = None
        if warn_only:
            try:
                self._check_rewards()
            except PluginError as exc:
                self._reward_problem = exc
                print(f"warning: {exc}; train() will refuse this reward_function", file=sys.stderr)
            return
        images = torch.rand(2, 3, self.height, self.width, device=self.accelerator.device, requires_grad=True)
        prompts, metadata = draw_prompts(self.prompt_fn, [derive_seed(self.config.seed, "check", i) for i in range(2)])
        with self.accelerator.autocast():
            total, _ = self.score(images, prompts, metadata)
        if not torch.isfinite(total).all():
            return  # the non-finite guard handles NaN/inf during training
        grad = torch.autograd.grad(total.sum(), images, allow_unused=True)[0] if total.requires_grad else None
        if grad is None:
            raise PluginError("the rewards do not depend on the images (no gradient reaches them); a reward must "
                              "be computed from its images argument with differentiable torch ops")


# ---------------------------------------------------------------------- module helpers


def _unwrap_pipeline(sd_pipeline: Any, use_lora: bool) -> tuple[Any, bool]:
    """A diffusers pipeline as given, or the ``.sd_pipeline`` of a TRL-style wrapper, whose ``use_lora`` wins."""
    if sd_pipeline is not None and hasattr(sd_pipeline, "sd_pipeline"):
        return sd_pipeline.sd_pipeline, bool(getattr(sd_pipeline, "use_lora", use_lora))
    return sd_pipeline, use_lora


def _make_accelerator(config: AlignPropConfig):
    """accelerate's Accelerator for this config: project folder = output_dir, tracker logs in
    ``tracker_logging_dir``; TRL's ProjectConfiguration keys already mapped by ``config.validate()``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mixed_precision = config.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        print("note: mixed_precision=fp16 needs a GPU; training in fp32 on this machine", file=sys.stderr)
        mixed_precision = "no"
    accelerator_kwargs = dict(config.accelerator_kwargs)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # several processes without a GPU (`accelerate launch --multi_gpu --num_processes N` or torchrun on CPU):
        # accelerate only picks its gloo MULTI_CPU mode when told to run on the CPU
        accelerator_kwargs.setdefault("cpu", True)
    project = ProjectConfiguration(project_dir=str(config.output_dir), logging_dir=config.tracker_logging_dir,
                                   save_on_each_node=bool(config.project_kwargs.get("save_on_each_node", False)))
    return Accelerator(mixed_precision=mixed_precision,
                       gradient_accumulation_steps=config.train_gradient_accumulation_steps,
                       log_with=config.log_with, project_config=project, **accelerator_kwargs)


def _tracker_init_kwargs(config: AlignPropConfig) -> dict[str, Any]:
    """``tracker_kwargs`` with the run name (``run_name`` or ``exp_name``) for the trackers that take one."""
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in config.tracker_kwargs.items()}
    for tracker, key in (("wandb", "name"), ("mlflow", "run_name"), ("trackio", "name")):
        if config.log_with in (tracker, "all"):
            section = kwargs.setdefault(tracker, {})
            if isinstance(section, dict):
                section.setdefault(key, config.tracker_run_name)
    return kwargs


def _check_hub_reachable() -> None:
    """push_to_hub uploads at the end of the run: fail now, not after hours of training, when it cannot."""
    from huggingface_hub import constants

    from alignprop_core.pipelines import hub_host_reachable

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("push_to_hub: HF_HUB_OFFLINE is set, so the upload at the end would fail; unset it or set "
                          "push_to_hub false (the LoRA is written to output_dir either way)")
    if not hub_host_reachable():
        raise ConfigError("push_to_hub: the Hugging Face Hub cannot be reached (no network?), so the upload at the "
                          "end would fail; set push_to_hub false (the LoRA is written to output_dir either way)")


def _check_steps_fit_the_scheduler(config: AlignPropConfig, pipe: Any) -> None:
    trained = int(getattr(pipe.scheduler.config, "num_train_timesteps", 0) or 0)
    if trained and config.sample_num_steps > trained:
        raise ConfigError(f"sample_num_steps: got {config.sample_num_steps}, allowed: at most the model's "
                          f"{trained} training timesteps")


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """One line naming the first setting in which the checkpoint's run and this run differ."""
    if not saved:
        return  # a checkpoint from before alignprop recorded its run: the weight loader checks the shapes
    if saved.get("base_fingerprint") != current.get("base_fingerprint"):
        raise ConfigError(f"resume_from: checkpoint '{checkpoint}' was trained on base model "
                          f"'{saved.get('base_model')}' (fingerprint {saved.get('base_fingerprint')}), but this run "
                          f"loads '{current.get('base_model')}' (fingerprint {current.get('base_fingerprint')}); "
                          f"resume with pretrained_model={saved.get('base_model')!r}, or start a new run")
    for name in ("use_lora", "lora_rank", "lora_alpha", "lora_target_modules"):
        if name in saved and saved.get(name) != current.get(name):
            raise ConfigError(f"resume_from: checkpoint '{checkpoint}' was trained with {name}={saved.get(name)!r}, "
                              f"this run has {name}={current.get(name)!r}; resume with {name}={saved.get(name)!r}, "
                              "or start a new run in a new output_dir")


def _load_failure(exc: BaseException) -> str:
    """What went wrong loading a checkpoint, in one line, without torch's advice to unpickle untrusted files."""
    text = str(exc)
    if "weights_only" in text or "Unpickl" in text:
        detail = next((line.strip() for line in text.splitlines() if "Unpickl" in line), "")
        return ("it holds pickled objects other than tensors, which alignprop never loads (torch.load with "
                f"weights_only=True){': ' + detail[:160] if detail else ''}")
    return f"{type(exc).__name__}: {(first_line(exc) or type(exc).__name__)[:200]}"


def _newest_checkpoint(output_dir: Path) -> str:
    found = list_checkpoints(output_dir)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"


class _StopSignals:
    """Within the block, SIGINT/SIGTERM/SIGUSR1 ask the run to stop at the next safe point (after a step); a second
    signal stops at once (KeyboardInterrupt). Handlers are installed only in the main thread and restored after."""

    def __init__(self) -> None:
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number
        print(f"\n{signal.Signals(number).name}: stopping after this step (send it again to stop at once)",
              file=sys.stderr)

    def requested(self, accelerator: Any) -> bool:
        """True once any process got a stop signal (all processes agree, so they stop at the same step)."""
        flag = float(bool(self.signal_number))
        if accelerator.num_processes > 1:
            flag = float(accelerator.reduce(torch.tensor(flag, device=accelerator.device), reduction="sum"))
        return flag > 0

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _std(values: torch.Tensor) -> float:
    return values.std().item() if values.numel() > 1 else 0.0


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4f}" for name, value in values.items())


def _flat_config(config: AlignPropConfig) -> dict[str, Any]:
    import json

    flat = {}
    for key, value in config.to_dict().items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
    return flat
