"""Time and memory of ONE forward+backward of the HPS reward at full size (open_clip ViT-H-14, random init).

No weights can be downloaded here, so the real architecture is built with random weights and frozen exactly like
the loaded reward. Input: a 1x3x512x512 image in [0, 1] that requires grad. Run it in a fresh process:

    python plugins/hps/bench_full_size.py [--size 512] [--device cpu]
"""

import argparse
import resource
import time

import psutil
import torch


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import open_clip

    from alignprop_reward_hps import DEFAULT_ARCHITECTURE, HPSReward

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    base = rss_gib()
    start = time.perf_counter()
    model = open_clip.create_model(DEFAULT_ARCHITECTURE, pretrained=None)
    reward = HPSReward(model, open_clip.get_tokenizer(DEFAULT_ARCHITECTURE)).to(args.device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in reward.parameters())
    after_build, peak_build = rss_gib(), peak_gib()
    print(f"built {DEFAULT_ARCHITECTURE}: {params / 1e6:.0f}M params in {build_s:.1f} s, "
          f"RSS +{after_build - base:.2f} GiB")

    prompts = ["a photo of an astronaut riding a horse on the moon"]
    for call in ("call 1 (encodes the prompt)", "call 2 (prompt cached)", "call 3 (prompt cached)"):
        images = torch.rand(1, 3, args.size, args.size, device=args.device, requires_grad=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        score = reward(images, prompts, [{}])
        score.sum().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert images.grad is not None and all(p.grad is None for p in reward.parameters())
        line = f"{call}: forward+backward {seconds:.2f} s, score {score.item():.4f}"
        if args.device.startswith("cuda"):
            line += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        print(line)
    print(
        f"process peak RSS {peak_gib():.2f} GiB (after build {peak_build:.2f} GiB): "
        f"forward+backward added {max(0.0, peak_gib() - after_build):.2f} GiB over the built model"
    )


if __name__ == "__main__":
    main()
