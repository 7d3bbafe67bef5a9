"""The reward-hacking guards measured on a collapse-prone tiny-SD run (docs/reward-hacking.md).

The setting: full backprop (truncation none), a high learning rate, the saturation reward, 10 denoising steps; the
eval set is 4 prompts x 2 seeds every 4 steps, scored with the training reward and with contrast as a held-out reward.
Runs (same seeds, so the same prompts and noise at every step):

    plain      kl_weight 0, no early stopping            (diversity and rewards over steps without a guard)
    kl-BETA    kl_weight BETA, no early stopping          (the same with the KL to the base model, per BETA)
    early      kl_weight 0, early stopping on the held-out reward (patience 3): where it fires, best/ vs last

Writes bench/results/reward_hacking.json (every eval round of every run, the stop lines, the wall time) and prints a
summary. CPU only, one process; run it on a quiet machine:

    OMP_NUM_THREADS=2 .venv/bin/python bench/reward_hacking.py [--steps 40] [--betas 1,3,30,1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "reward_hacking.json"


def settings(steps: int, output_dir: Path) -> dict:
    return dict(pretrained_model="alignprop:tiny-sd", rewards="saturation", eval_rewards="contrast",
                prompts="simple_animals", num_epochs=steps, train_batch_size=2, train_learning_rate=0.05,
                sample_num_steps=10, truncation="none", mixed_precision="no", eval_num_samples=8,
                eval_images_per_prompt=2, eval_freq=4, save_freq=steps, output_dir=str(output_dir),
                overwrite_output_dir=True)


def run(name: str, steps: int, root: Path, **overrides) -> dict:
    from alignprop_core import AlignPropConfig, AlignPropTrainer
    from alignprop_core.checkpoints import read_metrics

    config = AlignPropConfig(**{**settings(steps, root / name), **overrides})
    start = time.perf_counter()
    trainer = AlignPropTrainer(config)
    result = trainer.train()
    rows, evals = read_metrics(trainer.output_dir / "metrics.jsonl")
    best_file = trainer.output_dir / "best" / "best.json"
    return {"name": name, "overrides": overrides, "seconds": time.perf_counter() - start,
            "steps_run": result.global_step, "stop_reason": result.stop_reason,
            "best": json.loads(best_file.read_text()) if best_file.is_file() else None,
            "kl": [row.get("kl") for row in rows], "evals": evals}


def summary(runs: list[dict]) -> str:
    keys = ("eval/saturation_mean", "eval/contrast_mean", "eval/diversity_within_prompt",
            "eval/diversity_across_prompts", "eval/image_saturation")
    lines = []
    for result in runs:
        lines.append(f"== {result['name']} {result['overrides']}: {result['steps_run']} steps, "
                     f"{result['seconds']:.0f} s; {result['stop_reason']}")
        lines.append("step  " + "  ".join(k[len("eval/"):] for k in keys))
        for row in result["evals"]:
            lines.append(f"{row['step']:>4}  " + "  ".join(f"{row.get(k, float('nan')):.4f}".rjust(len(k) - 5)
                                                            for k in keys))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--betas", default="1,3,30,1000", help="kl_weight of each KL run, comma-separated")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        betas = [float(b) for b in args.betas.split(",")]
        runs = [run("plain", args.steps, root)]
        runs += [run(f"kl-{beta:g}", args.steps, root, kl_weight=beta) for beta in betas]
        runs.append(run("early", args.steps, root, early_stopping_patience=3))
    text = summary(runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "betas": args.betas, "runs": runs,
                                    "seconds": time.perf_counter() - start}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
