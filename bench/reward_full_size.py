"""Time and peak memory of one forward+backward of each reward plugin at full size w.r.t. a 1x3x512x512 image.

The real architectures are built with random weights (nothing is downloaded) and wrapped in the plugins' own reward
classes, frozen as when loaded. Each reward runs in a fresh subprocess, so that its peak RSS is its own. Run:

    .venv/bin/python bench/reward_full_size.py --reward all|new|<name> [--device cpu|cuda] [--dtype bfloat16]
        [--gradient-checkpointing]

``new`` runs the second reward zoo (imagereward, clip_score, aesthetic_v25, hpsv3, mps). ``--dtype`` casts the reward
model (the images stay float32, as in training); ``--gradient-checkpointing`` turns on the reward's own
checkpointing where it has the option (hpsv3).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, rss_mib  # noqa: E402

FIRST_ZOO = ("aesthetic", "pickscore", "hps", "flava_vqa")
NEW_ZOO = ("imagereward", "clip_score", "aesthetic_v25", "hpsv3", "mps")
REWARDS = FIRST_ZOO + NEW_ZOO
#: laion/CLIP-ViT-H-14-laion2B-s32B-b79K as a transformers CLIPConfig (PickScore's and MPS's architecture)
CLIP_VIT_H = dict(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)
PROMPT = "a photograph of an astronaut riding a horse on the moon"
COUNTING = {"questions": ["How many cats are there in this image?", "What animal is in this image?"],
            "answers": ["3", "cat"]}  # ddpo-pytorch's `counting` prompt source


def build_aesthetic(args):
    from alignprop_reward_aesthetic import AestheticMLP, AestheticReward
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from alignprop_core.preprocess import CLIP_PROCESSOR_CONFIG

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    reward = AestheticReward(CLIPVisionModelWithProjection(config), AestheticMLP(), CLIP_PROCESSOR_CONFIG)
    return reward, "CLIP ViT-L/14 image tower + LAION MLP", [PROMPT], [{}]


def build_pickscore(args):
    from alignprop_reward_pickscore import PickScoreReward
    from transformers import CLIPConfig, CLIPModel

    from alignprop_core.preprocess import CLIP_PROCESSOR_CONFIG
    from alignprop_core.tiny import tiny_clip_tokenizer  # no vocab file offline; only the text length matters

    config = CLIPConfig(**CLIP_VIT_H)  # yuvalkirstain/PickScore_v1 has laion's ViT-H/14 architecture
    reward = PickScoreReward(CLIPModel(config), tiny_clip_tokenizer(), CLIP_PROCESSOR_CONFIG)
    return reward, "CLIPModel ViT-H/14, text + image towers", [PROMPT], [{}]


def build_hps(args):
    import open_clip
    from alignprop_reward_hps import DEFAULT_ARCHITECTURE, HPSReward, _create_model

    reward = HPSReward(_create_model(DEFAULT_ARCHITECTURE), open_clip.get_tokenizer(DEFAULT_ARCHITECTURE))
    return reward, f"open_clip {DEFAULT_ARCHITECTURE}", [PROMPT], [{}]


def build_flava_vqa(args):
    from alignprop_reward_flava_vqa import FlavaVQAReward
    from transformers import BertTokenizer, FlavaConfig, FlavaForPreTraining, FlavaImageProcessor, FlavaProcessor

    with tempfile.TemporaryDirectory() as tmp:  # a placeholder vocab of bert-base-uncased's size (30522)
        chars = "abcdefghijklmnopqrstuvwxyz0123456789"
        words = "how many cats are there in this image ? what animal is cat 3".split()
        vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars,
                                    *(f"##{c}" for c in chars)]))
        vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp)
    processor = FlavaProcessor(image_processor=FlavaImageProcessor(size=224, crop_size=224), tokenizer=tokenizer)
    reward = FlavaVQAReward(FlavaForPreTraining(FlavaConfig(init_codebook=False)), processor, score=args.flava_score)
    name = f"FlavaForPreTraining (flava-full size, no codebook), score {args.flava_score}"
    return reward, name, ["3 cats"], [COUNTING]


def build_clip_score(args):
    from alignprop_reward_clipscore import CLIPScoreReward
    from transformers import CLIPConfig, CLIPModel

    from alignprop_core.preprocess import CLIP_PROCESSOR_CONFIG
    from alignprop_core.tiny import tiny_clip_tokenizer  # no vocab file offline; only the text length matters

    config = CLIPConfig(  # openai/clip-vit-large-patch14
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=768,
    )
    reward = CLIPScoreReward(CLIPModel(config), tiny_clip_tokenizer(), CLIP_PROCESSOR_CONFIG)
    return reward, "CLIPModel ViT-L/14, text + image towers", [PROMPT], [{}]


def build_aesthetic_v25(args):
    from alignprop_reward_aesthetic_v25 import SIGLIP_PROCESSOR_CONFIG, AestheticV25Head, AestheticV25Reward
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,  # so400m-patch14-384
                                num_attention_heads=16, image_size=384, patch_size=14)
    reward = AestheticV25Reward(SiglipVisionModel(config), AestheticV25Head(1152), SIGLIP_PROCESSOR_CONFIG)
    return reward, "SigLIP so400m-patch14-384 vision tower + v2.5 head", [PROMPT], [{}]


def build_imagereward(args):
    from alignprop_reward_imagereward import ImageRewardMLP, ImageRewardReward
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    vision = BlipVisionModel(BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,  # ViT-L
                                              num_attention_heads=16, image_size=224, patch_size=16,
                                              layer_norm_eps=1e-6, hidden_act="gelu"))
    text = BlipTextModel(BlipTextConfig(vocab_size=30524, hidden_size=768, intermediate_size=3072,  # med_config.json
                                        num_hidden_layers=12, num_attention_heads=12, encoder_hidden_size=1024,
                                        max_position_embeddings=512, bos_token_id=None, sep_token_id=None,
                                        eos_token_id=None), add_pooling_layer=False)
    with tempfile.TemporaryDirectory() as tmp:  # a placeholder vocab of bert-base-uncased's size (30522)
        words = PROMPT.split()
        vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
        vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    reward = ImageRewardReward(vision, text, ImageRewardMLP(768), tokenizer)
    return reward, "BLIP ViT-L/16 + BERT-base with cross-attention + MLP", [PROMPT], [{}]


def build_mps(args):
    from alignprop_reward_mps import CrossModel, MPSModel, MPSReward
    from transformers import CLIPConfig, CLIPModel

    from alignprop_core.preprocess import CLIP_PROCESSOR_CONFIG
    from alignprop_core.tiny import tiny_clip_tokenizer  # no vocab file offline; only the text length matters

    config = CLIPConfig(**CLIP_VIT_H)  # MPS's base
    # Kwai-Kolors/MPS trainer/models/clip_model.py: Cross_model(dim=1024, layer_num=4, heads=16), dim_head 64, ff x4
    model = MPSModel(CLIPModel(config), CrossModel(dim=1024, layers=4, heads=16, dim_head=64, ff_inner=4096))
    return MPSReward(model, tiny_clip_tokenizer(), CLIP_PROCESSOR_CONFIG), "CLIP ViT-H/14 + MPS cross module", \
        [PROMPT], [{}]


#: Qwen/Qwen2-VL-7B-Instruct's config.json (HPSv3's base), with the vocabulary HPSv3 resized to (151657 + <|Reward|>)
QWEN2_VL_7B = dict(
    text_config=dict(vocab_size=151658, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                     max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
)


def build_hpsv3(args):
    """7.6 B parameters: built on the meta device and materialised once in ``--dtype`` (float32 would need ~31 GiB);
    the head in float32, as the plugin loads it. Qwen2's BPE vocabulary is not on disk offline: a word-level
    tokenizer over the instruction's words stands in, which gives a sequence of about the length BPE gives."""
    import copy
    import re

    import torch
    from accelerate import init_empty_weights
    from alignprop_reward_hpsv3 import ANSWER, INSTRUCTION, HPSv3Model, HPSv3Reward
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>", "<|Reward|>"]
    text = INSTRUCTION.format(text_prompt=PROMPT) + ANSWER + " system user assistant You are a helpful assistant."
    words = dict.fromkeys(["[UNK]", *re.findall(r"\w+|[^\w\s]", text)])
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>{{ message['content'][1]['text'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n")  # Qwen2-VL's template for one user turn with one image
    dtype = getattr(torch, args.dtype)
    text, vision = copy.deepcopy(QWEN2_VL_7B["text_config"]), copy.deepcopy(QWEN2_VL_7B["vision_config"])
    if args.layers:  # a reduced-depth run: decoder layers and vision blocks in the same proportion as 28 / 32
        text["num_hidden_layers"], vision["depth"] = args.layers, args.layers * 32 // 28
    config = Qwen2VLConfig(text_config=text, vision_config=vision,
                           image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    config._attn_implementation = "sdpa"
    with init_empty_weights(include_buffers=False):
        model = HPSv3Model(config)
    model.to(dtype).rm_head.float()  # still on the meta device: nothing allocated yet
    model.to_empty(device=args.device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if name.startswith("rm_head.") else dtype), name
    reward = HPSv3Reward(model, tokenizer, gradient_checkpointing=args.gradient_checkpointing)
    tokens = reward.tokens([PROMPT], 256, torch.device("cpu"))[0].shape[1]
    depth = (f", {args.layers} of 28 decoder layers and {args.layers * 32 // 28} of 32 vision blocks"
             if args.layers else "")
    return reward, f"Qwen2-VL-7B + HPSv3 head (sequence {tokens} tokens, 256 of them image{depth})", [PROMPT], [{}]


def measure(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    base = rss_mib()
    torch.manual_seed(0)
    start = time.perf_counter()
    reward, what, prompts, metadata = globals()[f"build_{args.reward}"](args)
    dtype = getattr(torch, args.dtype)
    if args.reward != "hpsv3":  # hpsv3 is built in its dtype, its head in float32, as the plugin loads it
        reward.to(args.device, dtype)  # builders honour args.gradient_checkpointing where the reward has it
    build_s = time.perf_counter() - start
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    after_build = rss_mib()
    images = torch.rand(1, 3, args.size, args.size, device=args.device, requires_grad=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.calls):  # the first call also encodes (and caches) the texts, where the reward has any
        images.grad = None
        start = time.perf_counter()
        reward(images, prompts, metadata).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert torch.isfinite(images.grad).all() and all(p.grad is None for p in reward.parameters())
    peak = peak_rss_mib()
    params = sum(p.numel() for p in reward.parameters()) / 1e6
    checkpointing = ", reward gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"{args.reward}: {what}, {params:.1f} M params, {args.dtype}{checkpointing}, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; build (random init) {build_s:.1f} s")
    later = f", second {times[1]:.2f} s" if len(times) > 1 else ""
    print(f"  forward+backward 1x3x{args.size}x{args.size}: first call {times[0]:.2f} s{later}")
    if cuda:
        print(f"  peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    else:
        print(f"  peak RSS {peak:.0f} MiB: built model {after_build - base:.0f} MiB over the imports, "
              f"forward+backward +{peak - after_build:.0f} MiB over the built model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="all", choices=(*REWARDS, "all", "new"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--layers", type=int, default=None, choices=(7, 14, 21),
                        help="hpsv3 only: decoder layers of a reduced-depth run (vision blocks in proportion, 32/28)")
    parser.add_argument("--calls", type=int, default=2, choices=(1, 2), help="forward+backward calls (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--flava-score", default="itm", choices=("itm", "answer_likelihood"))
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one reward, this process
    args = parser.parse_args()
    if args.in_process and args.reward != "all":
        return measure(args)
    failed = []
    for name in {"all": REWARDS, "new": NEW_ZOO}.get(args.reward, (args.reward,)):
        command = [sys.executable, __file__, "--in-process", "--reward", name, "--device", args.device,
                   "--size", str(args.size), "--flava-score", args.flava_score, "--dtype", args.dtype,
                   "--calls", str(args.calls)] + (["--layers", str(args.layers)] if args.layers else [])
        command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        if subprocess.run(command + (["--threads", str(args.threads)] if args.threads else [])).returncode:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
