"""Image loggers (``folder``, ``tensorboard``, ``wandb``) and :class:`ImageLogSink`, the ``accelerate_logger`` that
image loggers and TRL-style image hooks receive.

Every logger is called as ``logger(image_data, global_step, accelerate_logger)`` with ``image_data`` =
``{images [B,3,H,W] in [0,1] (CPU), prompts, prompt_metadata, rewards [B], reward_components {name: [B]}}``.
tensorboard and wandb are optional dependencies, imported only when their logger (or tracker) is used.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from alignprop_core.errors import PluginError

#: optional package -> (import name, pip install argument)
OPTIONAL_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def require_package(name: str, purpose: str) -> None:
    """Raise a one-line :class:`PluginError` naming ``pip install ...`` when optional package ``name`` is missing."""
    module, pip_name = OPTIONAL_PACKAGES.get(name, (name, name))
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PluginError(f"{purpose} needs the '{pip_name}' package, which is not installed: pip install {pip_name} "
                          f"(or pip install 'alignprop-core[{name}]')")


def to_pil(image: torch.Tensor):
    """``[3, H, W]`` float in ``[0, 1]`` -> PIL image (rounded, like diffusers' ``numpy_to_pil``)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def as_pil_list(value: Any) -> list:
    """Whatever an image hook passes as one ``log_images`` value -> a list of RGB PIL images.

    Accepts a PIL image, a tensor or array (``[H,W]``, ``[3,H,W]``, ``[H,W,3]``, ``[N,3,H,W]``, ``[N,H,W,3]``; float
    in ``[0, 1]`` or uint8), or a list/tuple of those.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        return [value.convert("RGB")]
    if isinstance(value, (list, tuple)):
        return [image for item in value for image in as_pil_list(item)]
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise PluginError(f"log_images got a {type(value).__name__}; pass PIL images, tensors or arrays "
                          "([3,H,W] or [H,W,3], floats in [0, 1] or uint8), or lists of them")
    if value.ndim == 4:
        return [image for item in value for image in as_pil_list(item)]
    if value.ndim == 3 and value.shape[0] in (1, 3, 4) and value.shape[-1] not in (1, 3, 4):
        value = value.transpose(1, 2, 0)  # CHW -> HWC
    if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
    if value.ndim not in (2, 3):
        raise PluginError(f"log_images got an array of shape {list(value.shape)}; expected [3,H,W], [H,W,3] or [H,W]")
    if value.dtype != np.uint8:
        value = (np.clip(value.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(value).convert("RGB")]


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:limit] or "image"


class ImageLogSink:
    """The ``accelerate_logger`` handed to image loggers and image hooks.

    ``log_images({key: image or list of images}, step)`` accepts PIL images, tensors or arrays and converts them for
    each configured accelerate tracker (TensorBoard gets uint8 NHWC arrays, wandb and the others PIL images). When no
    configured tracker can take images (or none is configured, where TRL crashed on ``trackers[0]``), the images are
    saved as PNGs under ``fallback_dir/step-<N>/`` instead of being dropped; ``log(values, step)`` likewise appends
    to ``fallback_dir/log.jsonl``.
    """

    def __init__(self, accelerator: Any, fallback_dir: Optional[str | os.PathLike] = None):
        self.accelerator = accelerator
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self._noted = False

    @property
    def trackers(self) -> list:
        return list(getattr(self.accelerator, "trackers", []) or [])

    def get_tracker(self, name: str) -> Any:
        """The underlying object of the configured accelerate tracker ``name`` (a tensorboard ``SummaryWriter``, a
        wandb run, ...), or None when that tracker is not configured."""
        for tracker in self.trackers:
            if getattr(tracker, "name", None) == name:
                return tracker.tracker
        return None

    @property
    def tracker(self) -> Any:
        """The first tracker's underlying object, as on TRL's ``accelerate_logger`` (``trackers[0]``); None without
        trackers."""
        return self.trackers[0].tracker if self.trackers else None

    def __getattr__(self, name: str) -> Any:
        # Anything else a TRL-era hook used on ``trackers[0]`` (``writer``, ``run``, ``name``, ...).
        if name.startswith("__") or name in ("accelerator", "fallback_dir", "_noted"):
            raise AttributeError(name)
        trackers = self.trackers
        if trackers and hasattr(trackers[0], name):
            return getattr(trackers[0], name)
        raise AttributeError(f"accelerate_logger has no attribute '{name}'" + ("" if trackers else
                             " (no tracker is configured: set log_with, e.g. tensorboard or wandb)"))

    def log_images(self, values: dict[str, Any], step: Optional[int] = None, **kwargs: Any) -> None:
        images = {str(key): as_pil_list(value) for key, value in values.items()}
        logged = False
        for tracker in self.trackers:
            if getattr(tracker, "name", None) == "tensorboard":
                tracker.log_images(_tensorboard_batches(images), step=step, dataformats="NHWC", **kwargs)
                tracker.writer.flush()
                logged = True
            elif hasattr(tracker, "log_images"):
                tracker.log_images(images, step=step, **kwargs)
                logged = True
        if not logged:
            self._save_pngs(images, step)

    def log(self, values: dict[str, Any], step: Optional[int] = None, **kwargs: Any) -> None:
        if self.trackers:
            self.accelerator.log(values, step=step, **kwargs)
        elif self.fallback_dir is not None:
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            with open(self.fallback_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}, default=_json_default) + "\n")

    def _save_pngs(self, images: dict[str, list], step: Optional[int]) -> None:
        if self.fallback_dir is None:
            return
        folder = self.fallback_dir / (f"step-{step:06d}" if step is not None else "no-step")
        folder.mkdir(parents=True, exist_ok=True)
        number = 0
        with open(self.fallback_dir / "images.jsonl", "a", encoding="utf-8") as index:
            for key, pils in images.items():
                for i, pil in enumerate(pils):
                    file = folder / f"{number:03d}-{_slug(key)}{f'-{i}' if len(pils) > 1 else ''}.png"
                    pil.save(file)
                    index.write(json.dumps({"step": step, "key": key, "file": str(file.relative_to(
                        self.fallback_dir))}) + "\n")
                    number += 1
        if not self._noted:
            self._noted = True
            print(f"note: no configured tracker takes images (set log_with: tensorboard or wandb); log_images output "
                  f"is saved under {self.fallback_dir}", file=sys.stderr)


def _tensorboard_batches(images: dict[str, list]) -> dict[str, np.ndarray]:
    """TensorBoard's ``add_images`` needs one ``[N, H, W, 3]`` array per tag: stack equal-size images; a list of
    differently sized images becomes one tag per image (``key/0``, ``key/1``, ...)."""
    batches = {}
    for key, pils in images.items():
        if len({pil.size for pil in pils}) <= 1:
            batches[key] = np.stack([np.asarray(pil) for pil in pils]) if pils else np.zeros((0, 1, 1, 3), np.uint8)
        else:
            for i, pil in enumerate(pils):
                batches[f"{key}/{i}"] = np.asarray(pil)[None]
    return batches


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _scores(image_data: dict[str, Any], i: int) -> dict[str, float]:
    """The weighted total and each reward's score of sample ``i``."""
    scores = {"reward": float(image_data["rewards"][i])}
    for name, values in (image_data.get("reward_components") or {}).items():
        scores[name] = float(values[i])
    return scores


def _caption(prompt: str, scores: dict[str, float]) -> str:
    return prompt + " | " + ", ".join(f"{name}={value:.4g}" for name, value in scores.items())


# ---------------------------------------------------------------------- folder


class FolderLogger:
    """``folder``: PNGs per logged step, a JSONL of prompts and scores, and an HTML gallery.

    Writes ``<output_dir>/<subdir>/step-<N>/<i>.png``, appends one JSON line per image to ``samples.jsonl`` (step,
    file, prompt, metadata, reward, per-reward scores) and one per logged step to ``steps.jsonl`` (mean and std of
    every reward over the batch), and regenerates ``index.html`` on every call: a self-contained page (no scripts,
    no network) with the reward curve over the logged steps and every logged sample, newest step first, with its
    prompt and scores. ``refresh_seconds`` > 0 makes the page reload itself while a run is watched.
    """

    def __init__(self, output_dir: str, subdir: str = "images", title: Optional[str] = None,
                 refresh_seconds: int = 0):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / subdir
        self.title = title or f"alignprop samples: {self.output_dir.resolve().name}"
        self.refresh_seconds = int(refresh_seconds)

    def __call__(self, image_data: dict[str, Any], global_step: int, accelerate_logger: Any = None) -> None:
        step_dir = self.root / f"step-{global_step:06d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for i, image in enumerate(image_data["images"]):
            file = step_dir / f"{i:03d}.png"
            to_pil(image).save(file)
            scores = _scores(image_data, i)
            records.append({"step": global_step, "file": file.relative_to(self.root).as_posix(),
                            "prompt": image_data["prompts"][i], "metadata": image_data["prompt_metadata"][i],
                            "reward": scores.pop("reward"), "rewards": scores})
        with open(self.root / "samples.jsonl", "a", encoding="utf-8") as log:
            for record in records:
                log.write(json.dumps(record, default=_json_default) + "\n")
        stats = {"step": global_step, "num_images": len(records)}
        for name in ["reward", *records[0]["rewards"]] if records else []:
            values = torch.tensor([r["reward"] if name == "reward" else r["rewards"][name] for r in records])
            stats[f"{name}_mean"] = values.mean().item()
            stats[f"{name}_std"] = values.std().item() if len(values) > 1 else 0.0
        with open(self.root / "steps.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(stats) + "\n")
        self.write_gallery()

    def write_gallery(self) -> Path:
        """Regenerate ``index.html`` from ``samples.jsonl`` (only images that exist are shown); returns its path."""
        records = [r for r in _read_jsonl(self.root / "samples.jsonl") if (self.root / r["file"]).is_file()]
        page = gallery_html(records, self.title, refresh_seconds=self.refresh_seconds)
        target = self.root / "index.html"
        tmp = target.with_name(f".index.html.tmp-{os.getpid()}")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)  # a browser reload never sees half a page
        return target


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by an interrupted run
            continue
    return records


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{padding:16px 24px;background:#20242b;color:#eee}header h1{margin:0 0 4px;font-size:20px}
header p{margin:0;color:#bbb;font-size:13px}main{padding:8px 24px 40px}
h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h2 small{font-weight:normal;color:#666;margin-left:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;overflow:hidden}
figure img{width:100%;display:block;image-rendering:auto;background:#ccc}
figcaption{padding:6px 8px;font-size:12px}figcaption .prompt{font-weight:600;margin-bottom:4px;word-break:break-word}
table.scores{border-collapse:collapse;width:100%}table.scores td{padding:1px 0}
table.scores td.v{text-align:right;font-variant-numeric:tabular-nums}
nav{font-size:12px;margin:12px 0}nav a{margin-right:6px;color:#2a5db0}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;display:inline-block;margin-top:12px}
.legend span{margin-right:12px;font-size:12px}.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
"""

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def gallery_html(records: list[dict], title: str, refresh_seconds: int = 0) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts) showing ``records`` grouped by step, newest
    first: each image with its prompt and every score, plus a chart of each reward's batch mean over the steps."""
    esc = html.escape
    steps: dict[int, list[dict]] = {}
    for record in records:
        steps.setdefault(int(record["step"]), []).append(record)
    components = sorted({name for r in records for name in r.get("rewards", {})})
    # the weighted total is shown when it is not simply the one reward
    names = components if len(components) == 1 else ["reward"] + components
    means = {name: [(step, _mean([_score(r, name) for r in group])) for step, group in sorted(steps.items())]
             for name in names}
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            + (f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds > 0 else "")
            + f"<style>{_CSS}</style></head><body>")
    updated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    span = f"steps {min(steps)}–{max(steps)}" if steps else "no steps yet"
    parts = [head, f"<header><h1>{esc(title)}</h1><p>{len(records)} images from {len(steps)} logged steps "
             f"({span}); newest first; updated {updated}.</p></header><main>"]
    if len(steps) > 1:
        parts.append(_chart_svg(means))
    if steps:
        parts.append("<nav>steps: " + " ".join(f'<a href="#step-{s}">{s}</a>' for s in sorted(steps, reverse=True))
                     + "</nav>")
    for step in sorted(steps, reverse=True):
        group = steps[step]
        summary = " · ".join(f"{esc(name)} {_mean([_score(r, name) for r in group]):.4g}" for name in names
                             if any(_score(r, name) is not None for r in group))
        parts.append(f'<section id="step-{step}"><h2>step {step}<small>batch mean: {summary}</small></h2>'
                     '<div class="grid">')
        for record in group:
            rows = "".join(f'<tr><td>{esc(name)}</td><td class="v">{_score(record, name):.4f}</td></tr>'
                           for name in names if _score(record, name) is not None)
            src = esc(record["file"], quote=True)
            prompt = esc(str(record["prompt"]))
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{prompt}" loading="lazy"></a>'
                         f'<figcaption><div class="prompt">{prompt}</div><table class="scores">{rows}</table>'
                         "</figcaption></figure>")
        parts.append("</div></section>")
    if not steps:
        parts.append("<p>No samples logged yet.</p>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


def _score(record: dict, name: str) -> Optional[float]:
    return record.get("reward") if name == "reward" else record.get("rewards", {}).get(name)


def _mean(values: Iterable[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


def _chart_svg(series: dict[str, list[tuple[int, float]]], width: int = 560, height: int = 180) -> str:
    """Inline SVG line chart of each reward's batch mean per logged step (each line scaled to its own range, since
    rewards have different units; the legend gives first -> last values)."""
    pad, left, parts, legend = 24, 52, [], []  # left: room for the y labels
    steps = sorted({step for points in series.values() for step, _ in points})
    low_step, high_step = steps[0], steps[-1]
    for k, (name, points) in enumerate(series.items()):
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if not points:
            continue
        values = [v for _, v in points]
        low, high = min(values), max(values)
        color = _COLORS[k % len(_COLORS)]

        def xy(step: int, value: float) -> str:
            x = left + (width - left - pad) * (step - low_step) / max(high_step - low_step, 1)
            y = height - pad - (height - 2 * pad) * ((value - low) / (high - low) if high > low else 0.5)
            return f"{x:.1f},{y:.1f}"

        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                     + " ".join(xy(s, v) for s, v in points) + '"/>')
        legend.append(f'<span><i class="swatch" style="background:{color}"></i>{html.escape(name)}: '
                      f"{values[0]:.4g} → {values[-1]:.4g} (min {low:.4g}, max {high:.4g})</span>")
    if len(series) == 1:  # one line: its own range is the y axis
        values = [v for _, v in next(iter(series.values())) if math.isfinite(v)]
        if values:
            parts.append(f'<text x="{left - 6}" y="{pad + 4}" font-size="11" fill="#666" text-anchor="end">'
                         f'{max(values):.4g}</text><text x="{left - 6}" y="{height - pad}" font-size="11" '
                         f'fill="#666" text-anchor="end">{min(values):.4g}</text>')
    axis = (f'<line x1="{left}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
            f'<text x="{left}" y="{height - 6}" font-size="11" fill="#666">step {low_step}</text>'
            f'<text x="{width - pad}" y="{height - 6}" font-size="11" fill="#666" text-anchor="end">step '
            f"{high_step}</text>")
    return (f'<div class="chart"><svg width="{width}" height="{height}" role="img" aria-label="reward per step">'
            + axis + "".join(parts) + f'</svg><div class="legend">{"".join(legend)}</div></div>')


# ---------------------------------------------------------------------- tensorboard


class TensorBoardLogger:
    """``tensorboard``: each sample as an image (tag ``<tag>/<i>``), a text table of prompts and scores
    (``<tag>/captions``) and the batch mean of every reward (``<tag>/<name>_mean``), per logged step.

    Writes into the run of accelerate's TensorBoard tracker when ``log_with: tensorboard`` is set (one run in the
    TensorBoard UI), otherwise into its own ``log_dir`` (default ``<output_dir>/tensorboard``).
    """

    def __init__(self, output_dir: str, log_dir: Optional[str] = None, tag: str = "samples"):
        require_package("tensorboard", "image logger 'tensorboard'")
        self.log_dir = Path(log_dir) if log_dir else Path(output_dir) / "tensorboard"
        self.tag = tag
        self._own_writer = None

    def _writer(self, accelerate_logger: Any):
        shared = accelerate_logger.get_tracker("tensorboard") if isinstance(accelerate_logger, ImageLogSink) else None
        if shared is not None:
            return shared
        if self._own_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._own_writer = SummaryWriter(str(self.log_dir))
        return self._own_writer

    def __call__(self, image_data: dict[str, Any], global_step: int, accelerate_logger: Any = None) -> None:
        writer = self._writer(accelerate_logger)
        lines = ["| # | prompt | " + " | ".join(_scores(image_data, 0)) + " |",
                 "|---|---|" + "---|" * len(_scores(image_data, 0))] if len(image_data["images"]) else []
        for i, image in enumerate(image_data["images"]):
            writer.add_image(f"{self.tag}/{i}", image.detach().float().clamp(0, 1).cpu(), global_step,
                             dataformats="CHW")
            scores = _scores(image_data, i)
            prompt = str(image_data["prompts"][i]).replace("|", "\\|")
            lines.append(f"| {i} | {prompt} | " + " | ".join(f"{v:.4f}" for v in scores.values()) + " |")
        if lines:
            writer.add_text(f"{self.tag}/captions", "\n".join(lines), global_step)
        for name, values in {"reward": image_data["rewards"], **(image_data.get("reward_components") or {})}.items():
            writer.add_scalar(f"{self.tag}/{name}_mean", float(torch.as_tensor(values).float().mean()), global_step)
        writer.flush()

    def close(self) -> None:
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None


# ---------------------------------------------------------------------- wandb


class WandbLogger:
    """``wandb``: the samples as a list of ``wandb.Image`` with prompt and scores as captions (key ``<tag>``) and a
    ``wandb.Table`` of step, image, prompt and every score (key ``<tag>_table``), per logged step.

    Logs into the run of accelerate's wandb tracker when ``log_with: wandb`` is set, otherwise starts its own run
    (``project``, ``name``, ``mode``, ``dir`` default ``$WANDB_DIR`` or ``output_dir``, any other ``wandb.init``
    keyword in ``init_kwargs``). ``mode: offline`` (or ``WANDB_MODE=offline``) needs no network or account.
    """

    def __init__(self, output_dir: str, project: str = "alignprop", name: Optional[str] = None,
                 mode: Optional[str] = None, dir: Optional[str] = None, tag: str = "samples", table: bool = True,
                 init_kwargs: Optional[dict[str, Any]] = None):
        require_package("wandb", "image logger 'wandb'")
        self.init_kwargs = {"project": project, "name": name, "mode": mode,
                            "dir": str(dir or os.environ.get("WANDB_DIR") or output_dir), **(init_kwargs or {})}
        self.tag, self.table = tag, table
        self._own_run = None

    def _run(self, accelerate_logger: Any):
        shared = accelerate_logger.get_tracker("wandb") if isinstance(accelerate_logger, ImageLogSink) else None
        if shared is not None:
            return shared
        if self._own_run is None:
            import wandb

            Path(self.init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            self._own_run = wandb.init(**{k: v for k, v in self.init_kwargs.items() if v is not None})
        return self._own_run

    def __call__(self, image_data: dict[str, Any], global_step: int, accelerate_logger: Any = None) -> None:
        import wandb

        run = self._run(accelerate_logger)
        images, rows = [], []
        for i, image in enumerate(image_data["images"]):
            scores = _scores(image_data, i)
            prompt = str(image_data["prompts"][i])
            wandb_image = wandb.Image(to_pil(image), caption=_caption(prompt, scores))
            images.append(wandb_image)
            rows.append([global_step, wandb_image, prompt, *scores.values()])
        values: dict[str, Any] = {self.tag: images}
        if self.table and rows:
            values[f"{self.tag}_table"] = wandb.Table(columns=["step", "image", "prompt", *_scores(image_data, 0)],
                                                      data=rows)
        run.log(values, step=global_step)

    def close(self) -> None:
        if self._own_run is not None:
            self._own_run.finish()
            self._own_run = None
