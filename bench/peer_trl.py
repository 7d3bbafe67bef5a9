"""The peer: TRL 0.23.1's AlignPropTrainer and DDPOTrainer, run from their own virtualenv (``bench/setup_peer.sh``).

Not imported by alignprop; the orchestrator (``bench/run.py``) runs it as
``bench/.peer-venv/bin/python bench/peer_trl.py <mode> ...`` on the same pipeline folder, prompts, seed and reward
(``bench/common.py``) as alignprop's worker, and reads the JSON line it prints.

    alignprop: time and peak memory of AlignPropTrainer.step (one optimizer step per call)
    ddpo:      DDPOTrainer for a budget of images, saving the LoRA after every epoch for the common evaluator
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REWARDS,
    Meter,
    add_profile_argument,
    check_profile_argument,
    cycling_prompts,
    emit,
    kernel_profile,  # noqa: E402
)


def _pipeline(path: str):
    from accelerate import PartialState
    from trl import DefaultDDPOStableDiffusionPipeline

    PartialState()  # TRL 0.23's pipeline wrapper needs the accelerate state to exist before it is built
    return DefaultDDPOStableDiffusionPipeline(path)


def run_alignprop(args: argparse.Namespace) -> None:
    from trl import AlignPropConfig, AlignPropTrainer

    device = "cuda" if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _pipeline(args.pipeline)
        reward = REWARDS[args.reward]().to(device)  # as TRL's aesthetic_scorer: moved to the device, not frozen
        config = AlignPropConfig(
            seed=args.seed, num_epochs=args.epochs, sample_num_steps=args.steps, sample_guidance_scale=5.0,
            sample_eta=1.0, train_batch_size=args.batch, train_learning_rate=args.lr,
            mixed_precision=args.precision or ("fp16" if device == "cuda" else "no"), save_freq=10**9,
            log_with=None, truncated_backprop_rand=False,
            # TRL detaches the UNet output of loop step i when i < truncated_backprop_timestep
            truncated_backprop_timestep=(args.steps - 1) if args.k == "1" else 0,
            project_kwargs={"project_dir": tmp, "logging_dir": tmp})
        trainer = AlignPropTrainer(config, reward, cycling_prompts(), pipe)
        pipe.set_progress_bar_config(disable=True)  # alignprop's sampler draws no per-step progress bar either
        meter = Meter(device)
        meter.start()
        global_step = 0
        for epoch in range(args.epochs):
            global_step = meter.step(lambda: trainer.step(epoch, global_step))
        result = meter.result()  # before the profiled step, which is not timed
        if args.profile:
            result["profile"] = kernel_profile(lambda: trainer.step(args.epochs, global_step))
        emit({"side": "trl", **vars(args), **result})


def run_ddpo(args: argparse.Namespace) -> None:
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from trl import DDPOConfig, DDPOTrainer

    device = "cuda" if args.device == "cuda" else "cpu"
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _pipeline(args.pipeline)
        reward = REWARDS[args.reward]().to(device)

        def reward_fn(images, prompts, metadata):
            with torch.no_grad():
                return reward(images, prompts, metadata)

        per_epoch = args.ddpo_sample_batch * args.ddpo_batches_per_epoch
        config = DDPOConfig(
            seed=args.seed, num_epochs=args.epochs, sample_num_steps=args.steps, sample_guidance_scale=5.0,
            sample_eta=1.0, sample_batch_size=args.ddpo_sample_batch,
            sample_num_batches_per_epoch=args.ddpo_batches_per_epoch, train_batch_size=args.ddpo_train_batch,
            train_gradient_accumulation_steps=args.ddpo_grad_accum, train_learning_rate=args.lr,
            mixed_precision="fp16" if device == "cuda" else "no", save_freq=10**9, log_with=None,
            project_kwargs={"project_dir": tmp, "logging_dir": tmp})
        trainer = DDPOTrainer(config, reward_fn, cycling_prompts(), pipe)
        pipe.set_progress_bar_config(disable=True)
        meter = Meter(device)
        meter.start()
        global_step, saved = 0, []
        for epoch in range(args.epochs):
            global_step = meter.step(lambda: trainer.step(epoch, global_step))
            images = (epoch + 1) * per_epoch
            if (epoch + 1) % args.save_every and epoch + 1 != args.epochs:
                continue
            folder = out / f"images-{images:05d}"
            state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.sd_pipeline.unet))
            pipe.sd_pipeline.save_lora_weights(save_directory=str(folder), unet_lora_layers=state)
            saved.append({"images": images, "lora": str(folder)})
        emit({"side": "trl-ddpo", **vars(args), "checkpoints": saved, **meter.result()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["alignprop", "ddpo"])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--reward", default="saturation", choices=sorted(REWARDS))
    parser.add_argument("--k", default="1", choices=["1", "all"])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="optimizer steps (alignprop) / epochs (ddpo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default=None, choices=["no", "fp16", "bf16"],
                        help="alignprop mode: accelerate's mixed precision (default fp16 on cuda, no on cpu)")
    parser.add_argument("--ddpo-sample-batch", type=int, default=8)
    parser.add_argument("--ddpo-batches-per-epoch", type=int, default=2)
    parser.add_argument("--ddpo-train-batch", type=int, default=4)
    parser.add_argument("--ddpo-grad-accum", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=1, help="ddpo: save the LoRA every N epochs")
    parser.add_argument("--out", default="")
    add_profile_argument(parser)
    args = parser.parse_args()
    check_profile_argument(parser, args)
    warnings.filterwarnings("ignore")
    {"alignprop": run_alignprop, "ddpo": run_ddpo}[args.mode](args)


if __name__ == "__main__":
    main()
