"""Image loggers (``folder``, ``tensorboard``, ``wandb``) and :class:`ImageLogSink`, the ``accelerate_logger`` that
image loggers and TRL-style image hooks receive.

Every logger is called as ``logger(image_data, global_step, accelerate_logger)`` with ``image_data`` =
``{images [B,3,H,W] in [0,1] (CPU), prompts, prompt_metadata, rewards [B], reward_components {name: [B]}}`` and
optionally ``fixed: {images [N,3,H,W], prompts, seeds}`` (the same prompts and noise rendered at every logged step).
tensorboard and wandb are optional dependencies, imported only when their logger (or tracker) is used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from alignprop_core import options
from alignprop_core.checkpoints import CONFIG_NAME, METRICS_NAME, read_jsonl, read_metrics, writable_problem
from alignprop_core.errors import PluginError
from alignprop_core.pages import gallery_html


def require_package(name: str, purpose: str) -> None:
    """Raise a one-line :class:`PluginError` naming ``pip install ...`` when optional package ``name`` is missing
    (``name`` is its import name, its pip name and its extra alike: tensorboard, wandb)."""
    if importlib.util.find_spec(name) is None:
        raise PluginError(f"{purpose} needs the '{name}' package, which is not installed: pip install {name} "
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
    problem = writable_problem(folder)
    if problem:
        raise PluginError(f"{owner}: cannot write to '{folder}' ({problem}); set the '{option}' option to a writable "
                          "folder")


def slug(text: str, limit: int = 60) -> str:
    """``text`` as a file-name part: runs of other characters than letters, digits, ``._-`` become ``_``."""
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
                    file = folder / f"{number:03d}-{slug(key)}{f'-{i}' if len(pils) > 1 else ''}.png"
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
        records = self._existing(read_jsonl(self.root / "samples.jsonl"))
        fixed = self._existing(read_jsonl(self.root / "fixed.jsonl"))
        metrics, evals = read_metrics(self.output_dir / METRICS_NAME)
        config_file = self.output_dir / CONFIG_NAME
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
