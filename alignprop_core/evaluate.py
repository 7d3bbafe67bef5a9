"""Fixed-seed evaluation (``alignprop eval``; ``alignprop sample`` is :mod:`alignprop_core.samples`).

Evaluation draws a fixed set of samples, each a prompt and a seed, and renders every model (the base pipeline and
each LoRA, loaded with ``pipe.load_lora_weights(dir)`` and removed with ``pipe.unload_lora_weights()``) from the same
prompt and the same noise, so score differences are the LoRA's alone. Prompts and seeds are the ones
``AlignPropTrainer.evaluate`` uses (``eval_seed``, ``eval_num_samples``), so ``alignprop eval --lora OUT`` reproduces
the "eval after" line of the training run that wrote OUT.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from alignprop_core import plugins
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import AlignPropError, ConfigError
from alignprop_core.image_loggers import slug, to_pil
from alignprop_core.lora import LORA_WEIGHTS_NAME
from alignprop_core.monitoring import EvalMeasures
from alignprop_core.pages import eval_html, format_table, image_grid
from alignprop_core.paths import check_output_dir
from alignprop_core.pipelines import image_size, inference_device, load_inference_pipeline  # noqa: F401
from alignprop_core.prompt_cache import forget
from alignprop_core.reward_set import RewardSet
from alignprop_core.sampler import sample_prompts
from alignprop_core.seeding import derive_seed, draw_prompts, eval_seeds

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


def eval_sample_set(prompt_fn: Callable[[], Any], num_samples: int, seed: int,
                    images_per_prompt: int = 1) -> SampleSet:
    """The fixed evaluation set: ``num_samples`` samples from ``seed``. Prompt ``j`` is drawn from ``prompt_fn``
    with ``eval_seeds(seed, .)[j]``, which also seeds its first image; with ``images_per_prompt`` k > 1 each prompt
    gets k images in a row (the others seeded ``derive_seed(seed, "eval-copy", j, c)``), so k = 1 is the set of
    earlier releases."""
    count = -(-num_samples // images_per_prompt)
    prompt_seeds = eval_seeds(seed, count)
    prompts, metadata = draw_prompts(prompt_fn, prompt_seeds)
    samples = [(prompts[j], metadata[j], prompt_seeds[j] if c == 0 else derive_seed(seed, "eval-copy", j, c))
               for j in range(count) for c in range(images_per_prompt)][:num_samples]
    return SampleSet(*(list(column) for column in zip(*samples))) if samples else SampleSet([], [], [])


def check_reward_names(config: AlignPropConfig) -> None:
    """Every training and held-out reward is installed (a one-line error naming the missing one)."""
    for reward in [*config.rewards, *config.eval_rewards]:
        plugins.get("reward", reward.name)


def eval_samples(config: AlignPropConfig, prompts_file: Optional[str | os.PathLike] = None) -> SampleSet:
    """What ``alignprop eval`` renders: every prompt of ``prompts_file`` (seeds from ``eval_seed``), else the
    config's fixed evaluation set (:func:`eval_sample_set`)."""
    if prompts_file is not None:
        prompts, metadata = read_prompts_file(prompts_file)
        return SampleSet(prompts, metadata, eval_seeds(config.eval_seed, len(prompts)))
    if config.eval_num_samples < 1:
        raise ConfigError("eval_num_samples: got 0, allowed: an integer >= 1 for alignprop eval (or pass "
                          "--prompts_file)")
    prompt_fn = plugins.build("prompt source", config.prompts.name, config.prompts.options)
    return eval_sample_set(prompt_fn, config.eval_num_samples, config.eval_seed, config.eval_images_per_prompt)


def read_prompts_file(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """All prompts of ``--prompts_file``: a ``.txt`` file (one per line) or a ``.jsonl`` file (``{"prompt": ...,
    "metadata": {...}}``), read by the same reader as the ``from_file`` prompt source."""
    from alignprop_core.prompts import read_prompt_file

    if not str(path).strip():
        raise ConfigError("--prompts_file: got an empty path; give a .txt file with one prompt per line (or a .jsonl "
                          "of {\"prompt\": ...} records)")
    return read_prompt_file(path, label="prompts file", error=ConfigError)


# ---------------------------------------------------------------------- pipeline helpers


def autocast_for(device: torch.device, dtype: torch.dtype):
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
    forget(pipe)  # the file may adapt the text encoders: cached prompt embeddings would be stale
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
        forget(pipe)


# ---------------------------------------------------------------------- sampling and scoring


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], config: AlignPropConfig, *, height: int,
             width: int, device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext,
             unet: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` for one batch; image ``i`` uses noise seeded ``seeds[i]`` (its own
    generator), so it does not depend on the batch it is in (up to float rounding of batched kernels)."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    with autocast():
        return sample_prompts(pipe, list(prompts), config, height=height, width=width, device=device,
                              generator=generators, unet=unet)


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


@torch.no_grad()
def evaluate_fixed_samples(pipe: Any, config: AlignPropConfig, prompt_fn: Callable[[], Any], measures: EvalMeasures,
                           num_samples: int, seed: int, *, height: int, width: int, device: torch.device,
                           autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Mean training and held-out rewards, diversity and image statistics (``measures``) of ``num_samples`` fixed
    samples (prompts and noise from ``seed``): the trainer's eval rounds, which ``alignprop eval`` reproduces. Does
    not disturb the training RNG streams."""
    samples = eval_sample_set(prompt_fn, num_samples, seed, config.eval_images_per_prompt)
    scored = sample_and_score(pipe, samples, config, measures.score, height=height, width=width, device=device,
                              batch_size=config.train_batch_size, autocast=autocast, keep_images=True)
    means = scored.means()
    means.update(measures.image_measures(scored.images, samples.prompts))
    return means


@torch.no_grad()
def fixed_samples(pipe: Any, config: AlignPropConfig, prompt_fn: Callable[[], Any], count: int = 2, *, height: int,
                  width: int, device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """The first ``count`` fixed evaluation samples with the pipeline's current weights, as image loggers get them in
    ``image_data["fixed"]``: ``{"images" [N,3,H,W] on the CPU, "prompts", "seeds"}``."""
    samples = eval_sample_set(prompt_fn, count, config.eval_seed)
    images = generate(pipe, samples.prompts, samples.seeds, config, height=height, width=width, device=device,
                      autocast=autocast)
    return {"images": images.float().cpu(), "prompts": samples.prompts, "seeds": samples.seeds}


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
    check_batch_size(batch_size)
    check_not_used(out_dir, ["eval.json"], overwrite)
    lora_dirs = [check_lora_dir(d) for d in loras]
    check_reward_names(config)
    samples = eval_samples(config, prompts_file)
    from alignprop_core.pipelines import resolve_model_path

    resolve_model_path(config.pretrained_model)

    device = inference_device()
    score_fn = EvalMeasures(config, RewardSet.from_specs(config.rewards, device), device).score  # + held-out
    pipe, dtype = load_inference_pipeline(config)
    height, width = image_size(config, pipe)
    labels = model_labels(lora_dirs, include_base)
    sources: list[Optional[Path]] = ([None] if include_base else []) + lora_dirs
    scores: dict[str, Scored] = {}
    for label, source in zip(labels, sources):
        with lora_loaded(pipe, source):
            scores[label] = sample_and_score(pipe, samples, config, score_fn, height=height, width=width,
                                             device=device, batch_size=batch_size or config.train_batch_size,
                                             autocast=lambda: autocast_for(device, dtype), keep_images=True)
        print_fn(f"{label}: " + ", ".join(f"{n}={v:.4f}" for n, v in scores[label].means().items()))

    rows = table_rows(scores, config, baseline="base" if include_base else None)
    out = writable_dir(out_dir)  # created only now: a failure above leaves nothing behind
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
    names = [r.name for r in config.rewards] + [r.name for r in config.eval_rewards]
    columns = names + (["weighted_total"] if len(config.rewards) > 1 else [])
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


def write_eval_outputs(report: EvalReport, config: AlignPropConfig,
                       sources: dict[str, Optional[str]]) -> dict[str, Path]:
    """Write images, ``eval.json``, ``eval.csv``, ``grid.png`` and ``index.html``; returns their paths."""
    out, samples = report.out_dir, report.samples
    files: dict[str, dict[str, str]] = {label: {} for label in report.models}
    pils: dict[str, list] = {label: [] for label in report.models}
    for m, label in enumerate(report.models):
        folder = out / "images" / f"{m:02d}-{slug(label, 40)}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(report.scores[label].images):
            file = folder / f"{i:03d}.png"
            pils[label].append(to_pil(image))
            pils[label][-1].save(file)
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
    settings["rewards"] = [asdict(r) for r in config.rewards]
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
    image_grid(report.models, per_sample, pils).save(paths["grid"])
    paths["html"].write_text(eval_html(report.models, report.rows, per_sample, settings), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------- helpers


def check_not_used(out_dir: str | os.PathLike, names: Sequence[str], overwrite: bool) -> Path:
    """``out_dir`` can be created or written, and holds none of ``names`` unless ``overwrite``."""
    out = check_output_dir(out_dir, "-o")
    taken = [name for name in names if (out / name).exists()] if out.is_dir() and not overwrite else []
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise ConfigError(f"-o: '{out_dir}' already holds {taken[0]}{more} from an earlier run; choose another "
                          "folder, or pass --overwrite to replace them")
    return out


def check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"--batch_size: got {batch_size!r}, allowed: an integer >= 1 (or leave it out for "
                          "train_batch_size)")


def writable_dir(directory: str | os.PathLike) -> Path:
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


__all__ = ["SampleSet", "Scored", "EvalReport", "eval_sample_set", "draw_prompts", "eval_seeds", "read_prompts_file",
           "image_size", "generate", "sample_and_score", "run_eval", "table_rows",
           "format_table", "lora_loaded", "check_lora_dir", "eval_samples"]
