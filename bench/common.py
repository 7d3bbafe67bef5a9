"""What both sides of a benchmark share: prompts, rewards, measurement helpers.

Imported by alignprop's workers (``.venv``) and by the TRL peer (``bench/.peer-venv``, see ``bench/peer_trl.py``),
so it needs only torch and transformers. Both sides call the *same* reward functions defined here; each trainer
treats them as it treats any user reward (alignprop freezes an ``nn.Module`` reward; TRL leaves it as given).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch

PROMPTS = ["a cat", "a dog", "a horse", "a monkey", "a rabbit", "a zebra", "a spider", "a bird", "a sheep",
           "a deer", "a cow", "a goat", "a lion", "a tiger", "a bear", "a raccoon", "a fox", "a wolf"]


def cycling_prompts() -> Callable[[], tuple[str, dict]]:
    """TRL-style ``prompt_fn`` that returns PROMPTS in order, forever (both sides draw the same sequence)."""
    state = {"i": 0}

    def prompt_fn() -> tuple[str, dict]:
        prompt = PROMPTS[state["i"] % len(PROMPTS)]
        state["i"] += 1
        return prompt, {}

    return prompt_fn


class SaturationReward(torch.nn.Module):
    """Mean HSV saturation ``(max_c - min_c) / (max_c + 1e-3)`` per image: cheap, weight-free, differentiable."""

    def forward(self, images: torch.Tensor, prompts: Any = None, metadata: Any = None):
        high, low = images.amax(dim=1), images.amin(dim=1)
        return ((high - low) / (high + 1e-3)).mean(dim=(1, 2)), {}


class ClipAestheticReward(torch.nn.Module):
    """A CLIP-sized reward shaped like the LAION aesthetic predictor (TRL's ``aesthetic_scorer``): a random-init
    ViT-L/14 image tower with its 768-d projection, then the 768-1024-128-64-16-1 MLP on the normalised embedding.
    Images are resized (shorter side 224, as TRL's ``Resize(224)``) and CLIP-normalised. Seeded, so both sides
    build identical weights."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(seed)
        config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu")
        self.vision = CLIPVisionModelWithProjection(config)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))
        self.eval()

    def forward(self, images: torch.Tensor, prompts: Any = None, metadata: Any = None):
        height, width = images.shape[-2:]
        scale = 224 / min(height, width)
        size = (max(224, round(height * scale)), max(224, round(width * scale)))
        x = torch.nn.functional.interpolate(images.clamp(0, 1), size=size, mode="bilinear", antialias=True)
        top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
        x = (x[..., top:top + 224, left:left + 224] - self.mean) / self.std
        embed = self.vision(pixel_values=x).image_embeds
        embed = embed / embed.norm(dim=-1, keepdim=True)
        return self.mlp(embed).squeeze(1), {}


REWARDS = {"saturation": SaturationReward, "clip": ClipAestheticReward}


#: what the names of torch's operators contain, by the kind of work (CPU and CUDA attention kernels)
KERNELS = {"attention": ("_flash_attention", "_efficient_attention", "_cudnn_attention"),
           "convolution": ("convolution",), "matmul": ("aten::addmm", "aten::mm", "aten::bmm")}


def kernel_seconds(events, names: tuple[str, ...]) -> dict[str, float]:
    """Self CPU seconds of every operator in a profiler's ``key_averages()`` whose name contains one of ``names``."""
    return {event.key: event.self_cpu_time_total / 1e6 for event in events if any(n in event.key for n in names)}


def kernel_profile(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` once under torch.profiler (CPU) and say where its time went: the total self CPU seconds and the
    seconds of each kind of kernel in KERNELS. Attention and convolution have their own backward operators, so
    their backward is apart ("attention backward"); a matmul's backward is more matmuls, counted with the forward.
    Self CPU time is kernel time on the CPU only, so the CPU workers alone offer it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return kernel_summary(prof.key_averages())


def kernel_summary(events) -> dict[str, Any]:
    """kernel_profile's answer from a profiler's ``key_averages()``."""
    kinds = {}
    for kind, names in KERNELS.items():
        seconds = kernel_seconds(events, names)
        backward = sum(s for name, s in seconds.items() if "backward" in name)
        kinds[kind] = sum(seconds.values()) - backward
        if kind != "matmul":
            kinds[f"{kind} backward"] = backward
    return {"self_cpu_s": sum(event.self_cpu_time_total for event in events) / 1e6, "kernels_s": kinds}


def add_profile_argument(parser) -> None:
    """The workers' ``--profile`` flag (bench/ours.py, bench/peer_trl.py); check_profile_argument after parsing."""
    parser.add_argument("--profile", action="store_true",
                        help="alignprop mode, CPU: one extra, untimed step under torch.profiler (kernel seconds)")


def check_profile_argument(parser, args) -> None:
    """One line and exit 2 where ``--profile`` would measure nothing: off the CPU, or in another mode."""
    if args.profile and args.device != "cpu":
        parser.error("--profile reads self CPU time, which is kernel time only on the CPU: drop it with --device cuda")
    if args.profile and args.mode != "alignprop":
        parser.error(f"--profile profiles a training step of the alignprop mode: drop it with {args.mode}")


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    """Times optimizer steps and tracks peak memory: peak RSS on CPU, ``max_memory_allocated`` on CUDA."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.times: list[float] = []
        self.base_mib = 0.0

    def start(self) -> None:
        """Call after set-up, before the first step: memory from here on counts as the training's."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mib = torch.cuda.memory_allocated() / 2**20
        else:
            self.base_mib = rss_mib()

    def step(self, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)
        return out

    def result(self, warmup: int = 1) -> dict[str, Any]:
        out = {"step_s": statistics.median(self.times[warmup:] or self.times), "step_times_s": self.times,
               "setup_mib": self.base_mib}
        if self.cuda:
            out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["memory"] = "cuda max_memory_allocated"
        else:
            out["peak_mib"] = peak_rss_mib()
            out["memory"] = "peak RSS"
        out["train_peak_mib"] = out["peak_mib"] - self.base_mib
        return out


def emit(record: dict[str, Any]) -> None:
    """Print one JSON result line (the orchestrator reads the last line starting with '{')."""
    sys.stdout.flush()
    print(json.dumps(record), flush=True)
