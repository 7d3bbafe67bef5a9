"""Built-in image logger ``folder``: PNGs per logged step plus a JSONL of prompts and rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def to_pil(image: torch.Tensor):
    """``[3, H, W]`` float in ``[0, 1]`` -> PIL image (rounded, like diffusers' ``numpy_to_pil``)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


class FolderLogger:
    """Writes ``<output_dir>/<subdir>/step-<N>/<i>.png`` and appends one JSON line per image to
    ``<output_dir>/<subdir>/samples.jsonl`` (step, file, prompt, metadata, reward, per-reward scores)."""

    def __init__(self, output_dir: str, subdir: str = "images"):
        self.root = Path(output_dir) / subdir

    def __call__(self, image_data: dict[str, Any], global_step: int, accelerate_logger: Any = None) -> None:
        step_dir = self.root / f"step-{global_step:06d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        components = image_data.get("reward_components", {})
        with open(self.root / "samples.jsonl", "a", encoding="utf-8") as log:
            for i, image in enumerate(image_data["images"]):
                file = step_dir / f"{i:03d}.png"
                to_pil(image).save(file)
                record = {
                    "step": global_step,
                    "file": str(file.relative_to(self.root)),
                    "prompt": image_data["prompts"][i],
                    "metadata": image_data["prompt_metadata"][i],
                    "reward": float(image_data["rewards"][i]),
                    "rewards": {name: float(values[i]) for name, values in components.items()},
                }
                log.write(json.dumps(record) + "\n")
