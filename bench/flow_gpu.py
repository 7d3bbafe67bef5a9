"""The flow families at real size on a GPU: FLUX.1-dev and SD3.5-medium, random init from the published configs.

Each case trains through ``AlignPropTrainer`` (bf16 frozen weights, LoRA r=16 on the family's default targets,
batch 1, 28 steps, saturation reward, per-call checkpointing) and reports the median step time after a warm-up and
``torch.cuda.max_memory_allocated`` over the steps, one JSON line per case, all of them written to
``bench/results/flow-cuda.json``. The architectures come from ``bench/flow_configs/*.json`` (the transformers' and
VAEs' published ``config.json``) and the text encoders' published sizes below; the tokenizers are alignprop's tiny
offline ones (their ids stay within the real vocabularies; with random weights the vocabulary does not change the
cost). ``--dry-run`` (any machine) builds every case's models on the meta device and prints their parameter
counts, with no weights and no steps: the check that each case builds.

    .venv/bin/python bench/flow_gpu.py [--dry-run] [--models flux1-dev,sd35-medium] [--sizes 512,1024]
        [--ks 1,all] [--block-checkpointing off,on] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "flow_configs"
RESULTS = Path(__file__).resolve().parent / "results" / "flow-cuda.json"

# Text encoders as published (the same sizes as SD3's reference code and the models' config.json files).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
SCHEDULERS = {"flux1-dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                base_image_seq_len=256, max_image_seq_len=4096),
              "sd35-medium": dict(shift=3.0)}
STEPS = 28


def config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}


def build_pipeline(model: str):
    """The pipeline of ``model`` with random weights, on the current default device and dtype."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from alignprop_core.families.tiny_parts import tiny_clip_tokenizer, tiny_t5_tokenizer

    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    vae = diffusers.AutoencoderKL(**config(f"{model}-vae"))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SCHEDULERS[model])
    t5 = T5EncoderModel(T5Config(**T5_XXL))
    if model == "flux1-dev":
        return diffusers.FluxPipeline(
            transformer=diffusers.FluxTransformer2DModel(**config(f"{model}-transformer")), scheduler=scheduler,
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)), tokenizer=clip_tokenizer,
            text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    return diffusers.StableDiffusion3Pipeline(
        transformer=diffusers.SD3Transformer2DModel(**config(f"{model}-transformer")), scheduler=scheduler, vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)), tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), tokenizer_2=clip_tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def parameter_counts(pipe) -> dict[str, float]:
    """Billions of parameters per model component."""
    return {name: sum(p.numel() for p in part.parameters()) / 1e9 for name, part in pipe.components.items()
            if hasattr(part, "parameters")}


def run_case(model: str, size: int, k: str, block_checkpointing: bool, epochs: int) -> dict:
    import torch

    from alignprop_core import AlignPropConfig, AlignPropTrainer

    torch.cuda.empty_cache()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        pipe = build_pipeline(model)
    torch.set_default_dtype(torch.float32)
    truncation = {"truncation": "none"} if k == "all" else {"truncation": "fixed", "truncation_k": int(k)}
    guidance = 3.5 if model == "flux1-dev" else 4.5
    with tempfile.TemporaryDirectory() as tmp:
        trainer = AlignPropTrainer(AlignPropConfig(
            pretrained_model=model, rewards="saturation", num_epochs=epochs, sample_num_steps=STEPS,
            sample_guidance_scale=guidance, train_batch_size=1, resolution=size, mixed_precision="bf16",
            lora_rank=16, lora_alpha=16, block_checkpointing=block_checkpointing, eval_num_samples=0,
            output_dir=str(Path(tmp) / "out"), save_freq=10**6, **truncation), sd_pipeline=pipe)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = [trainer.train_step()["step_time"] for _ in range(epochs)]
        peak = torch.cuda.max_memory_allocated() / 2**30
    return {"model": model, "size": size, "k": k, "block_checkpointing": block_checkpointing,
            "step_s": statistics.median(times[1:] or times), "peak_gib": peak, "steps": STEPS,
            "gpu": torch.cuda.get_device_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="build every case on the meta device, no steps")
    parser.add_argument("--models", default="flux1-dev,sd35-medium")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--ks", default="1,all")
    parser.add_argument("--block-checkpointing", default="off,on")
    parser.add_argument("--epochs", type=int, default=3, help="optimizer steps per case, the first a warm-up")
    args = parser.parse_args()
    import torch

    models = args.models.split(",")
    unknown = [m for m in models if m not in SCHEDULERS]
    if unknown:
        sys.exit(f"error: --models: unknown {unknown[0]!r}; choose from {', '.join(SCHEDULERS)}")
    if args.dry_run:
        for model in models:
            with torch.device("meta"):
                counts = parameter_counts(build_pipeline(model))
            print(json.dumps({"model": model, "params_b": {k: round(v, 3) for k, v in counts.items()}}))
        return
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run with --dry-run to check that every case builds")
    rows = []
    for model in models:
        for size in (int(s) for s in args.sizes.split(",")):
            for k in args.ks.split(","):
                for blocks in args.block_checkpointing.split(","):
                    row = run_case(model, size, k, blocks == "on", args.epochs)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
