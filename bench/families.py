"""The tiny pipeline of every family (SD 1.x, SDXL, SD3, FLUX.1, FLUX.2 [klein], Qwen-Image, Z-Image): training
step time and peak memory, same settings, side by side in one run.

Every tiny pipeline (``alignprop_core.tiny``; default size 128 px) trains with the same config through
``AlignPropTrainer`` (saturation reward, fp32, per-call gradient checkpointing on, the family's own scheduler;
guidance 5: CFG for SD/SDXL/SD3/Z-Image, FLUX's embedded guidance). Each (model, truncation) case runs in a
fresh subprocess, so its peak memory is its own: on CPU the peak RSS growth over the process's RSS before the first
step (``ru_maxrss``), on CUDA ``torch.cuda.max_memory_allocated`` over the steps. The first step is a warm-up; the
reported time is the median ``step_time`` of the others, and with ``--repeats R`` the smallest of R such runs
(the cases alternate between the models, so a busy machine hurts both alike). Run:

    .venv/bin/python bench/families.py [--steps 20] [--batch 2] [--epochs 4] [--repeats 2] [--cases k1,k5,all,lv2]
        [--models sd,sdxl,sd3,flux,flux2-klein,qwen-image,z-image] [--json bench/results/families.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, rss_mib  # noqa: E402

CASES = {"k1": {"truncation": "fixed", "truncation_k": 1},
         "k5": {"truncation": "fixed", "truncation_k": 5},
         "all": {"truncation": "none"},
         "lv2": {"truncation": "draft_lv", "draft_lv_n": 2}}
LABELS = {"k1": "K=1", "k5": "K=5", "all": "K=N (none)", "lv2": "DRaFT-LV n=2"}


def worker(args: argparse.Namespace) -> None:
    import torch

    from alignprop_core import AlignPropConfig, AlignPropTrainer
    from alignprop_core.tiny import tiny_families

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_families()[args.model].build_tiny(Path(tmp) / "pipeline")
        config = AlignPropConfig(pretrained_model=str(path), rewards="saturation", num_epochs=args.epochs,
                                 sample_num_steps=args.steps, train_batch_size=args.batch, mixed_precision="no",
                                 eval_num_samples=0, output_dir=str(Path(tmp) / "out"), save_freq=10**6,
                                 scheduler=args.scheduler, resolution=128, **CASES[args.case])
        trainer = AlignPropTrainer(config)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_mib()
        times = []
        for _ in range(args.epochs):
            times.append(trainer.train_step()["step_time"])
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss_mib() - base
        denoiser = trainer.family.denoiser(trainer.pipe)
        frozen_params = sum(p.numel() for p in denoiser.parameters() if not p.requires_grad)
        print(json.dumps({"model": args.model, "case": args.case, "step_s": statistics.median(times[1:] or times),
                          "peak_mib": peak, "device": "cuda" if cuda else "cpu",
                          "size": f"{trainer.width}x{trainer.height}", "denoiser_params_m": frozen_params / 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per sample (default 20)")
    parser.add_argument("--batch", type=int, default=2, help="train_batch_size (default 2)")
    parser.add_argument("--epochs", type=int, default=4, help="optimizer steps per case, first one warm-up (4)")
    parser.add_argument("--scheduler", default="auto", help="default auto: each family's own")
    parser.add_argument("--models", default="sd,sdxl,sd3,flux,flux2-klein,qwen-image,z-image",
                        help="comma list of tiny families")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case, the fastest reported (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per worker (default 1: steadier on a shared machine)")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        worker(args)
        return
    rows = []
    for case in args.cases.split(","):
        runs: dict[str, list[dict]] = {model: [] for model in args.models.split(",")}
        for _ in range(args.repeats):
            for model in runs:
                command = [sys.executable, __file__, "--model", model, "--case", case, "--steps", str(args.steps),
                           "--batch", str(args.batch), "--epochs", str(args.epochs), "--scheduler", args.scheduler,
                           "--threads", str(args.threads)]
                out = subprocess.run(command, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{model}/{case} failed:\n{out.stderr[-3000:]}")
                runs[model].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for model, results in runs.items():
            best = min(results, key=lambda r: r["step_s"])
            rows.append({**best, "peak_mib": statistics.median(r["peak_mib"] for r in results)})
    print(f"steps={args.steps} batch={args.batch} scheduler={args.scheduler} guidance=5, "
          f"gradient checkpointing on, fp32, device={rows[0]['device']}, image {rows[0]['size']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                            if k not in ("model", "case", "json")},
                                               "rows": rows}, indent=2) + "\n")
    print("| case | model | denoiser params (M) | step time (s) | peak memory over start (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        label = LABELS.get(row["case"], row["case"]).replace("N", str(args.steps))
        print(f"| {label} | tiny-{row['model']} | {row['denoiser_params_m']:.2f} | {row['step_s']:.2f} | "
              f"{row['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
