"""``alignprop sample``: render prompts with the base model and an optional LoRA (at a strength) to PNG files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from alignprop_core import evaluate as ev
from alignprop_core.config import AlignPropConfig
from alignprop_core.errors import ConfigError
from alignprop_core.image_loggers import slug, to_pil
from alignprop_core.pipelines import image_size, inference_device, load_inference_pipeline, resolve_model_path

__all__ = ["run_sample"]


def run_sample(config: AlignPropConfig, prompts: Sequence[str], *, out_dir: str | os.PathLike,
               lora: Optional[str | os.PathLike] = None, lora_scale: float = 1.0, seed: int = 0,
               num_per_prompt: int = 1, batch_size: Optional[int] = None,
               print_fn: Callable[[str], Any] = print, overwrite: bool = False) -> list[Path]:
    """Render ``num_per_prompt`` images per prompt (image ``j`` with seed ``seed + j``, so one image can be
    re-made alone) from the base model plus an optional LoRA; write PNGs and ``samples.jsonl`` to ``out_dir``
    (appended to). Images of the same names already there are replaced only with ``overwrite``."""
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE")
    if isinstance(num_per_prompt, bool) or not isinstance(num_per_prompt, int) or num_per_prompt < 1:
        raise ConfigError(f"--num_per_prompt: got {num_per_prompt!r}, allowed: an integer >= 1")
    if not math.isfinite(lora_scale):
        raise ConfigError(f"--lora_scale: got {lora_scale}, allowed: a finite number (1 = full strength, 0 = the "
                          "base model)")
    ev.check_batch_size(batch_size)
    jobs = [(p, prompt, seed + j) for p, prompt in enumerate(prompts) for j in range(num_per_prompt)]
    ev.check_not_used(out_dir, [_sample_name(*job) for job in jobs], overwrite)
    if lora is not None:
        ev.check_lora_dir(lora)
    resolve_model_path(config.pretrained_model)
    device = inference_device()
    pipe, dtype = load_inference_pipeline(config)
    height, width = image_size(config, pipe)
    out = ev.writable_dir(out_dir)  # created only once the model has loaded
    batch_size = batch_size or config.train_batch_size
    written = []
    with ev.lora_loaded(pipe, lora, lora_scale), open(out / "samples.jsonl", "a", encoding="utf-8") as log:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            images = ev.generate(pipe, [j[1] for j in batch], [j[2] for j in batch], config, height=height,
                                 width=width, device=device, autocast=lambda: ev.autocast_for(device, dtype))
            for (p, prompt, image_seed), image in zip(batch, images):
                file = out / _sample_name(p, prompt, image_seed)
                to_pil(image).save(file)
                written.append(file)
                log.write(json.dumps({"file": file.name, "prompt": prompt, "seed": image_seed,
                                      "lora": str(lora) if lora else None, "lora_scale": lora_scale,
                                      "pretrained_model": config.pretrained_model}) + "\n")
    print_fn(f"wrote {len(written)} images to {out}")
    return written


def _sample_name(index: int, prompt: str, seed: int) -> str:
    return f"{index:03d}-{slug(prompt, 40)}-seed{seed}.png"
