"""alignprop's side of the benchmarks (run in ``.venv`` by ``bench/run.py``; prints one JSON line).

    alignprop: time and peak memory of ``AlignPropTrainer.train_step`` (one optimizer step per call)
    train:     train for a budget of images, saving the LoRA at given image counts (sample efficiency)
    evaluate:  the common evaluator: mean reward of fixed-seed samples from diffusers' own pipeline, for the base
               model and for each saved LoRA (ours and DDPO's), loaded with ``load_lora_weights``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PROMPTS,
    REWARDS,
    Meter,
    add_profile_argument,
    check_profile_argument,
    cycling_prompts,
    emit,
    kernel_profile,  # noqa: E402
)


def _config(args: argparse.Namespace, output_dir: str, **overrides):
    from alignprop_core import AlignPropConfig

    truncation = {"truncation": "none"} if args.k == "all" else \
        {"truncation": "fixed", "truncation_k": int(args.k)} if args.k.isdigit() else {"truncation": args.k}
    fields = dict(pretrained_model=args.pipeline, seed=args.seed, num_epochs=args.epochs,
                  sample_num_steps=args.steps, sample_guidance_scale=5.0, sample_eta=1.0,
                  train_batch_size=args.batch, train_learning_rate=args.lr,
                  mixed_precision="fp16" if args.device == "cuda" else "no",
                  gradient_checkpointing=bool(args.ckpt), eval_num_samples=0, output_dir=output_dir,
                  save_freq=10**9, checkpoint_memory_budget_gb=args.budget_gb, **truncation)
    fields.update(args.set)
    fields.update(overrides)
    return AlignPropConfig(**fields)


def run_alignprop(args: argparse.Namespace) -> None:
    from alignprop_core import AlignPropTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = AlignPropTrainer(_config(args, tmp), reward_function=REWARDS[args.reward](),
                                   prompt_function=cycling_prompts())
        meter = Meter(args.device)
        meter.start()
        ks = [meter.step(trainer.train_step)["k"] for _ in range(args.epochs)]
        result = meter.result()  # before the profiled step, which is not timed
        if args.profile:
            result["profile"] = kernel_profile(trainer.train_step)
        emit({"side": "alignprop", **vars(args), "k_drawn": ks, **result})


def run_train(args: argparse.Namespace) -> None:
    from alignprop_core import AlignPropTrainer

    save_at = sorted(int(n) for n in args.save_at.split(","))
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = AlignPropTrainer(_config(args, tmp, num_epochs=max(save_at) // args.batch),
                                   reward_function=REWARDS[args.reward](), prompt_function=cycling_prompts())
        meter = Meter(args.device)
        meter.start()
        saved = []
        while trainer.state.global_step * args.batch < max(save_at):
            meter.step(trainer.train_step)
            images = trainer.state.global_step * args.batch
            if images in save_at:
                saved.append({"images": images, "lora": str(trainer.save_model(out / f"images-{images:05d}"))})
        emit({"side": "alignprop", **vars(args), "checkpoints": saved, **meter.result()})


def run_evaluate(args: argparse.Namespace) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = "cuda" if args.device == "cuda" else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reward = REWARDS[args.reward]().to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.eval_samples)]
    scores = {}
    for lora in [""] + json.loads(args.loras):
        if lora:
            pipe.load_lora_weights(lora)
        generators = [torch.Generator().manual_seed(10_000 + i) for i in range(len(prompts))]
        with torch.no_grad():
            images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0,
                          generator=generators, output_type="pt").images
            scores[lora or "base"] = float(reward(images.float())[0].mean())
        if lora:
            pipe.unload_lora_weights()
    emit({"scores": scores})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["alignprop", "train", "evaluate"])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--reward", default="saturation", choices=sorted(REWARDS))
    parser.add_argument("--k", default="1", help="K (int), 'all' (full backprop), or a truncation mode (uniform)")
    parser.add_argument("--ckpt", type=int, default=1, help="gradient checkpointing 1/0")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="checkpoint_memory_budget_gb (selective checkpointing; needs --ckpt 1)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--save-at", default="", help="train: image counts at which to save the LoRA")
    parser.add_argument("--out", default="")
    parser.add_argument("--loras", default="[]", help="evaluate: JSON list of LoRA folders")
    parser.add_argument("--eval-samples", type=int, default=16)
    add_profile_argument(parser)
    parser.add_argument("--set", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help="config overrides of alignprop's side (levers on: bench/limits.py's --compare syntax)")
    args = parser.parse_args()
    check_profile_argument(parser, args)
    from limits import parse_overrides

    from alignprop_core.errors import ConfigError

    try:
        args.set = {key: value for spec in args.set for key, value in parse_overrides(spec, "--set").items()}
    except ConfigError as exc:
        parser.error(str(exc))
    warnings.filterwarnings("ignore")
    {"alignprop": run_alignprop, "train": run_train, "evaluate": run_evaluate}[args.mode](args)


if __name__ == "__main__":
    main()
