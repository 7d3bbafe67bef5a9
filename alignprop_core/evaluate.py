"""Fixed-seed evaluation (``alignprop eval``) and sampling (``alignprop sample``).

Evaluation draws a fixed set of samples, each a prompt and a seed, and renders every model (the base pipeline and
each LoRA, loaded with ``pipe.load_lora_weights(dir)`` and removed with ``pipe.unload_lora_weights()``) from the same
prompt and the same noise, so score differences are the LoRA's alone. Prompts and seeds are the ones
``AlignPropTrainer.evaluate`` uses (``eval_seed``, ``eval_num_samples``), so ``alignprop eval --lora OUT`` reproduces
the "eval after" line of the training run that wrote OUT.
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from alignprop_core import plugins
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import AlignPropError, ConfigError
from alignprop_core.lora import LORA_WEIGHTS_NAME
from alignprop_core.paths import check_output_dir
from alignprop_core.sampler import encode_prompts, sample_images
from alignprop_core.seeding import draw_prompts, eval_seeds

ScoreFn = Callable[[torch.Tensor, list, list], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class SampleSet:
    """Fixed samples: sample ``i`` is ``prompts[i]`` (with ``metadata[i]``) rendered from noise seeded ``seeds[i]``."""

    prompts: list[str]
    metadata: list[dict]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Scored:
    """Per-sample scores of one model on a :class:`SampleSet`: the weighted total and each reward."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    images: Optional[torch.Tensor] = None  # [N, 3, H, W] in [0, 1] on the CPU, when kept

    def means(self) -> dict[str, float]:
        """``{"reward": mean weighted total, <name>: mean of each reward}`` (the trainer's eval summary)."""
        return {name: values.float().mean().item() for name, values in {"reward": self.total,
                                                                         **self.components}.items()}


# ---------------------------------------------------------------------- prompts and seeds


def eval_sample_set(prompt_fn: Callable[[], Any], num_samples: int, seed: int) -> SampleSet:
    """The fixed evaluation set: ``num_samples`` prompts from ``prompt_fn`` and their seeds, all from ``seed``."""
    seeds = eval_seeds(seed, num_samples)
    prompts, metadata = draw_prompts(prompt_fn, seeds)
    return SampleSet(prompts, metadata, seeds)


def read_prompts_file(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """All prompts of ``--prompts_file``: a ``.txt`` file (one per line) or a ``.jsonl`` file (``{"prompt": ...,
    "metadata": {...}}``), read by the same reader as the ``from_file`` prompt source."""
    from alignprop_core.prompts import read_prompt_file

    if not str(path).strip():
        raise ConfigError("--prompts_file: got an empty path; give a .txt file with one prompt per line (or a .jsonl "
                          "of {\"prompt\": ...} records)")
    return read_prompt_file(path, label="prompts file", error=ConfigError)


# ---------------------------------------------------------------------- pipeline helpers


def image_size(config: AlignPropConfig, pipe: Any) -> tuple[int, int]:
    """``(height, width)`` from the config, defaulting to the model's own size; a multiple of the VAE factor."""
    factor = pipe.vae_scale_factor
    default = pipe.unet.config.sample_size * factor
    height = config.height or config.resolution or default
    width = config.width or config.resolution or default
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise ConfigError(f"{name}: got {value}, allowed: a multiple of this model's VAE factor {factor}")
    return height, width


def inference_setup(config: AlignPropConfig) -> tuple[torch.device, torch.dtype]:
    """Device (the GPU when there is one) and the frozen weights' dtype (``mixed_precision``; fp32 on CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision,
                                                                                         torch.float32)
    return torch.device("cpu"), torch.float32


def load_inference_pipeline(config: AlignPropConfig, device: torch.device, dtype: torch.dtype):
    """The config's pipeline set up as the trainer sets it up (its ``scheduler``, frozen, on ``device`` in ``dtype``;
    SDXL's VAE stays fp32 under fp16, as in its pipeline)."""
    from alignprop_core.models import prepare_pipeline
    from alignprop_core.trainer import load_pipeline, resolve_model_path

    pipe = load_pipeline(resolve_model_path(config.pretrained_model), config.pretrained_revision)
    prepare_pipeline(pipe, config.scheduler, device, dtype)
    return pipe


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def check_lora_dir(directory: str | os.PathLike) -> Path:
    """A folder holding ``pytorch_lora_weights.safetensors``, or a one-line :class:`ConfigError`."""
    from alignprop_core.mix import check_lora_folder

    path = check_lora_folder(directory)
    if not (path / LORA_WEIGHTS_NAME).is_file():
        raise ConfigError(f"LoRA folder '{directory}' has no {LORA_WEIGHTS_NAME}; pass the output_dir of a "
                          "finished run (or a checkpoint folder under checkpoints/)")
    return path


class _DropMessages:
    """A logging filter that drops records starting with ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


@contextlib.contextmanager
def lora_loaded(pipe: Any, directory: Optional[str | os.PathLike], scale: float = 1.0):
    """Load a diffusers-format LoRA into ``pipe`` for the duration of the block (nothing when ``directory`` is None)."""
    if directory is None:
        yield
        return
    import logging

    quiet = _DropMessages("No LoRA keys associated to")  # our LoRAs adapt only the UNet: not worth a warning
    diffusers_logger = logging.getLogger("diffusers.loaders.lora_base")
    diffusers_logger.addFilter(quiet)
    try:
        pipe.load_lora_weights(str(directory), adapter_name="alignprop_eval")
    except Exception as exc:  # wrong architecture, broken file, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AlignPropError(f"could not load the LoRA in '{directory}' into this pipeline ({type(exc).__name__}: "
                             f"{first}); use a LoRA trained on the same base model") from None
    finally:
        diffusers_logger.removeFilter(quiet)
    try:
        if scale != 1.0:
            pipe.set_adapters(["alignprop_eval"], adapter_weights=[scale])
        yield
    finally:
        pipe.unload_lora_weights()


# ---------------------------------------------------------------------- sampling and scoring


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], config: AlignPropConfig, *, height: int,
             width: int, device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext,
             unet: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` for one batch; image ``i`` uses noise seeded ``seeds[i]`` (its own
    generator), so it does not depend on the batch it is in (up to float rounding of batched kernels)."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    with autocast():
        embeddings = encode_prompts(pipe, list(prompts), config.negative_prompts, config.sample_guidance_scale, device)
        return sample_images(pipe, embeddings, num_steps=config.sample_num_steps,
                             guidance_scale=config.sample_guidance_scale, eta=config.sample_eta, height=height,
                             width=width, grad_steps=0, generator=generators, unet=unet)


@torch.no_grad()
def sample_and_score(pipe: Any, samples: SampleSet, config: AlignPropConfig, score_fn: ScoreFn, *, height: int,
                     width: int, device: torch.device, batch_size: int,
                     autocast: Callable[[], Any] = contextlib.nullcontext, keep_images: bool = False) -> Scored:
    """Render every sample of ``samples`` in batches and score it with ``score_fn(images, prompts, metadata) ->
    (total [B], {name: [B]})``; the images are kept (on the CPU) only when ``keep_images``."""
    totals, components, images = [], {}, []
    for start in range(0, len(samples), batch_size):
        stop = start + batch_size
        prompts, metadata = samples.prompts[start:stop], samples.metadata[start:stop]
        batch = generate(pipe, prompts, samples.seeds[start:stop], config, height=height, width=width, device=device,
                         autocast=autocast)
        with autocast():
            total, parts = score_fn(batch, prompts, metadata)
        totals.append(total.float().cpu())
        for name, values in parts.items():
            components.setdefault(name, []).append(values.float().cpu())
        if keep_images:
            images.append(batch.float().cpu())
    return Scored(torch.cat(totals), {n: torch.cat(v) for n, v in components.items()},
                  torch.cat(images) if keep_images else None)


def reward_scorer(config: AlignPropConfig, device: torch.device) -> ScoreFn:
    """Build and freeze the config's rewards; returns ``score(images, prompts, metadata) -> (total, parts)``."""
    from alignprop_core.rewards import call_reward, freeze

    rewards = [(r.name, r.weight, freeze(plugins.build("reward", r.name, r.options), device)) for r in config.rewards]

    def score(images: torch.Tensor, prompts: list, metadata: list):
        parts = {name: call_reward(name, fn, images, prompts, metadata) for name, _, fn in rewards}
        return sum(weight * parts[name] for name, weight, _ in rewards), parts

    return score


# ---------------------------------------------------------------------- alignprop eval


@dataclass
class EvalReport:
    """What ``run_eval`` computed and wrote."""

    models: list[str]
    samples: SampleSet
    scores: dict[str, Scored]
    rows: list[dict[str, Any]]
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def model_labels(loras: Sequence[str | os.PathLike], include_base: bool = True) -> list[str]:
    """Column names: ``base`` and each LoRA folder's name (its full path where two names clash)."""
    names = [Path(d).resolve().name or str(d) for d in loras]
    labels = [str(d) if names.count(n) > 1 or n == "base" else n for d, n in zip(loras, names)]
    return (["base"] if include_base else []) + labels


def run_eval(config: AlignPropConfig, loras: Sequence[str | os.PathLike] = (), *, out_dir: str | os.PathLike,
             prompts_file: Optional[str | os.PathLike] = None, include_base: bool = True,
             batch_size: Optional[int] = None, print_fn: Callable[[str], Any] = print,
             overwrite: bool = False) -> EvalReport:
    """Score the base model and each LoRA on the same fixed prompts and noise with every configured reward; write
    ``eval.json``, ``eval.csv``, ``grid.png`` (a row per prompt, a column per model), ``index.html`` and the images
    into ``out_dir``; print the table. An earlier report in ``out_dir`` is replaced only with ``overwrite``."""
    # Everything that can be wrong with names and paths is checked before a model is loaded.
    if not loras and not include_base:
        raise ConfigError("nothing to evaluate: pass --lora DIR (and/or keep the base model)")
    _check_batch_size(batch_size)
    _check_not_used(out_dir, ["eval.json"], overwrite)
    lora_dirs = [check_lora_dir(d) for d in loras]
    for reward in config.rewards:
        plugins.get("reward", reward.name)
    if prompts_file is not None:
        prompts, metadata = read_prompts_file(prompts_file)
        samples = SampleSet(prompts, metadata, eval_seeds(config.eval_seed, len(prompts)))
    else:
        if config.eval_num_samples < 1:
            raise ConfigError("eval_num_samples: got 0, allowed: an integer >= 1 for alignprop eval (or pass "
                              "--prompts_file)")
        prompt_fn = plugins.build("prompt source", config.prompts.name, config.prompts.options)
        samples = eval_sample_set(prompt_fn, config.eval_num_samples, config.eval_seed)
    from alignprop_core.trainer import resolve_model_path

    resolve_model_path(config.pretrained_model)

    device, dtype = inference_setup(config)
    score_fn = reward_scorer(config, device)
    pipe = load_inference_pipeline(config, device, dtype)
    height, width = image_size(config, pipe)
    labels = model_labels(lora_dirs, include_base)
    sources: list[Optional[Path]] = ([None] if include_base else []) + lora_dirs
    scores: dict[str, Scored] = {}
    for label, source in zip(labels, sources):
        with lora_loaded(pipe, source):
            scores[label] = sample_and_score(pipe, samples, config, score_fn, height=height, width=width,
                                             device=device, batch_size=batch_size or config.train_batch_size,
                                             autocast=lambda: _autocast(device, dtype), keep_images=True)
        print_fn(f"{label}: " + ", ".join(f"{n}={v:.4f}" for n, v in scores[label].means().items()))

    rows = table_rows(scores, config, baseline="base" if include_base else None)
    out = _writable_dir(out_dir)  # created only now: a failure above leaves nothing behind
    report = EvalReport(labels, samples, scores, rows, out)
    report.files = write_eval_outputs(report, config, {l: (str(s) if s else None) for l, s in zip(labels, sources)})
    print_fn("")
    print_fn(format_table(rows))
    print_fn(f"\nwrote {', '.join(str(p) for p in report.files.values())}")
    return report


def table_rows(scores: dict[str, Scored], config: AlignPropConfig, baseline: Optional[str] = "base") -> list[dict]:
    """One row per model and reward (plus the weighted total when there are several rewards): mean, std, min, max,
    and against the baseline model the mean difference and the share of samples where the model scores higher
    (a paired comparison: same prompt, same noise)."""
    names = [r.name for r in config.rewards]
    columns = names + (["weighted_total"] if len(names) > 1 else [])
    rows = []
    for model, scored in scores.items():
        for name in columns:
            values = scored.total if name == "weighted_total" else scored.components[name]
            row: dict[str, Any] = {"model": model, "reward": name, "mean": values.mean().item(),
                                   "std": values.std().item() if len(values) > 1 else 0.0,
                                   "min": values.min().item(), "max": values.max().item(), "n": len(values)}
            if baseline is not None and baseline in scores:
                base = scores[baseline].total if name == "weighted_total" else scores[baseline].components[name]
                row["delta_vs_base"] = (values - base).mean().item()
                row["win_rate_vs_base"] = (values > base).float().mean().item() if model != baseline else None
            rows.append(row)
    return rows


#: the columns of the printed and the HTML table, in order
_TABLE_COLUMNS = ("model", "reward", "mean", "std", "min", "max", "delta_vs_base", "win_rate_vs_base")


def _format_cell(value: Any, column: str) -> str:
    """One table value as text: delta signed, win rate in percent, floats to 4 decimals, None as '-'."""
    if value is None:
        return "-"
    if column == "delta_vs_base":
        return f"{value:+.4f}"
    if column == "win_rate_vs_base":
        return f"{100 * value:.0f}%"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    columns = [c for c in _TABLE_COLUMNS if any(c in row for row in rows)]
    cells = [[_format_cell(row.get(c), c) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines += ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
              for r in cells]
    return "\n".join(lines)


def write_eval_outputs(report: EvalReport, config: AlignPropConfig,
                       sources: dict[str, Optional[str]]) -> dict[str, Path]:
    """Write images, ``eval.json``, ``eval.csv``, ``grid.png`` and ``index.html``; returns their paths."""
    from alignprop_core.image_loggers import to_pil

    out, samples = report.out_dir, report.samples
    files: dict[str, dict[str, str]] = {label: {} for label in report.models}
    for m, label in enumerate(report.models):
        folder = out / "images" / f"{m:02d}-{_slug(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(report.scores[label].images):
            file = folder / f"{i:03d}.png"
            to_pil(image).save(file)
            files[label][str(i)] = file.relative_to(out).as_posix()
    per_sample = []
    for i in range(len(samples)):
        per_sample.append({
            "index": i, "prompt": samples.prompts[i], "metadata": samples.metadata[i], "seed": samples.seeds[i],
            "scores": {label: {"weighted_total": report.scores[label].total[i].item(),
                               **{n: v[i].item() for n, v in report.scores[label].components.items()}}
                       for label in report.models},
            "images": {label: files[label][str(i)] for label in report.models}})
    settings = {k: getattr(config, k, None) for k in ("pretrained_model", "scheduler", "sample_num_steps",
                                                      "sample_guidance_scale", "sample_eta", "negative_prompts",
                                                      "eval_seed", "height", "width", "resolution", "mixed_precision")}
    settings["rewards"] = [{"name": r.name, "weight": r.weight, "options": r.options} for r in config.rewards]
    settings["prompts"] = {"name": config.prompts.name, "options": config.prompts.options}
    document = {"settings": settings, "models": [{"name": label, "lora": sources[label]} for label in report.models],
                "table": report.rows, "samples": per_sample}
    paths = {"json": out / "eval.json", "csv": out / "eval.csv", "grid": out / "grid.png", "html": out / "index.html"}
    paths["json"].write_text(json.dumps(document, indent=1, default=str), encoding="utf-8")
    columns = ["model", "reward", "mean", "std", "min", "max", "n", "delta_vs_base", "win_rate_vs_base"]
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in columns if any(c in r for r in report.rows)])
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items() if k in writer.fieldnames})
    image_grid(report).save(paths["grid"])
    paths["html"].write_text(eval_html(report, per_sample, settings), encoding="utf-8")
    return paths


def _shown_scores(names: Sequence[str]) -> list[str]:
    """Each reward, then the weighted total when it is not simply the one reward."""
    components = [n for n in names if n != "weighted_total"]
    return components + (["weighted_total"] if "weighted_total" in names and len(components) > 1 else [])


def image_grid(report: EvalReport, cell: int = 256, scores: bool = True, font_size: int = 15):
    """A PNG grid: one row per prompt, one column per model; model names on top, each prompt and its seed on the
    left and, with ``scores``, each image's scores under it (the difference to ``base`` in green or red). Columns
    widen to fit the score text, so small images keep their pixels and the numbers stay readable."""
    from PIL import Image, ImageDraw

    from alignprop_core.image_loggers import to_pil

    first = report.scores[report.models[0]].images[0]
    scale = min(1.0, cell / max(first.shape[-2:]))
    w, h = max(1, round(first.shape[-1] * scale)), max(1, round(first.shape[-2] * scale))
    font, small = _font(font_size), _font(font_size - 2)
    line, small_line, pad = font_size + 5, font_size + 3, 4
    names = _shown_scores(["weighted_total", *report.scores[report.models[0]].components])
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def score_lines(label: str, i: int) -> list[tuple[str, str, float]]:
        """(``name value``, ``(+delta)``, delta) for each shown score of image ``i`` of model ``label``."""
        scored, base = report.scores[label], report.scores.get("base")
        lines = []
        for name in names:
            value = (scored.total if name == "weighted_total" else scored.components[name])[i].item()
            delta = None
            if base is not None and label != "base":
                delta = value - (base.total if name == "weighted_total" else base.components[name])[i].item()
            lines.append((f"{name} {value:.4f}", "" if delta is None else f" ({delta:+.4f})", delta or 0.0))
        return lines

    n, m = len(report.samples), len(report.models)
    texts = {(label, i): score_lines(label, i) for label in report.models for i in range(n)} if scores else {}
    widest = max([_text_width(measure, a + b, small) for lines in texts.values() for a, b, _ in lines], default=0)
    col_w = max(w, int(widest) + 2 * pad)
    score_h = len(names) * small_line + 2 * pad if scores else 0
    label_w, header_h, row_h = 220, line + 2 * pad, h + score_h
    grid = Image.new("RGB", (label_w + m * (col_w + pad) + pad, header_h + n * (row_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(report.models):
        title = _fit_px(measure, label, font, col_w)
        x = label_w + j * (col_w + pad) + pad + (col_w - int(_text_width(measure, title, font))) // 2
        _draw_text(draw, (x, pad), title, font)
    for i in range(n):
        y = header_h + i * (row_h + pad) + pad
        room = max(1, row_h // line - 1)  # prompt lines that fit, less one for the seed
        lines = _wrap_px(measure, report.samples.prompts[i], font, label_w - 3 * pad)
        lines = lines[:room - 1] + [_fit_px(measure, " ".join(lines[room - 1:]), font, label_w - 3 * pad)] \
            if len(lines) > room else lines
        _draw_text(draw, (pad, y + 2), "\n".join(lines), font, spacing=line - font_size)
        _draw_text(draw, (pad, y + 2 + len(lines) * line), f"seed {report.samples.seeds[i]}", small, fill=(110,) * 3)
        for j, label in enumerate(report.models):
            x = label_w + j * (col_w + pad) + pad
            image = to_pil(report.scores[label].images[i])
            grid.paste(image.resize((w, h)) if image.size != (w, h) else image, (x + (col_w - w) // 2, y))
            for k, (text, delta, diff) in enumerate(texts.get((label, i), [])):
                ty = y + h + pad + k * small_line
                _draw_text(draw, (x + pad, ty), text, small)
                if delta:
                    color = (26, 127, 55) if diff > 0 else (198, 40, 40) if diff < 0 else (110, 110, 110)
                    _draw_text(draw, (x + pad + int(_text_width(measure, text, small)), ty), delta, small,
                               fill=color)
    return grid


_COLUMN_TITLES = {"delta_vs_base": "Δ vs base", "win_rate_vs_base": "wins vs base"}


def score_table_html(rows: list[dict[str, Any]]) -> str:
    """The eval rows as an HTML ``<table>`` (the columns of the printed table), each reward's best mean in bold."""
    esc = html.escape
    columns = [c for c in _TABLE_COLUMNS if any(c in row for row in rows)]
    best = {}
    for row in rows:
        best[row["reward"]] = max(best.get(row["reward"], row["mean"]), row["mean"])
    several = len({row["model"] for row in rows}) > 1
    head = "".join(f'<th class="{"t" if c in ("model", "reward") else "n"}">{esc(_COLUMN_TITLES.get(c, c))}</th>'
                   for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value, classes = row.get(column), ["t" if column in ("model", "reward") else "n"]
            if column == "delta_vs_base" and value:
                classes.append("up" if value > 0 else "down")
            if column == "mean" and several and value == best[row["reward"]]:
                classes.append("best")
            cells.append(f'<td class="{" ".join(classes)}">{esc(_format_cell(value, column))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="scores"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def eval_html(report: EvalReport, per_sample: list[dict], settings: dict[str, Any]) -> str:
    """A self-contained page: the score table, then one row per prompt with each model's image and scores."""
    esc = html.escape
    names = list(per_sample[0]["scores"][report.models[0]]) if per_sample else []
    shown = _shown_scores(names)
    head = "".join(f"<th>{esc(label)}</th>" for label in report.models)
    body = []
    for sample in per_sample:
        cells = []
        for label in report.models:
            scores = sample["scores"][label]
            lines = []
            for name in shown:
                delta = ""
                if label != "base" and "base" in sample["scores"]:
                    diff = scores[name] - sample["scores"]["base"][name]
                    delta = f' <span class="{"up" if diff > 0 else "down" if diff < 0 else ""}">({diff:+.4f})</span>'
                lines.append(f"{esc(name)} {scores[name]:.4f}{delta}")
            src = esc(sample["images"][label], quote=True)
            cells.append(f'<td><a href="{src}"><img src="{src}" alt="{esc(label)}"></a>'
                         f'<div class="s">{"<br>".join(lines)}</div></td>')
        body.append(f'<tr><th class="p">{esc(sample["prompt"])}<div class="s">seed {sample["seed"]}</div></th>'
                    + "".join(cells) + "</tr>")
    css = ("*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
           "@media (max-width:560px){body{margin:10px}}.wide{overflow-x:auto;max-width:100%;margin:12px 0}"
           "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px}"
           "table.scores{font-size:14px}table.scores thead th{background:#f4f4f4}"
           "table.scores .n{text-align:right;font-variant-numeric:tabular-nums}table.scores .t{text-align:left}"
           "table.scores .best{font-weight:700}"
           "table.g td,table.g th{padding:6px;vertical-align:top}table.g img{width:192px;max-width:40vw;"
           "display:block}th.p{text-align:left;width:200px;font-weight:600;word-break:break-word}"
           ".s{font-size:12px;color:#555;font-weight:normal}.up{color:#1a7f37}.down{color:#c62828}"
           "nav a{margin-right:12px}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>alignprop eval</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{css}</style></head><body><h1>alignprop eval</h1>"
            f"<p>{len(per_sample)} fixed samples (same prompt and noise for every model) from "
            f"<code>{esc(str(settings['pretrained_model']))}</code>, {settings['sample_num_steps']} "
            f"{esc(str(settings['scheduler'] or 'ddim'))} steps, "
            f"guidance {settings['sample_guidance_scale']}, eta {settings['sample_eta']}. "
            "Δ vs base: mean per-sample difference; wins vs base: share of samples scoring higher than the base "
            "model.</p>"
            '<nav><a href="grid.png">grid.png</a><a href="eval.csv">eval.csv</a><a href="eval.json">eval.json</a>'
            f'</nav><div class="wide">{score_table_html(report.rows)}</div>'
            f'<div class="wide"><table class="g"><tr><th>prompt</th>{head}</tr>{"".join(body)}</table></div>'
            "</body></html>\n")


# ---------------------------------------------------------------------- alignprop sample


def run_sample(config: AlignPropConfig, prompts: Sequence[str], *, out_dir: str | os.PathLike,
               lora: Optional[str | os.PathLike] = None, lora_scale: float = 1.0, seed: int = 0,
               num_per_prompt: int = 1, batch_size: Optional[int] = None,
               print_fn: Callable[[str], Any] = print, overwrite: bool = False) -> list[Path]:
    """Render ``num_per_prompt`` images per prompt (image ``j`` with seed ``seed + j``, so one image can be
    re-made alone) from the base model plus an optional LoRA; write PNGs and ``samples.jsonl`` to ``out_dir``
    (appended to). Images of the same names already there are replaced only with ``overwrite``."""
    from alignprop_core.image_loggers import to_pil

    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE")
    if isinstance(num_per_prompt, bool) or not isinstance(num_per_prompt, int) or num_per_prompt < 1:
        raise ConfigError(f"--num_per_prompt: got {num_per_prompt!r}, allowed: an integer >= 1")
    if not math.isfinite(lora_scale):
        raise ConfigError(f"--lora_scale: got {lora_scale}, allowed: a finite number (1 = full strength, 0 = the "
                          "base model)")
    _check_batch_size(batch_size)
    jobs = [(p, prompt, seed + j) for p, prompt in enumerate(prompts) for j in range(num_per_prompt)]
    _check_not_used(out_dir, [_sample_name(*job) for job in jobs], overwrite)
    if lora is not None:
        check_lora_dir(lora)
    from alignprop_core.trainer import resolve_model_path

    resolve_model_path(config.pretrained_model)
    device, dtype = inference_setup(config)
    pipe = load_inference_pipeline(config, device, dtype)
    height, width = image_size(config, pipe)
    out = _writable_dir(out_dir)  # created only once the model has loaded
    batch_size = batch_size or config.train_batch_size
    written = []
    with lora_loaded(pipe, lora, lora_scale), open(out / "samples.jsonl", "a", encoding="utf-8") as log:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            images = generate(pipe, [j[1] for j in batch], [j[2] for j in batch], config, height=height, width=width,
                              device=device, autocast=lambda: _autocast(device, dtype))
            for (p, prompt, image_seed), image in zip(batch, images):
                file = out / _sample_name(p, prompt, image_seed)
                to_pil(image).save(file)
                written.append(file)
                log.write(json.dumps({"file": file.name, "prompt": prompt, "seed": image_seed,
                                      "lora": str(lora) if lora else None, "lora_scale": lora_scale,
                                      "pretrained_model": config.pretrained_model}) + "\n")
    print_fn(f"wrote {len(written)} images to {out}")
    return written


# ---------------------------------------------------------------------- helpers


def _sample_name(index: int, prompt: str, seed: int) -> str:
    return f"{index:03d}-{_slug(prompt, 40)}-seed{seed}.png"


def _check_not_used(out_dir: str | os.PathLike, names: Sequence[str], overwrite: bool) -> Path:
    """``out_dir`` can be created or written, and holds none of ``names`` unless ``overwrite``."""
    out = check_output_dir(out_dir, "-o")
    taken = [name for name in names if (out / name).exists()] if out.is_dir() and not overwrite else []
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise ConfigError(f"-o: '{out_dir}' already holds {taken[0]}{more} from an earlier run; choose another "
                          "folder, or pass --overwrite to replace them")
    return out


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"--batch_size: got {batch_size!r}, allowed: an integer >= 1 (or leave it out for "
                          "train_batch_size)")


def _writable_dir(directory: str | os.PathLike) -> Path:
    """Create the output folder (checked first with :func:`check_output_dir`) and make sure it can be written."""
    path = check_output_dir(directory, "-o")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".alignprop-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder '{directory}' cannot be written ({exc.strerror or exc}); choose another "
                          "with -o") from None
    return path


def _slug(text: str, limit: int = 40) -> str:
    from alignprop_core.image_loggers import _slug as slug

    return slug(text, limit)


def _font(size: int) -> Any:
    """A scalable font of ``size`` px: Pillow's own (>= 10.1), else DejaVu Sans, else the small bitmap default."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # older Pillow (no size argument) or no FreeType
        pass
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_width(draw: Any, text: str, font: Any) -> float:
    try:
        return draw.textlength(text, font=font)
    except UnicodeError:  # the bitmap fallback font is latin-1 only
        return draw.textlength(_latin1(text), font=font)


def _fit_px(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` cut (with "...") to at most ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _wrap_px(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to lines of at most ``width`` pixels (an overlong word is cut)."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}" if current else word
        if current and _text_width(draw, trial, font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    lines.append(current)
    return [_fit_px(draw, line, font, width) for line in lines]


def _draw_text(draw: Any, xy: tuple[int, int], text: str, font: Any, fill: Any = "black", spacing: int = 3) -> None:
    """Draw text; characters the font cannot render become '?'."""
    try:
        draw.multiline_text(xy, text, fill=fill, font=font, spacing=spacing)
    except UnicodeError:
        draw.multiline_text(xy, _latin1(text), fill=fill, font=font, spacing=spacing)


__all__ = ["SampleSet", "Scored", "EvalReport", "eval_sample_set", "draw_prompts", "eval_seeds", "read_prompts_file",
           "image_size", "generate", "sample_and_score", "reward_scorer", "run_eval", "run_sample", "table_rows",
           "format_table", "lora_loaded", "check_lora_dir"]
