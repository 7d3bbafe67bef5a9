"""The folder gallery's SVG charts: one small line chart per training series, on round ticks.

Plain data in, markup out: ``(step, value)`` points and ``metrics.jsonl`` rows (no files are read here).
"""

from __future__ import annotations

import html
import math
from typing import Optional

from alignprop_core.checkpoints import finite

#: training metrics charted after the rewards: (metrics.jsonl key, chart title)
_METRIC_CHARTS = (("loss", "loss"), ("kl", "KL to the base model"), ("grad_norm", "grad norm (before clipping)"),
                  ("k", "K (backprop steps)"), ("step_time", "step time (s)"))


def metric_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{chart title: [(step, value), ...]}`` from training rows: the weighted reward (when it is not simply the
    one reward), each reward, loss, grad norm, K and step time; null and non-finite values are left out."""

    def points(key: str) -> list[tuple[int, float]]:
        return [(int(row["step"]), value) for row in rows if (value := finite(row.get(key))) is not None]

    components = list(dict.fromkeys(key[len("reward/"):-len("_mean")] for row in rows for key in row
                                    if key.startswith("reward/") and key.endswith("_mean")))
    series = {} if len(components) == 1 else {"reward (weighted)" if components else "reward": points("reward_mean")}
    series.update({name: points(f"reward/{name}_mean") for name in components})
    series.update({title: points(key) for key, title in _METRIC_CHARTS})
    return {title: values for title, values in series.items() if values}


def eval_series(evals: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{"eval: <measure>": [(step, value), ...]}`` from metrics.jsonl eval rows (every round: before, each
    ``eval_freq`` step, after): the training and held-out rewards and diversity, so hacking shows as the training
    reward rising while the others fall; a resumed run's repeated round counts once."""
    rounds = {(int(row["step"]), str(row.get("eval"))): row for row in evals}
    ordered = [rounds[key] for key in sorted(rounds, key=lambda k: (k[0], k[1] != "before"))]
    keys = list(dict.fromkeys(key for row in ordered for key in row
                              if key.startswith("eval/") and (key.endswith("_mean") or "/diversity" in key)))
    series = {}
    for key in keys:
        name = key[len("eval/"):].removesuffix("_mean")
        points = [(int(row["step"]), value) for row in ordered if (value := finite(row.get(key))) is not None]
        if len(points) > 1:
            series[f"eval: {'weighted reward' if name == 'reward' else name.replace('_', ' ')}"] = points
    return series


_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def charts_html(series: dict[str, list[tuple[int, Optional[float]]]], note: str) -> str:
    """The "training curves" section: one chart per series (each its own colour), or "" when none has a value."""
    charts = [_chart_svg(name, points, _COLORS[k % len(_COLORS)]) for k, (name, points) in enumerate(series.items())]
    charts = [chart for chart in charts if chart]
    if not charts:
        return ""
    return (f'<section id="charts"><h2>training curves<small>{html.escape(note)}</small></h2>'
            f'<div class="charts">{"".join(charts)}</div></section>')


def nice_ticks(low: float, high: float, count: int = 4, integer: bool = False) -> list[float]:
    """Round tick values 1, 2 or 5 × 10^k apart, from at or below ``low`` to at or above ``high`` (about ``count``
    intervals); a flat range is widened first so it still gets several ticks."""
    if high - low <= 1e-12 * max(1.0, abs(low), abs(high)):
        pad = 1.0 if integer else (abs(high) * 0.05 or 0.5)
        low, high = low - pad, high + pad
    raw = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    if integer:
        step = max(1.0, round(step))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels with just enough digits to tell neighbouring ticks apart (scientific for very small or large)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    big = max(abs(t) for t in ticks)
    if big >= 1e6 or big < 1e-3:
        digits = max(0, math.floor(math.log10(big)) - math.floor(math.log10(step) + 1e-9)) if big else 0
        return ["0" if t == 0 else f"{t:.{digits}e}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{round(t, decimals) + 0.0:.{decimals}f}" for t in ticks]  # + 0.0 turns -0.0 into 0.0


def _thin(points: list[tuple[int, float]], limit: int = 600) -> list[tuple[int, float]]:
    """At most about ``limit`` points: each bucket of consecutive points keeps its lowest and highest (in step
    order), so spikes stay visible on long runs."""
    if len(points) <= limit:
        return points
    size = math.ceil(2 * len(points) / limit)
    kept = []
    for start in range(0, len(points), size):
        bucket = points[start:start + size]
        low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        kept += sorted({low, high})
    return kept


def chart_svg(name: str, points: list[tuple[float, Optional[float]]], color_index: int = 0,
              x_label: str = "LoRA scale") -> str:
    """One small line chart of ``(x, value)`` points against a real-valued x (``x_label``): as the training curves,
    for other sweeps (``alignprop eval --lora_scales``)."""
    return _chart_svg(name, points, _COLORS[color_index % len(_COLORS)], x_label=x_label)


def _chart_svg(name: str, points: list[tuple[float, Optional[float]]], color: str = _COLORS[0], width: int = 320,
               height: int = 170, x_label: str = "step") -> str:
    """One small line chart (a ``<figure>`` with inline SVG) of ``(step, value)`` points on its own labelled y axis
    (one chart per series: rewards of different scales never share an axis) and step ticks on the x axis. Null and
    non-finite values are skipped; no finite value gives ""."""
    esc = html.escape
    steps = x_label == "step"
    points = [(int(s) if steps else float(s), v) for s, v in points if v is not None and math.isfinite(v)]
    if not points:
        return ""
    values = [v for _, v in points]
    first, last, low, high = values[0], values[-1], min(values), max(values)
    points = _thin(points)
    left, right, top, bottom = 52, 16, 8, 24  # margins in SVG units: room for the tick labels
    y_ticks = nice_ticks(low, high)
    x_ticks = nice_ticks(points[0][0], points[-1][0], integer=steps)
    # min/max: a tick may sit a rounding error inside the data
    y0, y1, x0, x1 = min(y_ticks[0], low), max(y_ticks[-1], high), x_ticks[0], x_ticks[-1]

    def x(step: float) -> float:
        return left + (width - left - right) * (step - x0) / (x1 - x0)

    def y(value: float) -> float:
        return top + (height - top - bottom) * (y1 - value) / (y1 - y0)

    grid = "".join(f'<line x1="{left}" x2="{width - right}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>' for t in y_ticks)
    y_axis = "".join(f'<text x="{left - 5}" y="{y(t) + 3.5:.1f}">{label}</text>'
                     for t, label in zip(y_ticks, tick_labels(y_ticks)))
    x_names = [str(int(t)) for t in x_ticks] if steps else tick_labels(x_ticks)
    x_axis = "".join(f'<text x="{x(t):.1f}" y="{height - 7}">{label}</text>' for t, label in zip(x_ticks, x_names))
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    label = esc(x_label, quote=True)
    dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2"><title>{label} {s:g}: {v:.6g}</title></circle>'
                   for s, v in points) if len(points) <= 40 else ""
    end = f'<circle cx="{x(points[-1][0]):.1f}" cy="{y(points[-1][1]):.1f}" r="3"/>'
    svg = (f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(name, quote=True)} per {label}">'
           f'<g class="grid" stroke="#e6e6e6">{grid}</g>'
           f'<g class="axes" stroke="#999"><line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}"/>'
           f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}"/></g>'
           f'<g class="y-axis" font-size="10" fill="#555" text-anchor="end">{y_axis}</g>'
           f'<g class="x-axis" font-size="10" fill="#555" text-anchor="middle">{x_axis}</g>'
           f'<g class="series" fill="{color}"><polyline fill="none" stroke="{color}" stroke-width="1.8" '
           f'stroke-linejoin="round" points="{line}"/>{dots}{end}</g></svg>')
    return (f'<figure class="chart"><figcaption><b>{esc(name)}</b><span class="last">{last:.4g}</span> '
            f"<small>first {first:.4g} · min {low:.4g} · max {high:.4g} · x: {esc(x_label)}</small></figcaption>{svg}"
            "</figure>")
