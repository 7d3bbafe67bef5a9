"""Image loggers (``folder``, ``tensorboard``, ``wandb``) and :class:`ImageLogSink`, the ``accelerate_logger`` that
image loggers and TRL-style image hooks receive.

Every logger is called as ``logger(image_data, global_step, accelerate_logger)`` with ``image_data`` =
``{images [B,3,H,W] in [0,1] (CPU), prompts, prompt_metadata, rewards [B], reward_components {name: [B]}}`` and
optionally ``fixed: {images [N,3,H,W], prompts, seeds}`` (the same prompts and noise rendered at every logged step).
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

from alignprop_core import options
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


def _check_folder(owner: str, option: str, folder: Path) -> None:
    """A folder an image logger will write into must be creatable: checked when the logger is built, before any
    training, so a bad option never fails mid-run."""
    from alignprop_core.checkpoints import writable_problem

    problem = writable_problem(folder)
    if problem:
        raise PluginError(f"{owner}: cannot write to '{folder}' ({problem}); set the '{option}' option to a writable "
                          "folder")


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

#: Files the trainer writes next to the logger's folder (``trainer.METRICS_NAME``; named here, not imported, because
#: the trainer imports this module).
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "alignprop_config.yaml"


class FolderLogger:
    """``folder``: PNGs per logged step, a JSONL of prompts and scores, and an HTML gallery.

    Writes ``<output_dir>/<subdir>/step-<N>/<i>.png``, appends one JSON line per image to ``samples.jsonl`` (step,
    file, prompt, metadata, reward, per-reward scores) and one per logged step to ``steps.jsonl`` (mean and std of
    every reward over the batch). When ``image_data`` holds ``fixed`` (the same prompts and noise rendered at every
    logged step), those go to ``fixed/step-<N>-<i>.png`` and ``fixed.jsonl``. ``index.html`` is regenerated on every
    call and at ``close()``: a self-contained page (no scripts, no network) with the run config, the fixed-seed eval
    before/after, one chart per training metric (from ``<output_dir>/metrics.jsonl``), the fixed-prompt strip and
    every logged sample, newest step first. ``refresh_seconds`` > 0 makes the page reload itself while a run is
    watched.
    """

    def __init__(self, output_dir: str, subdir: str = "images", title: Optional[str] = None,
                 refresh_seconds: int = 0):
        owner = "image logger 'folder'"
        self.output_dir = Path(output_dir)
        subdir = options.string(owner, "subdir", subdir, allowed="a folder name inside output_dir")
        if Path(subdir).is_absolute() or ".." in Path(subdir).parts:
            raise options.invalid(owner, "subdir", subdir, "a folder name inside output_dir (relative, no '..')")
        self.root = self.output_dir / subdir
        _check_folder(owner, "subdir", self.root)
        self.title = options.string(owner, "title", title, optional=True) or \
            f"alignprop samples: {self.output_dir.resolve().name}"
        self.refresh_seconds = options.number(owner, "refresh_seconds", refresh_seconds, integer=True, minimum=0)
        self._logged = False

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
        if image_data.get("fixed"):
            self._save_fixed(image_data["fixed"], global_step)
        self._logged = True
        self.write_gallery()

    def _save_fixed(self, fixed: dict[str, Any], step: int) -> None:
        """Save this step's fixed-prompt images as ``fixed/step-<N>-<i>.png``, one line each in ``fixed.jsonl``."""
        folder = self.root / "fixed"
        folder.mkdir(parents=True, exist_ok=True)
        prompts, seeds = list(fixed.get("prompts") or []), list(fixed.get("seeds") or [])
        lines = []
        for i, image in enumerate(fixed["images"]):
            file = folder / f"step-{step:06d}-{i}.png"
            to_pil(image).save(file)
            lines.append({"step": step, "index": i, "file": file.relative_to(self.root).as_posix(),
                          "prompt": str(prompts[i]) if i < len(prompts) else "",
                          "seed": int(seeds[i]) if i < len(seeds) else None})
        with open(self.root / "fixed.jsonl", "a", encoding="utf-8") as log:
            log.writelines(json.dumps(line) + "\n" for line in lines)

    def write_gallery(self) -> Path:
        """Regenerate ``index.html`` from ``samples.jsonl``, ``fixed.jsonl`` (only images that exist are shown), the
        run's ``metrics.jsonl`` and ``alignprop_config.yaml`` (each optional); returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        records = self._existing(_read_jsonl(self.root / "samples.jsonl"))
        fixed = self._existing(_read_jsonl(self.root / "fixed.jsonl"))
        metrics, evals = read_metrics(self.output_dir / METRICS_FILE)
        config_file = self.output_dir / CONFIG_FILE
        config_text = config_file.read_text(encoding="utf-8", errors="replace") if config_file.is_file() else None
        page = gallery_html(records, self.title, refresh_seconds=self.refresh_seconds, metrics=metrics, evals=evals,
                            fixed=fixed, config_text=config_text)
        target = self.root / "index.html"
        tmp = target.with_name(f".index.html.tmp-{os.getpid()}")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)  # a browser reload never sees half a page
        return target

    def close(self) -> None:
        """Rebuild the gallery once more: the trainer appends the last step's metrics and the "after" eval only
        after the last image-logging call. Only a logger that logged (on the main process) writes."""
        if self._logged:
            self.write_gallery()

    def _existing(self, records: list[dict]) -> list[dict]:
        return [r for r in records if isinstance(r.get("file"), str) and (self.root / r["file"]).is_file()]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)  # also takes the NaN that older runs wrote
        except ValueError:  # a line cut short by an interrupted run
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _finite(value: Any) -> Optional[float]:
    """A finite number as float, else None (null, NaN, inf, strings, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """The training rows of a ``metrics.jsonl`` sorted by step (one per step: a resumed run redoes the steps after
    its checkpoint, and the row written last wins) and its eval rows (``"eval": "before" | "after"``), in file
    order. Rows without a numeric ``step`` are dropped; a missing file gives ``([], [])``."""
    train: dict[int, dict] = {}
    evals: list[dict] = []
    for row in _read_jsonl(path):
        if _finite(row.get("step")) is None:
            continue
        if "eval" in row:
            evals.append(row)
        else:
            train[int(row["step"])] = row
    return [train[step] for step in sorted(train)], evals


#: training metrics charted after the rewards: (metrics.jsonl key, chart title)
_METRIC_CHARTS = (("loss", "loss"), ("grad_norm", "grad norm (before clipping)"), ("k", "K (backprop steps)"),
                  ("step_time", "step time (s)"))


def metric_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{chart title: [(step, value), ...]}`` from training rows: the weighted reward (when it is not simply the
    one reward), each reward, loss, grad norm, K and step time; null and non-finite values are left out."""

    def points(key: str) -> list[tuple[int, float]]:
        return [(int(row["step"]), value) for row in rows if (value := _finite(row.get(key))) is not None]

    components = list(dict.fromkeys(key[len("reward/"):-len("_mean")] for row in rows for key in row
                                    if key.startswith("reward/") and key.endswith("_mean")))
    series = {} if len(components) == 1 else {"reward (weighted)" if components else "reward": points("reward_mean")}
    series.update({name: points(f"reward/{name}_mean") for name in components})
    series.update({title: points(key) for key, title in _METRIC_CHARTS})
    return {title: values for title, values in series.items() if values}


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{padding:16px 24px;background:#20242b;color:#eee}header h1{margin:0 0 4px;font-size:20px;word-break:break-word}
header p{margin:0;color:#bbb;font-size:13px}main{padding:8px 24px 40px;max-width:1600px}
h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h2 small{font-weight:normal;color:#666;margin-left:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;overflow:hidden}
figure img{width:100%;display:block;image-rendering:auto;background:#ccc}
figcaption{padding:6px 8px;font-size:12px}figcaption .prompt{font-weight:600;margin-bottom:4px;word-break:break-word}
table.scores{border-collapse:collapse;width:100%}table.scores td{padding:1px 0}
table.scores td.v{text-align:right;font-variant-numeric:tabular-nums}
nav{font-size:12px;margin:12px 0;line-height:1.8}nav a{margin-right:6px;color:#2a5db0}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{flex:1 1 260px;max-width:420px;padding:4px 6px}.chart svg{display:block;width:100%;height:auto}
.chart figcaption{padding:2px 2px 4px}.chart .last{font-variant-numeric:tabular-nums;margin-left:6px}
.chart small{color:#666}
details{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px;margin-top:12px}
summary{cursor:pointer;font-size:13px;word-break:break-word}
pre{overflow-x:auto;max-width:100%;font-size:12px;margin:8px 0 2px}
.wide{overflow-x:auto;max-width:100%}
table.eval{border-collapse:collapse;background:#fff;font-size:13px}
table.eval th,table.eval td{border:1px solid #ddd;padding:4px 10px;text-align:right;font-variant-numeric:tabular-nums}
table.eval th:first-child,table.eval td:first-child{text-align:left}
.up{color:#1a7f37}.down{color:#c62828}
.fixed-row{margin-bottom:12px}.fixed-row .prompt{font-size:13px;font-weight:600;margin:4px 0;word-break:break-word}
.fixed-row small{font-weight:normal;color:#666}
.strip{display:flex;flex-wrap:wrap;gap:6px}.strip figure{width:112px;max-width:30%}
.strip figcaption{padding:2px 4px;text-align:center;font-variant-numeric:tabular-nums}
@media (max-width:560px){header,main{padding-left:10px;padding-right:10px}
.grid{grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:8px}}
"""

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def gallery_html(records: list[dict], title: str, refresh_seconds: int = 0, *, metrics: Optional[list[dict]] = None,
                 evals: Optional[list[dict]] = None, fixed: Optional[list[dict]] = None,
                 config_text: Optional[str] = None) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts): the run config (collapsed), the eval
    before/after table, one chart per series (training ``metrics`` rows; without them each reward's batch mean over
    the logged ``records``), the ``fixed``-prompt strip across steps, then ``records`` grouped by step, newest first,
    each image with its prompt and every score. Each part is left out when its data is absent."""
    esc = html.escape
    steps: dict[int, list[dict]] = {}
    for record in records:
        steps.setdefault(int(record["step"]), []).append(record)
    components = sorted({name for r in records for name in r.get("rewards", {})})
    # the weighted total is shown when it is not simply the one reward
    names = components if len(components) == 1 else ["reward"] + components
    series = metric_series(metrics or [])
    chart_note = "per training step, from metrics.jsonl"
    if not series and len(steps) > 1:  # an older run or a logger used on its own: the logged batches' means
        series = {name: [(step, _mean([_score(r, name) for r in group])) for step, group in sorted(steps.items())]
                  for name in names}
        chart_note = "batch mean of the logged samples (no metrics.jsonl)"
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            + (f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds > 0 else "")
            + f"<style>{_CSS}</style></head><body>")
    updated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    span = f"steps {min(steps)}–{max(steps)}" if steps else "no steps yet"
    parts = [head, f"<header><h1>{esc(title)}</h1><p>{len(records)} images from {len(steps)} logged steps "
             f"({span}); newest first; updated {updated}.</p></header><main>"]
    sections = [("config", "config", _config_html(config_text)), ("eval", "eval", _eval_table_html(evals or [])),
                ("charts", "charts", _charts_html(series, chart_note)),
                ("fixed", "fixed prompts", _fixed_strip_html(fixed or []))]
    sections = [s for s in sections if s[2]]
    if sections and steps:
        parts.append("<nav>" + " · ".join(f'<a href="#{anchor}">{label}</a>' for anchor, label, _ in sections)
                     + ' · <a href="#samples">samples</a></nav>')
    parts += [body for _, _, body in sections]
    parts.append('<div id="samples"></div>')
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


def _config_html(text: Optional[str]) -> str:
    """The run's config YAML, collapsed, under a one-line summary of the fields that identify a run."""
    if not text:
        return ""
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        config = None
    facts = []
    if isinstance(config, dict):
        rewards = config.get("rewards")
        if isinstance(rewards, list):
            facts.append("rewards " + ", ".join(f"{r.get('name')}×{r.get('weight', 1)}" if isinstance(r, dict)
                                                else str(r) for r in rewards))
        labels = (("pretrained_model", "model"), ("num_epochs", "steps"), ("train_batch_size", "batch"),
                  ("train_learning_rate", "lr"), ("truncation", "truncation"), ("lora_rank", "LoRA rank"),
                  ("seed", "seed"))
        facts += [f"{label} {config[key]}" for key, label in labels if config.get(key) is not None]
    summary = " · ".join(html.escape(str(fact)) for fact in facts) or CONFIG_FILE
    return (f'<section id="config"><details><summary><b>run config</b> {summary}</summary>'
            f"<pre>{html.escape(text)}</pre></details></section>")


def _eval_table_html(evals: list[dict]) -> str:
    """The fixed-seed eval rows as a table: a row per reward, a column per eval (``before``/``after`` at their
    steps) and the change from the first to the last."""
    columns: dict[tuple[int, str], dict] = {}
    for row in evals:  # a rerun of the same eval (a resumed run) replaces the earlier one
        columns[(int(row["step"]), str(row.get("eval")))] = row
    if not columns:
        return ""
    ordered = [columns[key] for key in sorted(columns, key=lambda k: (k[0], k[1] != "before"))]
    names = list(dict.fromkeys(key[len("eval/"):-len("_mean")] for row in ordered for key in row
                               if key.startswith("eval/") and key.endswith("_mean")))
    components = [n for n in names if n != "reward"]
    # the weighted total only when it is not simply the one reward (as on the eval page)
    shown = components + (["reward"] if "reward" in names and len(components) != 1 else [])
    if not shown:
        return ""
    head = "".join(f'<th>{html.escape(str(r.get("eval")))}<br><small>step {int(r["step"])}</small></th>'
                   for r in ordered) + ("<th>change</th>" if len(ordered) > 1 else "")
    body = []
    for name in shown:
        values = [_finite(r.get(f"eval/{name}_mean")) for r in ordered]
        cells = []
        for row, value in zip(ordered, values):
            std = _finite(row.get(f"eval/{name}_std"))
            cells.append("<td>" + ("–" if value is None else f"{value:.4f}")
                         + (f" <small>± {std:.4f}</small>" if std is not None else "") + "</td>")
        if len(ordered) > 1:
            first, last = values[0], values[-1]
            if first is None or last is None:
                cells.append("<td>–</td>")
            else:
                change = last - first
                cells.append(f'<td class="{"up" if change > 0 else "down" if change < 0 else ""}">{change:+.4f}</td>')
        label = "weighted total" if name == "reward" and components else name
        body.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return (f'<section id="eval"><h2>fixed-seed eval<small>the same prompts and noise each time</small></h2>'
            f'<div class="wide"><table class="eval"><thead><tr><th>reward</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div></section>")


def _charts_html(series: dict[str, list[tuple[int, Optional[float]]]], note: str) -> str:
    charts = [_chart_svg(name, points, _COLORS[k % len(_COLORS)]) for k, (name, points) in enumerate(series.items())]
    charts = [chart for chart in charts if chart]
    if not charts:
        return ""
    return (f'<section id="charts"><h2>training curves<small>{html.escape(note)}</small></h2>'
            f'<div class="charts">{"".join(charts)}</div></section>')


def _fixed_strip_html(fixed: list[dict]) -> str:
    """One row per fixed prompt: its image at every logged step, oldest first, so progress reads left to right."""
    rows: dict[tuple, dict[int, dict]] = {}
    for record in fixed:  # a step logged twice (a resumed run) shows its newest image
        key = (record.get("index"), record.get("prompt"), record.get("seed"))
        rows.setdefault(key, {})[int(record["step"])] = record
    if not rows:
        return ""
    parts = ['<section id="fixed"><h2>fixed prompts across steps<small>the same prompt and noise at every logged '
             "step, oldest first</small></h2>"]
    for (_, prompt, seed), by_step in rows.items():
        seed_note = f" <small>seed {seed}</small>" if seed is not None else ""
        parts.append(f'<div class="fixed-row"><div class="prompt">{html.escape(str(prompt))}{seed_note}</div>'
                     '<div class="strip">')
        for step in sorted(by_step):
            src = html.escape(by_step[step]["file"], quote=True)
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="step {step}" loading="lazy"></a>'
                         f"<figcaption>step {step}</figcaption></figure>")
        parts.append("</div></div>")
    parts.append("</section>")
    return "".join(parts)


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


def _chart_svg(name: str, points: list[tuple[int, Optional[float]]], color: str = _COLORS[0], width: int = 320,
               height: int = 170) -> str:
    """One small line chart (a ``<figure>`` with inline SVG) of ``(step, value)`` points on its own labelled y axis
    (one chart per series: rewards of different scales never share an axis) and step ticks on the x axis. Null and
    non-finite values are skipped; no finite value gives ""."""
    esc = html.escape
    points = [(int(s), v) for s, v in points if v is not None and math.isfinite(v)]
    if not points:
        return ""
    values = [v for _, v in points]
    first, last, low, high = values[0], values[-1], min(values), max(values)
    points = _thin(points)
    left, right, top, bottom = 52, 16, 8, 24  # margins in SVG units: room for the tick labels
    y_ticks = nice_ticks(low, high)
    x_ticks = nice_ticks(points[0][0], points[-1][0], integer=True)
    # min/max: a tick may sit a rounding error inside the data
    y0, y1, x0, x1 = min(y_ticks[0], low), max(y_ticks[-1], high), x_ticks[0], x_ticks[-1]

    def x(step: float) -> float:
        return left + (width - left - right) * (step - x0) / (x1 - x0)

    def y(value: float) -> float:
        return top + (height - top - bottom) * (y1 - value) / (y1 - y0)

    grid = "".join(f'<line x1="{left}" x2="{width - right}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>' for t in y_ticks)
    y_axis = "".join(f'<text x="{left - 5}" y="{y(t) + 3.5:.1f}">{label}</text>'
                     for t, label in zip(y_ticks, tick_labels(y_ticks)))
    x_axis = "".join(f'<text x="{x(t):.1f}" y="{height - 7}">{int(t)}</text>' for t in x_ticks)
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2"><title>step {s}: {v:.6g}</title></circle>'
                   for s, v in points) if len(points) <= 40 else ""
    end = f'<circle cx="{x(points[-1][0]):.1f}" cy="{y(points[-1][1]):.1f}" r="3"/>'
    svg = (f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(name, quote=True)} per step">'
           f'<g class="grid" stroke="#e6e6e6">{grid}</g>'
           f'<g class="axes" stroke="#999"><line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}"/>'
           f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}"/></g>'
           f'<g class="y-axis" font-size="10" fill="#555" text-anchor="end">{y_axis}</g>'
           f'<g class="x-axis" font-size="10" fill="#555" text-anchor="middle">{x_axis}</g>'
           f'<g class="series" fill="{color}"><polyline fill="none" stroke="{color}" stroke-width="1.8" '
           f'stroke-linejoin="round" points="{line}"/>{dots}{end}</g></svg>')
    return (f'<figure class="chart"><figcaption><b>{esc(name)}</b><span class="last">{last:.4g}</span> '
            f"<small>first {first:.4g} · min {low:.4g} · max {high:.4g} · x: step</small></figcaption>{svg}"
            "</figure>")


# ---------------------------------------------------------------------- tensorboard


class TensorBoardLogger:
    """``tensorboard``: each sample as an image (tag ``<tag>/<i>``), a text table of prompts and scores
    (``<tag>/captions``) and the batch mean of every reward (``<tag>/<name>_mean``), per logged step.

    Writes into the run of accelerate's TensorBoard tracker when ``log_with: tensorboard`` is set (one run in the
    TensorBoard UI), otherwise into its own ``log_dir`` (default ``<output_dir>/tensorboard``).
    """

    def __init__(self, output_dir: str, log_dir: Optional[str] = None, tag: str = "samples"):
        owner = "image logger 'tensorboard'"
        require_package("tensorboard", owner)
        log_dir = options.string(owner, "log_dir", log_dir, allowed="a folder path", optional=True)
        self.log_dir = Path(log_dir).expanduser() if log_dir else Path(output_dir) / "tensorboard"
        _check_folder(owner, "log_dir", self.log_dir)
        self.tag = options.string(owner, "tag", tag)
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
        owner = "image logger 'wandb'"
        require_package("wandb", owner)
        for option, value in (("project", project), ("tag", tag)):
            options.string(owner, option, value)
        for option, value in (("name", name), ("dir", dir)):
            options.string(owner, option, value, optional=True)
        options.choice(owner, "mode", mode, ("online", "offline", "disabled", "shared"), optional=True)
        if not isinstance(table, bool):
            raise options.invalid(owner, "table", table, "true or false")
        if init_kwargs is not None and not isinstance(init_kwargs, dict):
            raise options.invalid(owner, "init_kwargs", init_kwargs, "a mapping of wandb.init arguments")
        if dir:
            _check_folder(owner, "dir", Path(dir).expanduser())
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
