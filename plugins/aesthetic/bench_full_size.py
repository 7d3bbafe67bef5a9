"""Time and memory of one forward+backward of the FULL-SIZE aesthetic reward (CLIP ViT-L/14 image tower + LAION
MLP, random init: no weights are downloaded) w.r.t. one 1x3x512x512 image, reward frozen.

Run (from the repository root, in a fresh process so that the peak RSS is this script's own):
    PYTHONPATH=. .venv/bin/python plugins/aesthetic/bench_full_size.py [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from alignprop_reward_aesthetic import _DEFAULT_PREPROCESSING, AestheticMLP, AestheticReward

    if args.threads:
        torch.set_num_threads(args.threads)
    base = rss_mib()
    t0 = time.perf_counter()
    # openai/clip-vit-large-patch14's vision_config
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    torch.manual_seed(0)
    reward = AestheticReward(CLIPVisionModelWithProjection(config), AestheticMLP(), _DEFAULT_PREPROCESSING)
    reward.to(args.device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in reward.parameters())
    after_build = rss_mib()

    images = torch.rand(1, 3, args.size, args.size, device=args.device, requires_grad=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        images.grad = None
        t0 = time.perf_counter()
        reward(images, ["a photo"], [{}]).sum().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert images.grad is not None and all(p.grad is None for p in reward.parameters())
    peak = peak_mib()
    print(f"aesthetic full size (CLIP ViT-L/14 image tower + MLP), {n_params / 1e6:.1f} M params, "
          f"fp32, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"build (random init): {build_s:.1f} s; RSS after imports {base:.0f} MiB, after build {after_build:.0f} MiB")
    print(f"forward+backward 1x3x{args.size}x{args.size}: first {times[0]:.2f} s, second {times[1]:.2f} s")
    print(f"peak RSS {peak:.0f} MiB: +{peak - after_build:.0f} MiB over the built model "
          f"(+{peak - base:.0f} MiB over the imports)")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
