"""Time and memory of ONE forward+backward of the FLAVA-VQA reward at full size (flava-full's architecture,
random init: transformers' default FlavaConfig, without the image codebook the reward never loads).

No weights or vocab can be downloaded here: the model has random weights and the BERT tokenizer a placeholder
vocab of bert-base-uncased's size (30522). Input: a 1x3x512x512 image in [0, 1] that requires grad, scored on the
two questions of ddpo-pytorch's ``counting`` prompt source. Run it in a fresh process:

    python plugins/flava-vqa/bench_full_size.py [--score itm|answer_likelihood] [--size 512] [--device cpu]
"""

import argparse
import resource
import tempfile
import time
from pathlib import Path

import psutil
import torch


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--score", default="itm", choices=["itm", "answer_likelihood"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from transformers import BertTokenizer, FlavaConfig, FlavaForPreTraining, FlavaImageProcessor, FlavaProcessor

    from alignprop_reward_flava_vqa import FlavaVQAReward

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, score {args.score}")
    with tempfile.TemporaryDirectory() as tmp:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = "how many cats are there in this image ? what animal is cat 3".split()
        letters = [*"abcdefghijklmnopqrstuvwxyz0123456789", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789")]
        vocab = list(dict.fromkeys(specials + words + letters))
        vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp)
    processor = FlavaProcessor(image_processor=FlavaImageProcessor(size=224, crop_size=224), tokenizer=tokenizer)

    base = rss_gib()
    start = time.perf_counter()
    model = FlavaForPreTraining(FlavaConfig(init_codebook=False))
    reward = FlavaVQAReward(model, processor, score=args.score).to(args.device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in reward.parameters())
    after_build, peak_build = rss_gib(), peak_gib()
    print(f"built FlavaForPreTraining (flava-full size): {params / 1e6:.0f}M params in {build_s:.1f} s, "
          f"RSS +{after_build - base:.2f} GiB")

    metadata = [{"questions": ["How many cats are there in this image?", "What animal is in this image?"],
                 "answers": ["3", "cat"]}]
    for call in ("call 1 (encodes the texts)", "call 2 (texts cached)", "call 3 (texts cached)"):
        images = torch.rand(1, 3, args.size, args.size, device=args.device, requires_grad=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        score = reward(images, ["3 cats"], metadata)
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
