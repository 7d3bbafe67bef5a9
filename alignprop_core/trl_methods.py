"""TRL's ``AlignPropTrainer`` methods, built on alignprop's trainer: ``step``, ``calculate_loss``,
``compute_rewards``, ``_generate_samples`` and ``push_to_hub``, with TRL's signatures and return shapes
(docs/trl-migration.md). ``AlignPropTrainer`` inherits them; they use only its public pieces and a few of its
internals (``_run_step``, ``_sample``, ``_prepare_output_dir``)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from alignprop_core.accelerator_setup import upload_run
from alignprop_core.seeding import derive_seed, draw_prompts


class TRLTrainerMethods:
    """Mixed into ``AlignPropTrainer``."""

    def step(self, epoch: int, global_step: int) -> int:
        """TRL's ``step``: one optimizer step (logged, checkpointed when due); returns ``global_step + 1``."""
        self._prepare_output_dir()
        self._run_step(self.config.num_epochs)
        return global_step + 1

    def calculate_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """TRL's ``calculate_loss``: the scalar loss for rewards ``[B]``, here ``-mean(rewards)`` (TRL: ``10 -
        mean``, the same gradient). Override it in a subclass to train on another loss."""
        return -rewards.mean()

    def compute_rewards(self, prompt_image_pairs: dict[str, Any]) -> torch.Tensor:
        """TRL's ``compute_rewards``: the weighted reward ``[B]`` of ``{"images", "prompts", "prompt_metadata"}``.
        Like TRL it returns what the rewards return (a ``(scores, metadata)`` tuple unpacked), unchecked; training
        checks the contract."""
        return self.rewards.unchecked_total(prompt_image_pairs["images"], list(prompt_image_pairs["prompts"]),
                                            list(prompt_image_pairs["prompt_metadata"]))

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

    def push_to_hub(self, repo_id: Optional[str] = None, **_trl_arguments: Any) -> None:
        """Upload the exported weights and config (TRL passed ``dataset_name`` and more: accepted, unused)."""
        upload_run(self.output_dir, repo_id or self.config.hub_model_id or self.output_dir.resolve().name)
