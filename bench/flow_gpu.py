"""The flow families at real size on a GPU: FLUX.1-dev, SD3.5-medium, FLUX.2 [klein] 4B, Qwen-Image and Z-Image-Turbo,
random init from the published configs.

Each case trains through ``AlignPropTrainer`` (bf16 frozen weights, LoRA r=16 on the family's default targets,
batch 1, saturation reward, per-call checkpointing) with the model's own sampling settings (``CASES``: 28 steps for
FLUX.1-dev and SD3.5-medium, the model cards' 4 for the distilled klein 4B, 50 with true CFG 4 and the negative
prompt " " for Qwen-Image, 8 transformer calls without guidance for Z-Image-Turbo) and reports the median step time
after a warm-up and ``torch.cuda.max_memory_allocated`` over the steps, one JSON line per case, all of them written
to ``bench/results/flow-cuda.json``. The architectures come from ``bench/flow_configs/*.json`` (the transformers',
VAEs' and, for the LLM-conditioned models, text encoders' published ``config.json``, each with a ``_source``) and
the CLIP/T5 text encoders' published sizes below; the tokenizers are alignprop's tiny offline ones (their ids stay
within the real vocabularies; with random weights the vocabulary does not change the cost). ``--dry-run`` (any
machine) builds every case's models on the meta device and prints their parameter counts, with no weights and no
steps: the check that each case builds.

    .venv/bin/python bench/flow_gpu.py [--dry-run]
        [--models flux1-dev,sd35-medium,flux2-klein-4b,qwen-image,z-image-turbo] [--sizes 512,1024] [--ks 1,all]
        [--block-checkpointing off,on] [--epochs 3]
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
              "sd35-medium": dict(shift=3.0),
              # FLUX.2-klein-4B's scheduler_config.json was not found: FlowMatchEulerDiscreteScheduler's defaults with
              # dynamic shifting on, which the pipeline's empirical mu (compute_empirical_mu) needs; the mu does not
              # read the scheduler's base/max shift.
              "flux2-klein-4b": dict(use_dynamic_shifting=True),
              # Qwen/Qwen-Image scheduler/scheduler_config.json, as copied into ai-toolkit's and SimpleTuner's
              # Qwen-Image loaders
              "qwen-image": dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                 time_shift_type="exponential"),
              # Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
              "z-image-turbo": dict(shift=3.0, use_dynamic_shifting=False)}
# Sampling per model: steps and the trainer's guidance fields, as the model cards run them. FLUX.2-klein-4B is the
# step-distilled checkpoint (model_index.json: is_distilled, guidance ignored): 4 steps, guidance 1. Qwen-Image: 50
# steps, true CFG 4 against the negative prompt " ". Z-Image-Turbo: guidance 0; the card's num_inference_steps=9
# ends on sigma 0, i.e. 8 transformer calls, the family's 8 steps.
CASES = {"flux1-dev": dict(steps=28, sample_guidance_scale=3.5),
         "sd35-medium": dict(steps=28, sample_guidance_scale=4.5),
         "flux2-klein-4b": dict(steps=4, sample_guidance_scale=1.0),
         "qwen-image": dict(steps=50, sample_guidance_scale=1.0, true_cfg_scale=4.0, negative_prompts=" "),
         "z-image-turbo": dict(steps=8, sample_guidance_scale=0.0)}


def config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}


def build_pipeline(model: str):
    """The pipeline of ``model`` with random weights, on the current default device and dtype."""
    import diffusers

    if model in LLM_PIPELINES:
        return build_llm_pipeline(model)
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


LLM_PIPELINES = {"flux2-klein-4b": ("Flux2KleinPipeline", "Flux2Transformer2DModel", "AutoencoderKLFlux2",
                                     "Qwen3Config", "Qwen3ForCausalLM"),
                 "qwen-image": ("QwenImagePipeline", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage",
                                "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
                 "z-image-turbo": ("ZImagePipeline", "ZImageTransformer2DModel", "AutoencoderKL", "Qwen3Config",
                                   "Qwen3Model")}


def build_llm_pipeline(model: str):
    """The LLM-conditioned pipelines (FLUX.2 [klein], Qwen-Image, Z-Image): transformer, VAE and text encoder from
    their published configs (``from_config`` ignores the few published keys a class does not take), the classes as
    the models' ``model_index.json`` name them."""
    import diffusers
    import transformers

    from alignprop_core.families.tiny_parts import tiny_chat_tokenizer

    pipeline, transformer, vae, text_config, text_encoder = LLM_PIPELINES[model]
    parts = dict(
        transformer=getattr(diffusers, transformer).from_config(config(f"{model}-transformer")),
        vae=getattr(diffusers, vae).from_config(config(f"{model}-vae")),
        text_encoder=getattr(transformers, text_encoder)(getattr(transformers, text_config)(
            **config(f"{model}-text-encoder"))),
        tokenizer=tiny_chat_tokenizer(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SCHEDULERS[model]))
    if model == "flux2-klein-4b":
        parts["is_distilled"] = True  # FLUX.2-klein-4B's model_index.json
    return getattr(diffusers, pipeline)(**parts)


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
    sampling = dict(CASES[model])
    steps = sampling.pop("steps")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = AlignPropTrainer(AlignPropConfig(
            pretrained_model=model, rewards="saturation", num_epochs=epochs, sample_num_steps=steps,
            train_batch_size=1, resolution=size, mixed_precision="bf16",
            lora_rank=16, lora_alpha=16, block_checkpointing=block_checkpointing, eval_num_samples=0,
            output_dir=str(Path(tmp) / "out"), save_freq=10**6, **sampling, **truncation), sd_pipeline=pipe)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = [trainer.train_step()["step_time"] for _ in range(epochs)]
        peak = torch.cuda.max_memory_allocated() / 2**30
    return {"model": model, "size": size, "k": k, "block_checkpointing": block_checkpointing,
            "step_s": statistics.median(times[1:] or times), "peak_gib": peak, "steps": steps,
            "gpu": torch.cuda.get_device_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="build every case on the meta device, no steps")
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--ks", default="1,all")
    parser.add_argument("--block-checkpointing", default="off,on")
    parser.add_argument("--epochs", type=int, default=3, help="optimizer steps per case, the first a warm-up")
    args = parser.parse_args()
    import torch

    models = args.models.split(",")
    unknown = [m for m in models if m not in CASES]
    if unknown:
        sys.exit(f"error: --models: unknown {unknown[0]!r}; choose from {', '.join(CASES)}")
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
