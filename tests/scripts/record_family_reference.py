"""Record the family reference outputs that tests/test_families.py checks bit for bit.

For the tiny SD-1.x and tiny SDXL pipelines (fixed seeds) this records: (a) no-grad samples of
``sampler.sample_images`` (DDIM with eta 1 and CFG; DPM-Solver++ without CFG), (b) the LoRA gradients of a K = 2
truncated sample's mean pixel value, (c) the SHA-256 of the exported LoRA file, (d) the LoRA gradients of a
DRaFT-LV sample (n = 2) and the SHA-256 of its images. Tensors go into tests/data/family_reference.safetensors,
hashes and the recording environment into its metadata.

usage: OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python tests/scripts/record_family_reference.py

Run it only when a change is *meant* to alter sampling, gradients or the LoRA file format: the test's purpose is
to catch unintended changes, so re-recording after an unexplained mismatch defeats it.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "family_reference.safetensors"
FAMILIES = ("sd", "sdxl")
PROMPTS = ["a cat", "a red dog"]
SEEDS = (11, 12)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def environment() -> dict[str, str]:
    """What bitwise results depend on besides the code: library versions and the CPU kernels torch picks."""
    import diffusers
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(tensor: Any) -> str:
    return sha256(tensor.detach().contiguous().cpu().numpy().tobytes())


def _load(family: str, folder: Path, scheduler: str):
    """The tiny pipeline of ``family`` (built into ``folder`` on first use), prepared as the trainer prepares it."""
    import torch

    from alignprop_core.families import prepare_pipeline
    from alignprop_core.pipelines import load_pipeline
    from alignprop_core.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

    path = folder / family
    if not (path / "model_index.json").is_file():
        (build_tiny_sdxl_pipeline if family == "sdxl" else build_tiny_pipeline)(path, seed=0)
    pipe = load_pipeline(str(path))
    return pipe, prepare_pipeline(pipe, scheduler, torch.device("cpu"), torch.float32)


def _with_lora(pipe):
    """A rank-4 LoRA with every factor non-zero (as tests/conftest.py's make_lora_pipe), so each gets a gradient."""
    import torch

    from alignprop_core.lora import add_lora

    torch.manual_seed(0)
    params = add_lora(pipe.unet, 4, 4.0, TARGETS)
    for p in params:
        torch.nn.init.normal_(p, std=0.02)
    return params


def _generators():
    import torch

    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def _lora_grad(params, images) -> Any:
    import torch

    for p in params:
        p.grad = None
    images.mean().backward()
    return torch.cat([p.grad.flatten() for p in params])


def compute(family: str, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: tensor}, {name: hash})`` of one family, names prefixed ``family/``."""
    import torch

    from alignprop_core.lora import LORA_WEIGHTS_NAME, save_lora
    from alignprop_core.sampler import encode_prompts, sample_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU kernels can split reductions by thread count
    try:
        tensors: dict[str, Any] = {}
        hashes: dict[str, str] = {}
        cpu = torch.device("cpu")
        common = dict(height=128, width=128, generator=None)  # 16 x 16 latents

        # (a) no-grad samples: DDIM eta 1 with CFG (no negative prompt), DPM-Solver++ without CFG
        pipe, _ = _load(family, folder, "ddim")
        with torch.no_grad():
            emb = encode_prompts(pipe, PROMPTS, None, 5.0, cpu)
            tensors["ddim_eta1_cfg"] = sample_images(pipe, emb, num_steps=3, guidance_scale=5.0, eta=1.0,
                                                     grad_steps=0, **{**common, "generator": _generators()})
        pipe, _ = _load(family, folder, "dpm++")
        with torch.no_grad():
            emb = encode_prompts(pipe, PROMPTS, None, 1.0, cpu)
            tensors["dpmpp_nocfg"] = sample_images(pipe, emb, num_steps=3, guidance_scale=1.0, eta=0.0,
                                                   grad_steps=0, **{**common, "generator": _generators()})

        # (b) LoRA gradients through the last K = 2 of 3 DDIM steps (checkpointed), negative prompt with CFG
        pipe, handle = _load(family, folder, "ddim")
        params = _with_lora(pipe)
        emb = encode_prompts(pipe, PROMPTS, "blurry", 5.0, cpu)
        images = sample_images(pipe, emb, num_steps=3, guidance_scale=5.0, eta=1.0, grad_steps=2,
                               gradient_checkpointing=True, **{**common, "generator": _generators()})
        tensors["grad_k2"] = _lora_grad(params, images)
        hashes["grad_k2_images"] = tensor_sha256(images)

        # (c) the exported LoRA file, after a fixed perturbation of the LoRA weights
        with torch.no_grad():
            for i, p in enumerate(params):
                p.add_(0.001 * (i + 1))
        with tempfile.TemporaryDirectory() as out:
            save_lora(pipe.unet, out, handle)
            hashes["lora_file"] = sha256((Path(out) / LORA_WEIGHTS_NAME).read_bytes())

        # (d) DRaFT-LV: the whole chain without grad, then n = 2 re-noised copies of the last Euler step with grad
        pipe, _ = _load(family, folder, "euler")
        params = _with_lora(pipe)
        emb = encode_prompts(pipe, PROMPTS, None, 5.0, cpu)
        images = sample_images(pipe, emb, num_steps=3, guidance_scale=5.0, eta=1.0, grad_steps=1, draft_lv_n=2,
                               gradient_checkpointing=True, **{**common, "generator": _generators()})
        tensors["grad_draft_lv"] = _lora_grad(params, images)
        hashes["draft_lv_images"] = tensor_sha256(images)
    finally:
        torch.set_num_threads(threads)
    return ({f"{family}/{k}": v.detach().contiguous() for k, v in tensors.items()},
            {f"{family}/{k}": v for k, v in hashes.items()})


def main() -> int:
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    metadata = {f"env/{k}": v for k, v in environment().items()}
    with tempfile.TemporaryDirectory() as folder:
        for family in FAMILIES:
            t, h = compute(family, Path(folder))
            tensors.update(t)
            metadata.update(h)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(REFERENCE), metadata=metadata)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1e6:.2f} MB): {', '.join(sorted(tensors))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
