"""``alignprop eval --lora DIR --lora_scales 0,0.25,0.5,0.75,1``: one LoRA at several strengths.

Reward hacking sets in gradually, so a weaker LoRA is often the better model: this scores the LoRA at each scale
``s`` (``pipe.set_adapters(..., adapter_weights=[s])``: the LoRA's update times ``s``; 0 is the base model exactly)
on the same fixed samples and noise, with every training reward, every held-out reward (``eval_rewards``),
diversity and the image statistics (:mod:`alignprop_core.monitoring`), so that the table shows where the training
rewards still rise while the held-out ones and diversity have not yet fallen. Writes ``lora_scales.json``,
``lora_scales.csv`` and ``lora_scales.html`` (one chart per measure against the scale).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from typing import Any, Callable, Optional, Sequence

from alignprop_core import evaluate as ev
from alignprop_core.charts import chart_svg
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import ConfigError
from alignprop_core.monitoring import EvalMeasures
from alignprop_core.pipelines import resolve_model_path
from alignprop_core.reward_set import RewardSet

__all__ = ["parse_lora_scales", "run_lora_scales"]

FILES = ("lora_scales.json", "lora_scales.csv", "lora_scales.html")


def parse_lora_scales(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``: finite numbers, comma-separated, no repeats; one-line errors."""
    items = [item.strip() for item in str(text).split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f"--lora_scales: got {text!r}, allowed: comma-separated numbers such as 0,0.25,0.5,0.75,1")
    scales = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--lora_scales: {item!r} is not a number; give e.g. 0,0.25,0.5,0.75,1") from None
        if not math.isfinite(value):
            raise ConfigError(f"--lora_scales: got {item}, allowed: finite numbers (0 = the base model, 1 = the LoRA)")
        if value in scales:
            raise ConfigError(f"--lora_scales: {item} is given twice; list each scale once")
        scales.append(value)
    return scales


def run_lora_scales(config: AlignPropConfig, lora: str | os.PathLike, scales: Sequence[float], *,
                    out_dir: str | os.PathLike, prompts_file: Optional[str | os.PathLike] = None,
                    batch_size: Optional[int] = None, print_fn: Callable[[str], Any] = print,
                    overwrite: bool = False) -> list[dict[str, Any]]:
    """Score ``lora`` at each of ``scales``; returns one row per scale (``{"lora_scale", <measure>: mean}``)."""
    ev.check_batch_size(batch_size)
    ev.check_not_used(out_dir, list(FILES), overwrite)
    lora_dir = ev.check_lora_dir(lora)
    ev.check_reward_names(config)
    samples = ev.eval_samples(config, prompts_file)
    resolve_model_path(config.pretrained_model)

    device = ev.inference_device()
    measures = EvalMeasures(config, RewardSet.from_specs(config.rewards, device), device)
    pipe, dtype = ev.load_inference_pipeline(config)
    height, width = ev.image_size(config, pipe)
    rows = []
    for scale in scales:
        with ev.lora_loaded(pipe, lora_dir, scale):
            scored = ev.sample_and_score(pipe, samples, config, measures.score, height=height, width=width,
                                         device=device, batch_size=batch_size or config.train_batch_size,
                                         autocast=lambda: ev.autocast_for(device, dtype), keep_images=True)
        row = {"lora_scale": scale, **scored.means(), **measures.image_measures(scored.images, samples.prompts)}
        rows.append(row)
        print_fn(f"scale {scale:g}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "lora_scale"))

    out = ev.writable_dir(out_dir)  # created only now: a failure above leaves nothing behind
    held_out = [r.name for r in config.eval_rewards]
    document = {"lora": str(lora_dir), "pretrained_model": config.pretrained_model,
                "rewards": [r.name for r in config.rewards], "eval_rewards": held_out,
                "samples": len(samples), "eval_seed": config.eval_seed, "rows": rows}
    (out / FILES[0]).write_text(json.dumps(document, indent=1, allow_nan=True), encoding="utf-8")
    with open(out / FILES[1], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / FILES[2]).write_text(_page(rows, str(lora_dir), held_out), encoding="utf-8")
    print_fn("")
    print_fn(_table(rows))
    print_fn(f"\nwrote {', '.join(str(out / name) for name in FILES)}")
    return rows


def _page(rows: list[dict[str, Any]], lora: str, held_out: list[str]) -> str:
    """One chart per measure against the LoRA scale."""
    charts = []
    for k, name in enumerate(key for key in rows[0] if key != "lora_scale"):
        title = f"{name} (held-out)" if name in held_out else name
        charts.append(chart_svg(title, [(row["lora_scale"], row[name]) for row in rows], k, x_label="LoRA scale"))
    return ("<!doctype html><meta charset=utf-8><title>LoRA scales</title>"
            "<style>body{font:14px sans-serif;margin:2em}.charts{display:flex;flex-wrap:wrap;gap:1em}"
            "figure{margin:0}figcaption{font-size:12px}</style>"
            f"<h1>LoRA scales</h1><p>{html.escape(lora)}: every measure on the same samples and noise at each "
            f"scale (0 = the base model)</p><div class=charts>{''.join(charts)}</div>")



def _table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: a row per scale, a column per measure."""
    names = list(rows[0])
    cells = [[f"{row[n]:g}" if n == "lora_scale" else f"{row[n]:.4f}" for n in names] for row in rows]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)
