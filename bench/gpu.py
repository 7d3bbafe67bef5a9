"""Every ``--device cuda`` benchmark case in one run, within a time budget (``bench/gpu.sh`` is its command).

    bash bench/gpu.sh             # on a machine with an H100/H200: at most --budget-s (480 s) of cases
    bash bench/gpu.sh --dry-run   # any machine: every case's model builds (meta device), the plan is printed

The cases, in the order they run (the most asked-for first, so a short budget cuts the tail):

1. SD 1.5 architecture, 512 px, K=1 and K=50 (all of the 50 steps): alignprop, then TRL 0.23.1's
   AlignPropTrainer on the same pipeline folder where its virtualenv (``bench/setup.sh``) is there.
2. SDXL base, 1024 px, K=1.
3. The flow families (FLUX.1-dev, SD3.5-medium, FLUX.2 [klein] 4B, Qwen-Image, Z-Image-Turbo) at 512 px, K=1,
   then at 1024 px, K=1.

All in bf16 (frozen weights; LoRA weights fp32), batch 1, the saturation reward, random init from the published
configs (``bench/gpu_cases.py`` builds them and says how). Each alignprop case reports its median step time after a
warm-up step, ``torch.cuda.max_memory_allocated`` over the steps, and the same batch's plain diffusers inference
(the pipeline's own ``__call__``, no LoRA) timed in the same process before training, so step / inference is a
ratio of one process. Each model runs in a fresh process (its peak memory is its own; one that fails or runs out of
memory does not stop the rest). A process gets the budget that is left: one that outlasts it is stopped, what it
finished is kept, and the cases that did not start are listed as skipped. Results: ``bench/results/gpu-cuda.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
RESULTS = BENCH / "results" / "gpu-cuda.json"
PEER = BENCH / ".peer-venv" / "bin" / "python"
FLOW_MODELS = ["flux1-dev", "sd35-medium", "flux2-klein-4b", "qwen-image", "z-image-turbo"]


@dataclass
class Case:
    """One process: ``side`` alignprop (``bench/gpu_cases.py``, all of ``ks``) or trl (``bench/peer_trl.py``)."""

    side: str
    model: str
    size: int
    ks: list[str] = field(default_factory=lambda: ["1"])

    @property
    def label(self) -> str:
        return f"{self.side} {self.model} {self.size}px K={','.join(self.ks)}"


PLAN = [Case("alignprop", "sd15", 512, ["1", "all"]), Case("trl", "sd15", 512, ["1"]),
        Case("trl", "sd15", 512, ["all"]), Case("alignprop", "sdxl-base", 1024)] + \
    [Case("alignprop", model, 512) for model in FLOW_MODELS] + [Case("alignprop", model, 1024) for model in FLOW_MODELS]


def command(case: Case, args: argparse.Namespace, sd15_folder: str | None) -> list[str]:
    if case.side == "trl":
        return [str(args.peer), str(BENCH / "peer_trl.py"), "alignprop", "--pipeline", sd15_folder, "--k",
                case.ks[0], "--steps", "50", "--batch", "1", "--epochs", str(args.epochs), "--device", "cuda",
                "--precision", "bf16"]
    size = 64 if args.smoke else case.size  # --smoke: the model's tiny pipeline on the CPU, 2 steps
    argv = [sys.executable, str(BENCH / "gpu_cases.py"), "--models", case.model, "--sizes", str(size), "--ks",
            ",".join(case.ks), "--block-checkpointing", "off", "--epochs", str(args.epochs), "--results", ""]
    if args.smoke:
        return argv + ["--smoke"]
    return argv + (["--folder", sd15_folder] if case.model == "sd15" else [])


def run(case: Case, argv: list[str], timeout: float) -> tuple[list[dict], str | None]:
    """The JSON rows the process printed, and why it stopped early (None when it finished)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        stdout, error = proc.stdout, None
        if proc.returncode:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            error = f"exit status {proc.returncode}: {tail[0][:300]}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        error = f"stopped after {timeout:.0f} s: the time budget ran out"
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if case.side == "trl":  # peer_trl prints the Meter's record: one row in gpu_cases' terms
        rows = [{"model": case.model, "size": case.size, "k": r["k"], "step_s": r["step_s"],
                 "step_times_s": r["step_times_s"], "peak_gib": r["peak_mib"] / 1024} for r in rows]
    return [{"side": case.side, **row} for row in rows], error


def ratios(rows: list[dict]) -> list[dict]:
    """alignprop / TRL time and peak memory per K where both sides ran."""
    trl = {r["k"]: r for r in rows if r["side"] == "trl"}
    return [{"model": r["model"], "size": r["size"], "k": r["k"], "time_ratio": r["step_s"] / trl[r["k"]]["step_s"],
             "peak_ratio": r["peak_gib"] / trl[r["k"]]["peak_gib"]}
            for r in rows if r["side"] == "alignprop" and r["model"] == "sd15" and r["k"] in trl]


def table(rows: list[dict]) -> str:
    def cell(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = ["| side | model | px | K | step s | inference s | step / inference | peak GiB |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['side']} | {r['model']} | {r['size']} | {r['k']} | {cell(r['step_s'], 3)} | "
                     f"{cell(r.get('inference_s'), 3)} | {cell(r.get('step_over_inference'), 2)} | "
                     f"{cell(r.get('peak_gib'), 1)} |")
    return "\n".join(lines)


def dry_run(args: argparse.Namespace) -> None:
    """Build every model on the meta device (``gpu_cases.py --dry-run``) and print the plan."""
    models = list(dict.fromkeys(case.model for case in PLAN))  # in plan order, once each
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_cases.py"), "--dry-run", "--models", ",".join(models)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"error: a case does not build: {proc.stderr.strip().splitlines()[-1:]}")
    built = {row["model"]: row["params_b"] for row in map(json.loads, proc.stdout.splitlines())}
    peer = Path(args.peer).exists()
    for case in PLAN:
        skipped = case.side == "trl" and not peer
        print(json.dumps({"case": case.label, "builds": case.model in built,
                          "params_b": round(sum(built[case.model].values()), 3),
                          "runs": "no: the TRL peer is not installed (bash bench/setup.sh)" if skipped else "yes"}))
    print(f"dry run: {len(PLAN)} cases build; budget {args.budget_s:.0f} s; results would go to {args.results}")


def why_unwritable(path: Path) -> str | None:
    """Why a file could not be created at ``path`` (its nearest existing folder is a file or read-only), or None."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file"
    return None if os.access(folder, os.W_OK) else f"{folder} is not writable"


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="check that every case builds, on any machine")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for the whole run, set-up included (default 480: 8 minutes)")
    parser.add_argument("--epochs", type=int, default=3, help="optimizer steps per case, the first a warm-up")
    parser.add_argument("--smoke", action="store_true",
                        help="the run's machinery on the CPU: each model's tiny pipeline, alignprop's side only, "
                             "figures mean nothing (tests/test_bench.py)")
    parser.add_argument("--peer", default=str(PEER), help="the TRL peer's python (bench/setup.sh makes it)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    if not 0 < args.budget_s < math.inf or args.epochs < 1:
        parser.error("--budget-s must be a number of seconds > 0 and --epochs >= 1")
    if Path(args.results).is_dir():
        parser.error(f"--results: {args.results} is a folder; give a file path (default {RESULTS})")
    unwritable = why_unwritable(Path(args.results))
    if unwritable:  # found now, not after minutes of GPU time
        parser.error(f"--results: {args.results} cannot be written ({unwritable}); give a writable file path")
    if args.dry_run:
        return dry_run(args)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("torch sees no GPU on this machine; run with --dry-run to check that every case builds")
    start = time.perf_counter()
    rows, stopped, skipped = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        from pipelines import build

        # one folder both sides load (random init, seed 0)
        sd15_folder = None if args.smoke else str(build("sd15", Path(tmp)))
        for case in PLAN:
            left = args.budget_s - (time.perf_counter() - start)
            if case.side == "trl" and (args.smoke or not Path(args.peer).exists()):
                why = "--smoke runs alignprop's side only" if args.smoke else \
                    "the TRL peer is not installed (bash bench/setup.sh)"
                skipped.append({"case": case.label, "why": why})
                continue
            if left < 10:
                skipped.append({"case": case.label, "why": "the time budget ran out before it started"})
                continue
            print(f"{case.label} ({left:.0f} s left)", flush=True)
            case_rows, error = run(case, command(case, args, sd15_folder), left)
            rows += case_rows
            if error:
                stopped.append({"case": case.label, "why": error, "rows_kept": len(case_rows)})
                print(f"  {error}", flush=True)
    elapsed = time.perf_counter() - start
    record = {"date": datetime.date.today().isoformat(),
              "gpu": "none (--smoke)" if args.smoke else torch.cuda.get_device_name(0),
              "torch": torch.__version__, "budget_s": args.budget_s, "elapsed_s": elapsed, "epochs": args.epochs,
              "rows": rows, "vs_trl": ratios(rows), "stopped": stopped, "skipped": skipped}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))
    for ratio in record["vs_trl"]:
        print(f"vs TRL, sd15 512 px K={ratio['k']}: time {ratio['time_ratio']:.2f}, peak {ratio['peak_ratio']:.2f}")
    print(f"{len(rows)} rows in {elapsed:.0f} s; {len(stopped)} stopped, {len(skipped)} skipped -> {args.results}")


if __name__ == "__main__":
    main()
