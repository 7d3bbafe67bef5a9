"""Plots (PNG) and the Markdown summary of bench/results/*.json; ``python bench/plots.py`` redraws them all."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: no plot; bash bench/setup.sh installs it)", file=sys.stderr)
        return None
    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(case: dict) -> str:
    return f"{case['pipeline']}\n{case['reward']}\nK={case['k']}"


def plot_vs_trl(data: dict, path: Path) -> Optional[Path]:
    plt = _plt()
    cases = [c for c in data["cases"] if c["time_ratio"] is not None]
    if plt is None or not cases:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases) + 2), 4))
    bars = [("time_ratio", "time per step, ours / TRL"), ("peak_ratio", "peak memory, ours / TRL")]
    if any(c.get("time_ratio_levers") is not None for c in cases):
        bars.insert(1, ("time_ratio_levers", "time per step, ours with the levers / TRL"))
    width = 0.8 / len(bars)
    for n, (key, label) in enumerate(bars):
        values = [c.get(key) or 0 for c in cases]
        rounds = [[r for r in c.get(f"{key}_rounds", []) if r is not None] or [v] for v, c in zip(values, cases)]
        spread = [[v - min(r) for v, r in zip(values, rounds)], [max(r) - v for v, r in zip(values, rounds)]]
        ax.bar([i + (n - (len(bars) - 1) / 2) * width for i in range(len(cases))], values, width, label=label,
               yerr=spread, capsize=2)
    x = range(len(cases))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(data["targets"]["time_ratio"], color="C0", linestyle="--", linewidth=0.8, label="time target 0.7")
    ax.axhline(data["targets"]["peak_ratio"], color=f"C{len(bars) - 1}", linestyle="--", linewidth=0.8,
               label="memory target 0.8")
    ax.set_xticks(list(x), [_label(c) for c in cases], fontsize=8)
    ax.set_ylabel("ratio (lower is better for alignprop)")
    top = max(c.get(key) or 0 for c in cases for key, _ in bars)
    ax.set_ylim(0, max(1.5, top + 0.5))  # headroom for the legend
    ax.set_title(f"alignprop vs TRL 0.23.1 AlignPropTrainer ({data['device']})")
    ax.legend(fontsize=7, loc="upper right")
    return _save(plt, fig, path)


def plot_memory_vs_k(data: dict, path: Path) -> Optional[Path]:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for ckpt, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in data["rows"] if r["ckpt"] == ckpt and "peak_mib" in r]
        if rows:
            ax.plot([r["k"] for r in rows], [r["peak_mib"] for r in rows], style,
                    label=f"checkpointing {'on' if ckpt else 'off'}")
    ax.set_xlabel("K (denoising steps that keep gradients)")
    memory = "peak CUDA memory allocated" if data["device"] == "cuda" else "peak RSS"
    ax.set_ylabel(f"{memory} (MiB)")
    ax.set_title(f"Memory vs truncation depth ({data['plan']['pipeline']}, {data['device']})")
    ax.set_ylim(bottom=0)
    ax.legend()
    return _save(plt, fig, path)


def plot_sample_efficiency(data: dict, path: Path) -> Optional[Path]:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["alignprop"] + [n for n in data["curves"] if n.startswith("ddpo ")]
    for name in names:
        points = [p for p in data["curves"][name] if p["reward"] is not None]
        label = f"alignprop, lr={data['plan']['ours_lr']:g}" if name == "alignprop" else f"TRL DDPO, {name[5:]}"
        ax.plot([p["images"] for p in points], [p["reward"] for p in points], "o-" if name == "alignprop" else "s--",
                label=label)
    if data.get("ddpo_best_reward") is not None:
        ax.axhline(data["ddpo_best_reward"], color="gray", linewidth=0.8, linestyle=":", label="DDPO's best")
    ax.set_xlabel("images generated for training")
    ax.set_ylabel("eval reward (saturation, fixed seeds)")
    ax.set_title(f"Sample efficiency ({data['plan']['pipeline']}, {data['plan']['steps']} steps)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_limits(data: dict, path: Path) -> Optional[Path]:
    plt = _plt()
    rows = [r for r in data["rows"] if "ratio" in r]
    if plt is None or not rows:
        return None
    ks = data["plan"]["ks"]
    names = ks + [f"{k} {spec}" for spec in data["plan"].get("compare", []) for k in ks]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(rows) + 2), 4.5))
    width = 0.85 / len(names)
    for j, name in enumerate(names):
        medians = [r["ratio"][name]["median"] for r in rows]
        low = [m - r["ratio"][name]["min"] for m, r in zip(medians, rows)]
        high = [r["ratio"][name]["max"] - m for m, r in zip(medians, rows)]
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))], medians, width,
               yerr=[low, high], capsize=2, label=f"K={name} step / inference")
    ax.axhline(data["targets"]["k1_over_inference"], color="C0", linestyle="--", linewidth=0.8, label="K=1 goal 1.0")
    ax.axhline(data["targets"]["kall_over_inference"], color="C1", linestyle="--", linewidth=0.8,
               label="K=all goal 3.0")
    ax.set_xticks(range(len(rows)), [r["family"] for r in rows], fontsize=8)
    top = max(r["ratio"][name]["max"] for r in rows for name in names)
    ax.set_ylim(0, max(3.5, top) * 1.35)  # headroom for the legend
    ax.set_ylabel("training step / diffusers inference")
    ax.set_title(f"A training step against plain inference ({data['plan']['size']} px, {data['plan']['steps']} "
                 f"steps, batch {data['plan']['batch']})")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    return _save(plt, fig, path)


PLOTS = {"vs_trl": plot_vs_trl, "memory_vs_k": plot_memory_vs_k, "sample_efficiency": plot_sample_efficiency,
         "limits": plot_limits}


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ok(value, target) -> str:
    return "" if value is None else (" ✓" if value <= target else " ✗")


def _ratio_cell(case: dict, key: str, goal: float) -> str:
    """A time ratio against its goal, with the range of its rounds where there were several."""
    rounds = [ratio for ratio in case.get(f"{key}_rounds", []) if ratio is not None]
    spread = f" ({_f(min(rounds))}–{_f(max(rounds))})" if len(rounds) > 1 else ""
    return f"{_f(case.get(key))}{spread}{_ok(case.get(key), goal)}"


def summary_markdown(results: Path, suffix: str) -> str:
    """Markdown tables of the results with this suffix ("" full, "-quick", "-cuda")."""
    lines = []
    path = results / f"vs_trl{suffix}.json"
    if path.exists():
        data = json.loads(path.read_text())
        t = data["targets"]
        levers = data["plan"].get("ours_levers")
        rounds = data["plan"].get("rounds", 1)
        floor = any(c.get("kernel_floor") is not None for c in data["cases"])
        mem = "peak CUDA MiB" if data["device"] == "cuda" else "peak RSS MiB"
        lines += [f"**Step time and peak memory vs TRL 0.23.1 AlignPropTrainer** ({data['machine']['cpu'] or ''}"
                  f"{', ' + data['machine'].get('gpu', '') if data['device'] == 'cuda' else ''}, "
                  f"{data['machine']['cores']} cores; {data['plan']['steps']} DDIM steps, batch "
                  f"{data['plan']['batch']}, CFG 5, LoRA r=4; median of {data['plan']['epochs'] - 1} steps after "
                  "a warm-up" + (f"; each case in {rounds} rounds minutes apart, s/step their median, time ratio the "
                                 "median (range) of the rounds' paired ratios" if rounds > 1 else "") + ")", "",
                  f"| pipeline | reward | K | ours s/step | TRL s/step | time ratio (≤ {t['time_ratio']}) | "
                  f"ours {mem} | TRL {mem} | memory ratio (≤ {t['peak_ratio']}) |"
                  + (" levers on: s/step | time ratio | memory ratio |" if levers else "")
                  + (" attention + convolution kernels / TRL step |" if floor else ""),
                  "|---" * (9 + 3 * bool(levers) + floor) + "|"]
        for c in data["cases"]:
            o, r = c["ours"], c["trl"]
            row = (f"| {c['pipeline']} | {c['reward']} | {c['k']} | {_f(o.get('step_s'))} | "
                   f"{_f(r.get('step_s'))} | {_ratio_cell(c, 'time_ratio', t['time_ratio'])} | "
                   f"{_f(o.get('peak_mib'), 0)} | {_f(r.get('peak_mib'), 0)} | "
                   f"{_f(c['peak_ratio'])}{_ok(c['peak_ratio'], t['peak_ratio'])} |")
            if levers:
                row += (f" {_f(c.get('ours_levers', {}).get('step_s'))} | "
                        f"{_ratio_cell(c, 'time_ratio_levers', t['time_ratio'])} | {_f(c.get('peak_ratio_levers'))} |")
            if floor:
                row += f" {_f(c.get('kernel_floor'))} |"
            lines.append(row)
        if levers:
            lines.append(f"\nLevers on: `{levers}` (alignprop's opt-in speed settings), beside the same TRL run.")
        if floor:
            lines.append("The last column is the kernel floor: the self CPU seconds of alignprop's attention and "
                         "convolution kernels in one profiled step" + (" with the levers" if levers else "")
                         + ", over TRL's s/step: the time ratio if everything else took no time.")
        lines.append("")
    path = results / f"memory_vs_k{suffix}.json"
    if path.exists():
        data = json.loads(path.read_text())
        ks = data["plan"]["ks"]
        lines += [f"**Peak memory vs truncation depth K** ({data['plan']['pipeline']}, {data['plan']['steps']} steps, "
                  f"batch {data['plan']['batch']}; MiB)", "",
                  "| checkpointing | " + " | ".join(f"K={k}" for k in ks) + f" | K={ks[-1]} / K=1 |",
                  "|---|" + "---|" * (len(ks) + 1)]
        for ckpt in data["plan"]["ckpt"]:
            peaks = {r["k"]: r.get("peak_mib") for r in data["rows"] if r["ckpt"] == bool(ckpt)}
            key = f"k{ks[-1]}_over_k1_{'ckpt' if ckpt else 'no_ckpt'}"
            ratio = data.get(key)
            mark = _ok(ratio, data["targets"]["k50_over_k1"]) if ckpt else ""
            lines.append(f"| {'on' if ckpt else 'off'} | " + " | ".join(_f(peaks.get(k), 0) for k in ks)
                         + f" | {_f(ratio)}{mark} |")
        lines.append("")
    path = results / f"limits{suffix}.json"
    if path.exists():
        data = json.loads(path.read_text())
        plan, t = data["plan"], data["targets"]
        goals = {"1": t["k1_over_inference"], "all": t["kall_over_inference"]}
        lines += [f"**A training step / plain diffusers inference of the same batch** (tiny pipelines, {plan['size']} "
                  f"px, {plan['steps']} steps, batch {plan['batch']}, saturation reward; median (range) of "
                  f"{plan['repeats']} repeats, both measured in one process)", "",
                  "| family | inference s | " + " | ".join(f"K={k} step / inference" + (
                      f" (≤ {goals[k]})" if k in goals else "") for k in plan["ks"])
                  + "".join(f" | K={k}, {spec}" for spec in plan.get("compare", []) for k in plan["ks"]) + " |",
                  "|---|---|" + "---|" * len(plan["ks"]) * (1 + len(plan.get("compare", [])))]
        names = [(k, k) for k in plan["ks"]] + [(f"{k} {spec}", k) for spec in plan.get("compare", [])
                                                for k in plan["ks"]]
        for row in data["rows"]:
            if "ratio" not in row:
                lines.append(f"| {row['family']} | failed |" + " |" * len(names))
                continue
            cells = []
            for name, k in names:
                r = row["ratio"][name]
                cells.append(f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
                             + (_ok(r["median"], goals[k]) if k in goals else ""))
            inference = sorted(row["times_s"]["inference"])[len(row["times_s"]["inference"]) // 2]
            lines.append(f"| {row['family']} | {inference:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    path = results / f"sample_efficiency{suffix}.json"
    if path.exists():
        data = json.loads(path.read_text())
        lines += [f"**Sample efficiency vs TRL DDPOTrainer** ({data['plan']['pipeline']}, saturation reward, "
                  f"{data['plan']['steps']} steps; eval: {data['plan']['eval_samples']} fixed-seed samples)", "",
                  "| images | " + " | ".join(str(p["images"]) for p in data["curves"]["alignprop"]) + " |",
                  "|---|" + "---|" * len(data["curves"]["alignprop"]),
                  "| alignprop | " + " | ".join(_f(p["reward"], 4) for p in data["curves"]["alignprop"]) + " |", ""]
        for name, curve in data["curves"].items():
            if name.startswith("ddpo "):
                lines += ["| images | " + " | ".join(str(p["images"]) for p in curve) + " |",
                          "|---|" + "---|" * len(curve),
                          f"| DDPO, {name[5:]} | " + " | ".join(_f(p["reward"], 4) for p in curve) + " |", ""]
        if data.get("ddpo_best_reward") is not None:
            reached = data.get("alignprop_images_to_ddpo_best")
            base = data.get("eval_base")
            gain = "" if base is None else f" (base model {base:.4f}, a gain of {data['ddpo_best_reward'] - base:+.4f})"
            lines.append(f"DDPO's best eval reward {data['ddpo_best_reward']:.4f}{gain}, in its run "
                         f"'{data.get('ddpo_best_run', 'ddpo')}', took {data['ddpo_images_to_best']} "
                         f"images; alignprop reached it after "
                         + (f"{reached} images: **{data['sample_ratio']:.0f}× fewer**." if reached else
                            f"more than {data['plan']['ours_save_at'][-1]} images (not within its budget)."))
            lines.append("")
    return "\n".join(lines)


def write_summary(results: Path, suffix: str) -> Path:
    path = results / f"summary{suffix}.md"
    path.write_text(summary_markdown(results, suffix) + "\n")
    return path


def main() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") in PLOTS:  # not the single-script records (bench/limits.py --compare runs, ...)
            PLOTS[data["benchmark"]](data, path.with_suffix(".png"))
    for suffix in ("", "-quick", "-cuda", "-smoke"):
        if any(RESULTS.glob(f"*{suffix}.json")):
            print(write_summary(RESULTS, suffix))


if __name__ == "__main__":
    main()
