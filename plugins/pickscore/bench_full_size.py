"""Time and memory of one forward+backward of the FULL-SIZE pickscore reward (PickScore_v1's architecture: a
transformers CLIPModel ViT-H/14, random init: no weights are downloaded) w.r.t. one 1x3x512x512 image, frozen.

Run (from the repository root, in a fresh process so that the peak RSS is this script's own):
    PYTHONPATH=. .venv/bin/python plugins/pickscore/bench_full_size.py [--threads N] [--device cpu|cuda]
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


def _char_tokenizer():
    """A character-level CLIP tokenizer (no vocab file is available offline); text length is what matters here."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    import torch
    from transformers import CLIPConfig, CLIPModel

    from alignprop_reward_pickscore import _DEFAULT_PREPROCESSING, PickScoreReward

    if args.threads:
        torch.set_num_threads(args.threads)
    base = rss_mib()
    t0 = time.perf_counter()
    # yuvalkirstain/PickScore_v1 == laion/CLIP-ViT-H-14-laion2B-s32B-b79K's architecture
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu"),
        projection_dim=1024,
    )
    torch.manual_seed(0)
    reward = PickScoreReward(CLIPModel(config), _char_tokenizer(), _DEFAULT_PREPROCESSING)
    reward.to(args.device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in reward.parameters())
    after_build = rss_mib()

    images = torch.rand(1, 3, args.size, args.size, device=args.device, requires_grad=True)
    prompt = ["a photograph of an astronaut riding a horse on the moon"]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):  # the first call also encodes the prompt; the second hits the text cache
        images.grad = None
        t0 = time.perf_counter()
        reward(images, prompt, [{}]).sum().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert images.grad is not None and all(p.grad is None for p in reward.parameters())
    peak = peak_mib()
    print(f"pickscore full size (CLIPModel ViT-H/14, text + image towers), {n_params / 1e6:.1f} M params, "
          f"fp32, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"build (random init): {build_s:.1f} s; RSS after imports {base:.0f} MiB, after build {after_build:.0f} MiB")
    print(f"forward+backward 1x3x{args.size}x{args.size}: first (encodes the prompt) {times[0]:.2f} s, "
          f"second (text cache hit) {times[1]:.2f} s")
    print(f"peak RSS {peak:.0f} MiB: +{peak - after_build:.0f} MiB over the built model "
          f"(+{peak - base:.0f} MiB over the imports)")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
