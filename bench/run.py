"""Benchmarks, alignprop side by side with TRL 0.23.1 (AlignPropTrainer, DDPOTrainer); writes bench/results/.

    bash bench/setup.sh                         # once: matplotlib, and the TRL peer in bench/.peer-venv
    .venv/bin/python bench/run.py               # everything, about 65 min on 2 CPU cores
    .venv/bin/python bench/run.py --quick       # a smaller set, under 5 min
    .venv/bin/python bench/run.py --device cuda # full-size SD 1.5 architecture, 512 px, batch 1, on a GPU

Benchmarks (``--only`` picks some):
    vs_trl             time per optimizer step and peak memory, ours / TRL AlignPropTrainer, K=1 and K=all
    memory_vs_k        our peak memory for K = 1..50, gradient checkpointing on and off
    sample_efficiency  eval reward vs images generated, ours vs TRL DDPOTrainer, one common evaluator
    limits             a training step / plain diffusers inference of the same batch, per family and K (issue 18)

Every case runs in a fresh process (so its peak memory is its own), both sides load the same pipeline folder and
call the same reward (bench/common.py) with the same prompts, seed, batch, steps, guidance, eta and LoRA rank. On CPU
memory is peak RSS (whole process); on CUDA ``max_memory_allocated``. Time is the median over the steps after the
first (warm-up). Results: bench/results/<benchmark>[-quick|-cuda].json, a PNG plot each, and summary[-...].md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

TARGETS = {"time_ratio": 0.7, "peak_ratio": 0.8, "k50_over_k1": 1.1, "k1_over_inference": 1.0,
           "kall_over_inference": 3.0}
LIMITS = {"families": ["sd", "sdxl", "sd3", "flux", "flux2-klein", "qwen-image", "z-image"], "ks": ["1", "all"],
          "steps": 50, "batch": 2, "size": 128, "repeats": 3,  # the setting: 128 px, 50 steps, batch 2
          # a lever off (fusing) or on, alone and all together: README's table comes from this one run
          "compare": ["fuse_lora_prefix=false", "checkpoint_memory_budget_gb=100", "compile_prefix=true",
                      "compile_prefix=true compile_grad_calls=true checkpoint_memory_budget_gb=100"]}

# DDPO needs many images to move at all, so this benchmark trains the tiny pipeline in every mode (on CUDA too;
# the full-size plan measures time and memory)
SAMPLE_EFFICIENCY = {"pipeline": "tiny16", "steps": 10, "ddpo_epochs": 64, "ddpo_save_every": 4, "ddpo_lrs": [1e-2],
                     "ours_lr": 1e-2, "ours_batch": 4, "ours_save_at": [4, 8, 12, 16, 24, 32, 48, 64],
                     "eval_samples": 16}

PLANS = {
    "full": {
        "vs_trl": {"cases": [("tiny16", "saturation"), ("tiny32", "saturation"), ("tiny16", "clip")],
                   "ks": ["1", "all"], "steps": 50, "batch": 2, "epochs": 4,
                   # alignprop once more with its opt-in speed levers on, beside the same TRL run
                   "ours_levers": "compile_prefix=true compile_grad_calls=true checkpoint_memory_budget_gb=100",
                   "profile": True,  # one more, untimed step per run, profiled: the kernel floor
                   "rounds": 2},  # each case twice, minutes apart: ratios drift ±15 % between runs
        "memory_vs_k": {"pipeline": "tiny32", "ks": [1, 5, 10, 25, 50], "ckpt": [1, 0], "steps": 50, "batch": 2,
                        "epochs": 2},
        "sample_efficiency": SAMPLE_EFFICIENCY,
        "limits": LIMITS,
    },
    "quick": {
        "vs_trl": {"cases": [("tiny16", "saturation")], "ks": ["1", "all"], "steps": 50, "batch": 2, "epochs": 3},
        "memory_vs_k": {"pipeline": "tiny16", "ks": [1, 10, 50], "ckpt": [1], "steps": 50, "batch": 2, "epochs": 1},
        "sample_efficiency": {"pipeline": "tiny16", "steps": 10, "ddpo_epochs": 4, "ddpo_lrs": [1e-2],
                              "ours_lr": 1e-2, "ours_batch": 4, "ours_save_at": [4, 8, 16], "eval_samples": 8},
        "limits": {"families": ["sd", "flux"], "ks": ["1", "all"], "steps": 50, "batch": 2, "size": 128,
                   "repeats": 2},
    },
    # seconds-long runs of the machinery for tests/test_bench.py; its figures mean nothing
    "smoke": {
        "vs_trl": {"cases": [("tiny16", "saturation")], "ks": ["1", "all"], "steps": 3, "batch": 1, "epochs": 2},
        "memory_vs_k": {"pipeline": "tiny16", "ks": [1, 3], "ckpt": [1, 0], "steps": 3, "batch": 1, "epochs": 1},
        "sample_efficiency": {"pipeline": "tiny16", "steps": 3, "ddpo_epochs": 1, "ddpo_lrs": [1e-2], "ours_lr": 1e-2,
                              "ours_batch": 2, "ours_save_at": [2, 4], "eval_samples": 2},
        "limits": {"families": ["sd"], "ks": ["1", "all"], "steps": 2, "batch": 1, "size": 64, "repeats": 1},
    },
    "cuda": {
        "vs_trl": {"cases": [("sd15", "saturation"), ("sd15", "clip")], "ks": ["1", "all"], "steps": 50,
                   "batch": 1, "epochs": 4},
        "memory_vs_k": {"pipeline": "sd15", "ks": [1, 5, 10, 25, 50], "ckpt": [1, 0], "steps": 50, "batch": 1,
                        "epochs": 2},
        "sample_efficiency": SAMPLE_EFFICIENCY,
        "limits": LIMITS,  # tiny pipelines on the CPU (bench_limits says so)
    },
}


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def pipeline(self, kind: str) -> Path:
        from pipelines import build

        return build(kind, self.work)

    def _run(self, cmd: list[str], label: str) -> dict:
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            print(f"  {label}: FAILED ({tail[0][:200]})", flush=True)
            return {"error": tail[0][:500], "returncode": proc.returncode}
        record = json.loads(lines[-1])
        record["wall_s"] = time.perf_counter() - start
        return record

    def ours(self, *argv: str, label: str = "alignprop") -> dict:
        return self._run([sys.executable, str(BENCH / "ours.py"), *argv, "--device", self.args.device], label)

    def trl(self, *argv: str, label: str = "trl") -> dict:
        if not Path(self.args.peer).exists():  # only --smoke gets here without the peer
            return {"error": f"the TRL peer is not installed ({self.args.peer})"}
        return self._run([self.args.peer, str(BENCH / "peer_trl.py"), *argv, "--device", self.args.device], label)


def _brief(record: dict) -> str:
    if "error" in record:
        return "failed"
    return f"{record['step_s']:.2f} s/step, peak {record['peak_mib']:.0f} MiB"


def _ratio(a: dict, b: dict, key: str):
    return a[key] / b[key] if key in a and key in b and b[key] else None


#: kernels that both sides call as often at K=1 (in the calls without gradients) and that compiling leaves as they are
FLOOR_KERNELS = ("attention", "attention backward", "convolution", "convolution backward")


def kernel_floor(ours: dict, trl: dict):
    """The time ratio alignprop would reach if it spent nothing outside its attention and convolution kernels: their
    seconds in its profiled step (bench/ours.py --profile) over TRL's s/step. None without a profile."""
    if "profile" not in ours or not trl.get("step_s"):
        return None
    return sum(ours["profile"]["kernels_s"][kind] for kind in FLOOR_KERNELS) / trl["step_s"]


#: the records each vs-TRL round holds: alignprop, TRL, and (plan key "ours_levers") alignprop with its levers
SIDES = ("ours", "trl", "ours_levers")


def merge_rounds(runs: list[dict]) -> dict:
    """One case from its rounds. Each side's record is its first round's (peak memory, profile) with ``step_s`` the
    median over the rounds; the time ratios are the median of the rounds' paired ratios (ours and TRL measured one
    after the other, so a slow spell of the machine falls on both), their spread in ``time_ratio[_levers]_rounds``.
    """
    case: dict = {}
    for side in [side for side in SIDES if side in runs[0]]:
        records = [run[side] for run in runs]
        case[side] = dict(records[0])
        if all("step_s" in record for record in records):
            case[side].update(step_s=statistics.median(r["step_s"] for r in records),
                              step_s_rounds=[r["step_s"] for r in records])
    for side, key in (("ours", "time_ratio"), ("ours_levers", "time_ratio_levers")):
        if side in case:
            ratios = [_ratio(run[side], run["trl"], "step_s") for run in runs]
            case[f"{key}_rounds"] = ratios
            case[key] = statistics.median(ratios) if None not in ratios else None
    case.update(peak_ratio=_ratio(case["ours"], case["trl"], "peak_mib"),
                train_peak_ratio=_ratio(case["ours"], case["trl"], "train_peak_mib"))
    if "ours_levers" in case:
        case["peak_ratio_levers"] = _ratio(case["ours_levers"], case["trl"], "peak_mib")
    return case


def bench_vs_trl(runner: Runner, plan: dict) -> dict:
    """Every case ``rounds`` times (plan key, default 1), the rounds one after the other over all cases, so that
    repeats of a case lie minutes apart; the first round also profiles one more, untimed step per run."""
    rounds = plan.get("rounds", 1)
    cases = [(kind, reward, k) for kind, reward in plan["cases"] for k in plan["ks"]]
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for number in range(rounds):
        if rounds > 1:
            print(f"  round {number + 1} of {rounds}", flush=True)
        profile = ["--profile"] if plan.get("profile") and runner.args.device == "cpu" and number == 0 else []
        for kind, reward, k in cases:
            common = ["alignprop", "--pipeline", str(runner.pipeline(kind)), "--reward", reward, "--k", k,
                      "--steps", str(plan["steps"]), "--batch", str(plan["batch"]), "--epochs", str(plan["epochs"]),
                      *profile]
            run = {"ours": runner.ours(*common), "trl": runner.trl(*common)}
            print(f"  {kind} {reward} K={k}: ours {_brief(run['ours'])} | trl {_brief(run['trl'])} | time ratio "
                  f"{_fmt(_ratio(run['ours'], run['trl'], 'step_s'))}", flush=True)
            if plan.get("ours_levers"):
                run["ours_levers"] = runner.ours(*common, "--set", plan["ours_levers"], label="alignprop with levers")
                print(f"    with {plan['ours_levers']}: {_brief(run['ours_levers'])} | time ratio "
                      f"{_fmt(_ratio(run['ours_levers'], run['trl'], 'step_s'))}", flush=True)
            runs[(kind, reward, k)].append(run)
    out = []
    for (kind, reward, k), case_runs in runs.items():
        case = {"pipeline": kind, "reward": reward, "k": k, **merge_rounds(case_runs)}
        if plan.get("ours_levers"):
            case["levers"] = plan["ours_levers"]
        case["kernel_floor"] = kernel_floor(case.get("ours_levers", case["ours"]), case["trl"])
        print(f"  {kind} {reward} K={k}: time ratio {_fmt(case['time_ratio'])}"
              + (f", with the levers {_fmt(case['time_ratio_levers'])}" if "ours_levers" in case else "")
              + (f" (median of {rounds} rounds)" if rounds > 1 else "")
              + (f"; attention and convolution kernels alone {_fmt(case['kernel_floor'])} of TRL's step"
                 if case["kernel_floor"] is not None else ""), flush=True)
        out.append(case)
    return {"plan": plan, "cases": out}


def bench_memory_vs_k(runner: Runner, plan: dict) -> dict:
    path = str(runner.pipeline(plan["pipeline"]))
    rows = []
    for ckpt in plan["ckpt"]:
        for k in plan["ks"]:
            record = runner.ours("alignprop", "--pipeline", path, "--k", str(k), "--ckpt", str(ckpt),
                                 "--steps", str(plan["steps"]), "--batch", str(plan["batch"]),
                                 "--epochs", str(plan["epochs"]))
            rows.append({**record, "k": k, "ckpt": bool(ckpt)})
            print(f"  K={k} checkpointing {'on' if ckpt else 'off'}: {_brief(record)}", flush=True)
    out = {"plan": plan, "rows": rows}
    for ckpt in (True, False):
        peaks = {r["k"]: r["peak_mib"] for r in rows if r["ckpt"] == ckpt and "peak_mib" in r}
        if 1 in peaks and max(plan["ks"]) in peaks:
            out[f"k{max(plan['ks'])}_over_k1_{'ckpt' if ckpt else 'no_ckpt'}"] = peaks[max(plan["ks"])] / peaks[1]
    return out


def bench_limits(runner: Runner, plan: dict) -> dict:
    """bench/limits.py per family: each in a fresh process, inference and training steps side by side in it."""
    if runner.args.device == "cuda":
        print("  limits runs the tiny pipelines on the CPU; the GPU cases are not written yet", flush=True)
    rows = []
    for family in plan["families"]:
        record = runner._run([sys.executable, str(BENCH / "limits.py"), "--family", family, "--ks",
                              ",".join(plan["ks"]), "--steps", str(plan["steps"]), "--batch", str(plan["batch"]),
                              "--size", str(plan["size"]), "--repeats", str(plan["repeats"]),
                              *[arg for spec in plan.get("compare", []) for arg in ("--compare", spec)]],
                             f"limits {family}")
        rows.append({"family": family, **record})
        if "ratio" in record:
            print(f"  {family}: inference {statistics.median(record['times_s']['inference']):.2f} s; "
                  + "; ".join(f"K={k} step / inference {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
                              for k, r in record["ratio"].items()), flush=True)
    return {"plan": plan, "rows": rows}


def bench_sample_efficiency(runner: Runner, plan: dict) -> dict:
    """DDPO runs once per learning rate in the plan (its best curve is the one compared); alignprop once, at its
    learning rate. Every saved LoRA is scored by the same evaluator (bench/ours.py evaluate)."""
    path = str(runner.pipeline(plan["pipeline"]))
    steps = str(plan["steps"])
    ddpo_runs = {}
    for lr in plan["ddpo_lrs"]:
        ddpo_runs[lr] = runner.trl("ddpo", "--pipeline", path, "--steps", steps, "--epochs", str(plan["ddpo_epochs"]),
                                   "--lr", str(lr), "--save-every", str(plan.get("ddpo_save_every", 1)),
                                   "--out", str(runner.work / f"ddpo-lr{lr}"), label=f"ddpo lr={lr}")
        print(f"  DDPO lr={lr}: {len(ddpo_runs[lr].get('checkpoints', []))} checkpoints, "
              f"{ddpo_runs[lr].get('wall_s', 0):.0f} s", flush=True)
    ours = runner.ours("train", "--pipeline", path, "--steps", steps, "--k", "uniform", "--lr", str(plan["ours_lr"]),
                       "--batch", str(plan["ours_batch"]), "--save-at", ",".join(map(str, plan["ours_save_at"])),
                       "--out", str(runner.work / "ours-loras"))
    print(f"  alignprop lr={plan['ours_lr']}: {len(ours.get('checkpoints', []))} checkpoints, "
          f"{ours.get('wall_s', 0):.0f} s", flush=True)
    runs = {**{f"ddpo lr={lr}": run for lr, run in ddpo_runs.items()}, "alignprop": ours}
    loras = [c["lora"] for run in runs.values() for c in run.get("checkpoints", [])]
    scores = runner.ours("evaluate", "--pipeline", path, "--steps", steps, "--loras", json.dumps(loras),
                         "--eval-samples", str(plan["eval_samples"]), label="evaluate").get("scores", {})
    base = scores.get("base")
    curves = {name: [{"images": 0, "reward": base}] + [{"images": c["images"], "reward": scores.get(c["lora"])}
                                                         for c in run.get("checkpoints", [])]
              for name, run in runs.items()}

    def best_of(name: str):
        points = [p for p in curves[name][1:] if p["reward"] is not None]
        return max(points, key=lambda p: p["reward"]) if points else None

    ddpo_names = [name for name in curves if name.startswith("ddpo") and best_of(name)]
    out = {"plan": plan, "curves": curves, "runs": {name: _strip(run) for name, run in runs.items()},
           "eval_base": base}
    if ddpo_names:
        best_name = max(ddpo_names, key=lambda name: best_of(name)["reward"])
        best = best_of(best_name)
        curves["ddpo"] = curves[best_name]
        reached = next((p for p in curves["alignprop"][1:] if p["reward"] is not None
                        and p["reward"] >= best["reward"]), None)
        out.update({"ddpo_best_run": best_name, "ddpo_best_reward": best["reward"],
                    "ddpo_images_to_best": best["images"],
                    "alignprop_images_to_ddpo_best": reached["images"] if reached else None,
                    "sample_ratio": best["images"] / reached["images"] if reached else None})
        print(f"  DDPO's best ({best_name}) {best['reward']:.4f} (base {base:.4f}) after {best['images']} images; "
              f"alignprop reaches it after "
              f"{reached['images'] if reached else 'more than ' + str(plan['ours_save_at'][-1])} images", flush=True)
    return out


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("checkpoints",)}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip()
    except OSError:
        pass
    return info


BENCHMARKS = {"vs_trl": bench_vs_trl, "memory_vs_k": bench_memory_vs_k, "sample_efficiency": bench_sample_efficiency,
              "limits": bench_limits}
WITHOUT_PEER = ("memory_vs_k", "limits")  # the benchmarks that do not run TRL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller set, under 5 minutes on 2 CPU cores")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: full-size SD 1.5 architecture at 512 px, batch 1")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--peer", default=str(BENCH / ".peer-venv" / "bin" / "python"),
                        help="python of the TRL 0.23.1 virtualenv (bench/setup.sh makes it)")
    parser.add_argument("--results", default=str(BENCH / "results"))
    parser.add_argument("--work", default="", help="folder for pipelines and LoRAs (default: a temporary one)")
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    if any(name not in WITHOUT_PEER for name in only) and not Path(args.peer).exists() and not args.smoke:
        parser.error(f"--peer: {args.peer} does not exist; run 'bash bench/setup.sh' first")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no GPU on this machine; leave --device out to run on the CPU")
    plan_name = "smoke" if args.smoke else "cuda" if args.device == "cuda" else "quick" if args.quick else "full"
    suffix = "" if plan_name == "full" else f"-{plan_name}"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    from plots import PLOTS, write_summary

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runner = Runner(args, work)
        start = time.perf_counter()
        for name in only:
            print(f"{name} ({plan_name})", flush=True)
            t0 = time.perf_counter()
            data = BENCHMARKS[name](runner, PLANS[plan_name][name])
            data.update({"benchmark": name, "plan_name": plan_name, "device": args.device, "machine": machine(),
                         "targets": TARGETS, "elapsed_s": time.perf_counter() - t0})
            path = results / f"{name}{suffix}.json"
            path.write_text(json.dumps(data, indent=1) + "\n")
            png = PLOTS[name](data, results / f"{name}{suffix}.png")
            print(f"  wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
                  f"{' and ' + png.name if png else ''} ({data['elapsed_s']:.0f} s)", flush=True)
        summary = write_summary(results, suffix)
        print(f"total {time.perf_counter() - start:.0f} s; summary: {summary}")


if __name__ == "__main__":
    main()
