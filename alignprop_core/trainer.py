"""``AlignPropTrainer``: reward backpropagation into UNet LoRA weights (or, with ``use_lora: false``, the whole UNet).

One optimizer step, top to bottom (``train_step`` -> ``_train_micro_batch``)::

    prompts, metadata = prompt source            (train_batch_size per process)
    embeddings        = pipe.encode_prompt(...)   (frozen text encoder)
    K                 = draw_truncation_k(...)    (once per batch)
    images            = sample_images(...)        (gradients through the last K UNet calls + VAE decode)
    r_j               = reward_j(images, prompts, metadata)      for each configured reward j
    loss              = calculate_loss(sum_j weight_j * r_j)  = -mean over the batch
                        (+ kl_weight * mean (eps_lora - eps_base)^2 over the grad calls: kl.py)
    accelerator.backward(loss); on sync: clip_grad_norm_, optimizer.step(), zero_grad()
    weights not finite after the step -> the step is rolled back (and counted as skipped)
    every eval_freq steps: fixed-seed eval (monitoring.py); best/ on improvement; early stopping

TRL's ``AlignPropTrainer`` API is kept: ``step(epoch, global_step)``, ``train(epochs)``, ``compute_rewards``,
``calculate_loss``, ``_generate_samples``, ``save_model``; see docs/trl-migration.md.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from alignprop_core import checkpoints, grad_sync, plugins
from alignprop_core.accelerator_setup import (
    flat_config,
    make_accelerator,
    make_optimizer,
    tracker_init_kwargs,
)
from alignprop_core.checkpoints import CONFIG_NAME, TrainerState, list_checkpoints
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import AlignPropError
from alignprop_core.evaluate import evaluate_fixed_samples, fixed_samples
from alignprop_core.families import family_of
from alignprop_core.guards import optimizer_step_keeping_weights_finite
from alignprop_core.image_loggers import ImageLogSink
from alignprop_core.kl import BaseModelDistance
from alignprop_core.lora import TrainedWeights
from alignprop_core.model_setup import apply_model_settings
from alignprop_core.monitoring import EvalRounds
from alignprop_core.pipelines import (
    check_steps_fit_the_scheduler,
    compute_dtype,
    denoiser_fingerprint,
    image_size,
    load_pipeline,
    unwrap_pipeline,
)
from alignprop_core.preflight import preflight
from alignprop_core.reward_set import RewardSet, reward_metrics
from alignprop_core.sampler import draw_truncation_k, sample_prompts
from alignprop_core.seeding import derive_seed, draw_prompts
from alignprop_core.signals import StopSignals, TrainingInterrupted
from alignprop_core.trl_methods import TRLTrainerMethods


@dataclass
class TrainingResult:
    """What ``train()`` returns: final step, fixed-seed eval rewards before/after, where the output is."""

    global_step: int
    output_dir: Path
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = ""  # the run's last line: why it ended (all steps done, early stopping)


class AlignPropTrainer(TRLTrainerMethods):
    """Fine-tune a diffusers text-to-image pipeline's UNet (LoRA by default) by backpropagating differentiable rewards.

    Args:
        config: the run's settings; defaults to ``AlignPropConfig()``.
        reward_function: optional TRL-style ``fn(images, prompts, metadata) -> Tensor[B]`` (or
            ``(Tensor[B], metadata)``); when given it replaces ``config.rewards``.
        prompt_function: optional TRL-style ``fn() -> (prompt, metadata)``; replaces ``config.prompts``.
        sd_pipeline: optional ready diffusers pipeline of a supported family (``families``), or a TRL-style
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
        pipe, self.use_lora = unwrap_pipeline(sd_pipeline, config.use_lora)
        self.config = config = config.validate()
        self._output_ready = False
        self.output_dir = Path(config.output_dir)

        # Everything that can be wrong with names, paths and folders is checked before any model is loaded.
        model_path, self.resume_dir = preflight(config, reward_function is None, prompt_function is None, pipe is None)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)

        # The pipeline first (on the CPU): its family decides what mixed_precision "auto" means.
        if pipe is None:
            pipe = load_pipeline(model_path, config.pretrained_revision)
        self.family = family_of(pipe)  # everything model-specific (alignprop_core.families)
        self.accelerator = accelerator = make_accelerator(config, self.family)
        from accelerate.utils import set_seed

        set_seed(config.seed)  # global RNGs; the draws that matter are seeded per sample (derive_seed)
        self.weight_dtype = compute_dtype(accelerator.mixed_precision)

        # Prompts, rewards, loggers (reward factories may load their own models).
        self.prompt_fn = prompt_function or plugins.build("prompt source", config.prompts.name,
                                                          config.prompts.options)
        self.rewards = (RewardSet.from_function(reward_function, accelerator.device) if reward_function is not None
                        else RewardSet.from_specs(config.rewards, accelerator.device, accelerator.gather))
        self.eval_rounds = EvalRounds(config, self.rewards, accelerator.device, self.output_dir)  # + held-out
        self.image_loggers = [plugins.build("image logger", s.name, s.options, output_dir=str(self.output_dir))
                              for s in config.image_loggers]
        self.image_samples_hook = image_samples_hook
        self._image_sink: Optional[ImageLogSink] = None
        self._generate_calls = 0

        # The pipeline: frozen parts in the compute dtype; trained weights (LoRA, or the whole UNet) in fp32.
        denoiser = self.family.denoiser(pipe)
        base_fingerprint = denoiser_fingerprint(denoiser)
        self.family.prepare(pipe, config.scheduler, accelerator.device, self.weight_dtype)
        self.pipe = pipe
        check_steps_fit_the_scheduler(config.sample_num_steps, pipe)
        self.height, self.width = image_size(config, pipe)
        if not config.lora_target_modules:  # empty: the family's own
            config.lora_target_modules = list(self.family.lora_target_modules)
        apply_model_settings(pipe, denoiser, self.family, config)  # TF32, layout, attention, checkpointing, tiles
        self.weights = TrainedWeights(self.family, self.use_lora)  # a LoRA, or the whole denoiser
        self.trainable_params = params = self.weights.attach(denoiser, config)
        base_name = str(getattr(pipe, "name_or_path", None) or config.pretrained_model)
        self.state = TrainerState(run=checkpoints.run_description(config, self.use_lora, base_name, base_fingerprint))
        optimizer = make_optimizer(params, config)
        self.unet, self.optimizer = accelerator.prepare(denoiser, optimizer)

        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)
        if config.log_with and accelerator.is_main_process:
            accelerator.init_trackers(config.tracker_project_name, config=flat_config(config),
                                      init_kwargs=tracker_init_kwargs(config))
        self._check_rewards()
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
        with StopSignals() as stop:
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
                    if self.eval_rounds.stopping(accelerator):
                        result.stop_reason = self.eval_rounds.early_stopping.reason(self.state.global_step)
                        break
            finally:
                progress.close()
            if stop.requested(accelerator):
                self._stop_for_signal(stop.signal_name, stop.signal_number, total)
        self.save_model()
        if config.eval_num_samples and result.stop_reason:  # stopped early: that round was on these weights
            result.eval_after = self.eval_rounds.last_means
        elif config.eval_num_samples:
            result.eval_after = self._evaluate_and_log("after")
        result.stop_reason = self.eval_rounds.final_line(result.stop_reason or f"finished all {total} steps")
        accelerator.print(result.stop_reason)
        for image_logger in self.image_loggers:
            getattr(image_logger, "close", lambda: None)()
        accelerator.end_training()
        result.global_step = self.state.global_step
        if config.push_to_hub and accelerator.is_main_process:
            self.push_to_hub()
        return result

    def _prepare_output_dir(self) -> None:
        """Before the first step (of ``train()`` or TRL's ``step()``): refuse a reward function that the constructor
        only warned about, then create ``output_dir`` (replacing an earlier run only with ``overwrite_output_dir``),
        drop stale temporaries and metrics rows past the resumed step, and write the run's config."""
        if self._reward_problem is not None:  # the constructor only warned (TRL compatibility); nothing written yet
            raise self._reward_problem
        if self._output_ready:
            return
        if self.accelerator.is_main_process:
            checkpoints.prepare_run_folder(self.output_dir, replace=self.resume_dir is None and
                                           self.config.overwrite_output_dir, step=self.state.global_step,
                                           config_yaml=self._config_yaml())
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
        if config.eval_freq and config.eval_num_samples and step % config.eval_freq == 0 and step < total:
            self._evaluate_and_log("step")  # before the checkpoint: it holds this round's early-stopping state
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
        totals, components, ks, kls = [], {r.name: [] for r in self.rewards}, [], []
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
                        nonfinite = not optimizer_step_keeping_weights_finite(
                            self.optimizer, self.trainable_params, can_roll_back=self.use_lora,
                            stop_message=lambda: f"step {self.state.global_step + 1} made the UNet weights NaN/inf; "
                            f"{checkpoints.newest_checkpoint_text(self.output_dir)}, nothing after it was saved; "
                            "lower train_learning_rate or train_adam_weight_decay and resume")
                self.optimizer.zero_grad(set_to_none=True)
            totals.append(gathered)
            for name, values in batch["reward_components"].items():
                components[name].append(accelerator.gather(values))
            ks.append(batch["k"])
            if batch["kl"] is not None:
                kls.append(accelerator.gather(batch["kl"][None]).float().mean())
            last_batch = batch
        self.state.global_step += 1
        self.state.nonfinite_total += int(nonfinite)
        self.state.nonfinite_in_a_row = self.state.nonfinite_in_a_row + 1 if nonfinite else 0
        total = torch.cat(totals).float()
        # the loss over all processes' samples (each process's own loss only covers its share of the batch)
        kl = torch.stack(kls).mean().item() if kls else None
        loss = self.calculate_loss(total).item() + (config.kl_weight * kl if kl is not None else 0.0)
        self.state.reward_normalizers = self.rewards.normalizer_state()
        metrics = {**reward_metrics(total, components, self.rewards), "loss": loss, **({"kl": kl} if kls else {}),
                   "grad_norm": grad_norm, "k": sum(ks) / len(ks), "step_time": time.perf_counter() - start,
                   "lr": self.optimizer.param_groups[0]["lr"], "skipped_nonfinite": float(nonfinite),
                   "nonfinite_steps": float(self.state.nonfinite_total)}
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
        prompts, metadata = draw_prompts(self.prompt_fn, seeds)
        kl = (BaseModelDistance(self.family, accelerator.unwrap_model(self.unet)) if config.kl_weight and self.use_lora
              else None)
        with grad_sync.one_all_reduce(accelerator, self.unet, self.trainable_params) as backward:  # one per step
            with accelerator.autocast():
                images, k = self._sample(prompts, seeds, where, with_grad=True, kl=kl)
                draws = images.shape[0] // len(prompts)  # DRaFT-LV: draft_lv_n draws of the batch, draw-major
                prompts, metadata = prompts * draws, metadata * draws
                total, components = self.score(images, prompts, metadata)
            loss = self.calculate_loss(total)  # DRaFT-LV: mean over draws and batch = the draws' gradients averaged
            distance = kl.value().to(loss.device) if kl is not None else None
            if distance is not None:
                loss = loss + config.kl_weight * distance
            backward(loss)
        return {"images": images.detach(), "prompts": prompts, "metadata": metadata, "rewards": total.detach(),
                "reward_components": {n: v.detach() for n, v in components.items()}, "k": k, "loss": loss.item(),
                "kl": None if distance is None else distance.detach()}

    def _sample(self, prompts: list[str], seeds: list[int], where: tuple, with_grad: bool,
                kl: Optional[BaseModelDistance] = None) -> tuple[torch.Tensor, int]:
        """Images for ``prompts`` (noise of image ``j`` seeded by ``seeds[j]``) and the K used: gradients through the
        last K UNet calls when ``with_grad``, K drawn from ``where`` (once per batch); ``kl`` records those calls."""
        config = self.config
        k = draw_truncation_k(config, random.Random(derive_seed(*where, "truncation"))) if with_grad else 0
        draft_lv_n = config.draft_lv_n if config.truncation == "draft_lv" and with_grad else 0
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        with torch.set_grad_enabled(with_grad):
            images = sample_prompts(self.pipe, prompts, config, height=self.height, width=self.width,
                                    device=self.accelerator.device, generator=generators, grad_steps=k,
                                    unet=self.unet, draft_lv_n=draft_lv_n, kl=kl)
        return images, k

    def score(self, images: torch.Tensor, prompts: list[str],
              metadata: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective (``[B]``) and each reward's own scores (``RewardSet.score``)."""
        return self.rewards.score(images, prompts, metadata, training=True)

    # ------------------------------------------------------------------ evaluation and sampling
    @torch.no_grad()
    def evaluate(self, num_samples: Optional[int] = None, seed: Optional[int] = None) -> dict[str, float]:
        """Mean rewards on fixed-seed samples: the same prompts and noise every call, so values are comparable
        across training (``evaluate.evaluate_fixed_samples``, as ``alignprop eval``)."""
        config = self.config
        return evaluate_fixed_samples(self.pipe, config, self.prompt_fn, self.eval_rounds.measures, num_samples or
                                      config.eval_num_samples, config.eval_seed if seed is None else seed,
                                      height=self.height, width=self.width, device=self.accelerator.device,
                                      autocast=self.accelerator.autocast)

    def _evaluate_and_log(self, when: str) -> dict[str, float]:
        """``evaluate()`` on the main process: printed, logged, and (with eval_freq) best/ and early stopping."""
        if not self.accelerator.is_main_process:
            return {}
        means = self.evaluate()
        self.eval_rounds.record(self.state.global_step, when, means, self.accelerator.print, self._write_export)
        self.state.early_stopping = self.eval_rounds.early_stopping.state()
        return means

    @torch.no_grad()
    def generate(self, prompts: list[str],
                 generator: Optional[torch.Generator | list[torch.Generator]] = None) -> torch.Tensor:
        """Sample images ``[B, 3, H, W]`` in ``[0, 1]`` with the current weights, without gradients."""
        with self.accelerator.autocast():
            return sample_prompts(self.pipe, prompts, self.config, height=self.height, width=self.width,
                                  device=self.accelerator.device, generator=generator)

    def _log_images(self, batch: dict[str, Any], step: int) -> None:
        image_data = {"images": batch["images"].float().cpu(), "prompts": batch["prompts"],
                      "prompt_metadata": batch["metadata"], "rewards": batch["rewards"].float().cpu(),
                      "reward_components": {n: v.float().cpu() for n, v in batch["reward_components"].items()}}
        if self._image_sink is None:  # with no tracker, hook images go to PNGs here
            self._image_sink = ImageLogSink(self.accelerator, self.output_dir / "images" / "hook")
        if self.image_loggers:  # the same fixed prompts and noise at every logged step: progress as a strip
            image_data["fixed"] = fixed_samples(self.pipe, self.config, self.prompt_fn, height=self.height,
                                                width=self.width, device=self.accelerator.device,
                                                autocast=self.accelerator.autocast)
        for image_logger in self.image_loggers:
            image_logger(image_data, step, self._image_sink)
        if self.image_samples_hook is not None:
            self.image_samples_hook(image_data, step, self._image_sink)

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
            checkpoints.export_into(directory, self._write_export)
        self.accelerator.wait_for_everyone()
        return directory

    def _write_export(self, folder: Path) -> None:
        self.weights.save(self.accelerator.unwrap_model(self.unet), folder)
        (folder / CONFIG_NAME).write_text(self._config_yaml())

    def _stop_nonfinite(self) -> None:
        """Stop after ``max_nonfinite_steps`` skipped steps in a row, keeping the last good weights."""
        self.save_model()  # skipped steps never changed the weights: this is the last good export
        where = checkpoints.newest_checkpoint_text(self.output_dir)
        raise AlignPropError(
            f"stopped at step {self.state.global_step}: {self.state.nonfinite_in_a_row} steps in a row had NaN/inf "
            f"rewards, loss or weights and were skipped; {where} and {self.output_dir / self.weights.export_name} "
            "holds the last good weights; check the reward for NaN/inf, or lower train_learning_rate")

    def _stop_for_signal(self, name: str, number: int, total: int) -> None:
        step = self.state.global_step
        saved = list_checkpoints(self.output_dir)
        if not saved or saved[-1].name != f"checkpoint-{step}":
            self.save_checkpoint()
        self.save_model()
        raise TrainingInterrupted(
            f"stopped by {name} at step {step} of {total}: saved "
            f"{self.output_dir / 'checkpoints' / f'checkpoint-{step}'} and {self.output_dir / self.weights.export_name}"
            "; continue with resume_from=latest", 128 + number)

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for model in models:
                self.weights.save(self.accelerator.unwrap_model(model), Path(output_dir))
        weights.clear()  # the frozen base weights are not checkpointed, only the trained ones (saved above)

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        while models:
            self.weights.load(self.accelerator.unwrap_model(models.pop()), Path(input_dir))

    def _resume(self) -> None:
        """Load the checkpoint in ``resume_dir`` after checking it was trained with this run's settings."""
        checkpoints.resume(self.accelerator, self.resume_dir, self.state)
        self.eval_rounds.early_stopping.restore(self.state.early_stopping)
        self.rewards.restore_normalizers(self.state.reward_normalizers)
        self.accelerator.print(f"resumed from {self.resume_dir} at step {self.state.global_step}")

    # ------------------------------------------------------------------ set-up helpers
    def _check_rewards(self) -> None:
        """Score random images of the training size once, before anything is written, so that a reward breaking the
        contract fails now with one line; a TRL-style reward function only gets a warning here (TRL checked
        nothing) and is refused when training starts."""
        images = torch.rand(2, 3, self.height, self.width, device=self.accelerator.device, requires_grad=True)
        prompts, metadata = draw_prompts(self.prompt_fn, [derive_seed(self.config.seed, "check", i) for i in range(2)])
        with self.accelerator.autocast():
            self._reward_problem = self.rewards.check_or_warn(images, prompts, metadata)
