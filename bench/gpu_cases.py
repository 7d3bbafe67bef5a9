"""Every family at its published size on a GPU: SD 1.5, SDXL base, FLUX.1-dev, SD3.5-medium, FLUX.2 [klein] 4B,
Qwen-Image and Z-Image-Turbo, random init from the published configs (``bench/sd15``, ``bench/sdxl``,
``bench/flow_configs``).

Each case (model, size, K) builds the pipeline on the GPU in bf16, times the pipeline's own ``__call__`` of the batch
(plain diffusers inference, no LoRA: one warm-up, then ``--inference-repeats`` timed calls; only the first K of a size
does, while the pipeline has no LoRA yet), then trains through ``AlignPropTrainer`` (bf16 frozen weights, LoRA on the
family's default targets, batch 1, saturation reward, per-call checkpointing) and reports the median step time after
a warm-up, ``torch.cuda.max_memory_allocated`` over the steps, and step / inference. One JSON line per case; all of
them go to ``--results`` (``bench/results/full-size-cuda.json``). ``bench/gpu.sh`` runs the cases that the issue
names within a time budget, with TRL beside SD 1.5.

Sampling per model is the model's own (``CASES``): SD 1.5 and SDXL 50 DDIM steps, guidance 5, eta 1 (the TRL
benchmarks' setting; LoRA rank 4 as both trainers default); 28 steps for FLUX.1-dev and SD3.5-medium, the model cards'
4 for the distilled klein 4B, 50 with true CFG 4 and the negative prompt " " for Qwen-Image, 8 transformer calls
without guidance for Z-Image-Turbo (LoRA rank 16). The transformers', VAEs' and, for the LLM-conditioned models, text
encoders' published ``config.json`` are in ``bench/flow_configs/*.json``, each with a ``_source``; the CLIP/T5 text
encoders' published sizes are below; the tokenizers are alignprop's tiny offline ones (their ids stay within the real
vocabularies; with random weights the vocabulary does not change the cost). ``--dry-run`` (any machine) builds every
model on the meta device and prints its parameter counts, with no weights and no steps: the check that each case
builds.

    .venv/bin/python bench/gpu_cases.py [--dry-run]
        [--models sd15,sdxl-base,flux1-dev,sd35-medium,flux2-klein-4b,qwen-image,z-image-turbo] [--sizes 512,1024]
        [--ks 1,all] [--block-checkpointing off,on] [--epochs 3] [--folder DIR] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
CONFIGS = BENCH / "flow_configs"
RESULTS = BENCH / "results" / "full-size-cuda.json"

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
SD = dict(steps=50, sample_guidance_scale=5.0, sample_eta=1.0, lora_rank=4, lora_alpha=4)
FLOW = dict(lora_rank=16, lora_alpha=16)
CASES = {"sd15": SD, "sdxl-base": SD,
         "flux1-dev": dict(steps=28, sample_guidance_scale=3.5, **FLOW),
         "sd35-medium": dict(steps=28, sample_guidance_scale=4.5, **FLOW),
         "flux2-klein-4b": dict(steps=4, sample_guidance_scale=1.0, **FLOW),
         "qwen-image": dict(steps=50, sample_guidance_scale=1.0, true_cfg_scale=4.0, negative_prompts=" ", **FLOW),
         "z-image-turbo": dict(steps=8, sample_guidance_scale=0.0, **FLOW)}
PROMPT = "a cat"
#: model -> the alignprop family whose tiny pipeline ``--smoke`` runs in its place
TINY_FAMILY = {"sd15": "sd", "sdxl-base": "sdxl", "flux1-dev": "flux", "sd35-medium": "sd3",
               "flux2-klein-4b": "flux2-klein", "qwen-image": "qwen-image", "z-image-turbo": "z-image"}


def config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}


def build_pipeline(model: str):
    """The pipeline of ``model`` with random weights, on the current default device and dtype."""
    import diffusers
    import pipelines

    if model in ("sd15", "sdxl-base"):
        return pipelines.sd15_pipeline() if model == "sd15" else pipelines.sdxl_pipeline()
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


def inference_kwargs(pipe, model: str, size: int, steps: int) -> dict:
    """The pipeline ``__call__`` arguments that sample what the trainer samples in ``model``'s case (the family's
    ``pipeline_call_kwargs`` of the case's config fields), one prompt."""
    import torch

    from alignprop_core.families import family_of

    case = CASES[model]
    kwargs = family_of(pipe).pipeline_call_kwargs(
        [PROMPT], steps, case["sample_guidance_scale"], size, size, negative_prompt=case.get("negative_prompts"),
        eta=case.get("sample_eta", 1.0), true_cfg_scale=case.get("true_cfg_scale", 1.0))
    return {**kwargs, "generator": torch.Generator().manual_seed(0)}


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_inference(pipe, model: str, size: int, steps: int, repeats: int, device: str) -> float:
    """Median seconds of plain ``pipe(...)`` calls of the batch (one prompt), after one warm-up call."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    times = []
    for _ in range(1 + repeats):
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            pipe(**inference_kwargs(pipe, model, size, steps))
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def load_pipeline(model: str, folder: str | None, device: str):
    """``model`` built on the GPU in bf16, or read from ``folder`` through ``from_pretrained`` (bf16 on the GPU,
    as saved on the CPU)."""
    import torch

    if folder:
        from diffusers import DiffusionPipeline

        dtype = torch.bfloat16 if device == "cuda" else None
        return DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return build_pipeline(model)
    finally:
        torch.set_default_dtype(torch.float32)


def run_case(model: str, size: int, k: str, block_checkpointing: bool, epochs: int, inference_repeats: int,
             folder: str | None = None, device: str = "cuda", steps: int | None = None) -> dict:
    """One case: plain inference (when ``inference_repeats``), then ``epochs`` training steps. ``device="cpu"``
    (``--smoke``) needs ``folder``."""
    import torch

    from alignprop_core import AlignPropConfig, AlignPropTrainer

    if device == "cuda":
        torch.cuda.empty_cache()
    pipe = load_pipeline(model, folder, device)
    sampling = dict(CASES[model])
    model_steps = sampling.pop("steps")
    steps = steps or model_steps
    inference_s = time_inference(pipe, model, size, steps, inference_repeats, device) if inference_repeats else None
    truncation = {"truncation": "none"} if k == "all" else {"truncation": "fixed", "truncation_k": int(k)}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = AlignPropTrainer(AlignPropConfig(
            pretrained_model=model, rewards="saturation", num_epochs=epochs, sample_num_steps=steps,
            train_batch_size=1, resolution=size, mixed_precision="bf16" if device == "cuda" else "no",
            block_checkpointing=block_checkpointing, eval_num_samples=0, output_dir=str(Path(tmp) / "out"),
            save_freq=10**6, **sampling, **truncation), sd_pipeline=pipe, prompt_function=lambda: (PROMPT, {}))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = [trainer.train_step()["step_time"] for _ in range(epochs)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del trainer, pipe
    step_s = statistics.median(times[1:] or times)
    return {"model": model, "size": size, "k": k, "block_checkpointing": block_checkpointing, "step_s": step_s,
            "step_times_s": times, "peak_gib": peak, "steps": steps, "inference_s": inference_s,
            "step_over_inference": step_s / inference_s if inference_s else None,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def run_cases(args: argparse.Namespace, models: list[str], device: str, steps: int | None = None,
              folders: dict[str, str] | None = None) -> list[dict]:
    """Every (model, size, K, block checkpointing) of ``args``, printed as JSON lines as they finish."""
    rows = []
    blocks_options = args.block_checkpointing.split(",")
    for model in models:
        folder = (folders or {}).get(model, args.folder)
        for size in (int(s) for s in args.sizes.split(",")):
            for index, k in enumerate(args.ks.split(",")):
                for blocks in blocks_options:
                    first = index == 0 and blocks == blocks_options[0]  # the pipeline has no LoRA yet
                    row = run_case(model, size, k, blocks == "on", args.epochs,
                                   args.inference_repeats if first else 0, folder, device, steps)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="build every model on the meta device, no steps")
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--ks", default="1,all")
    parser.add_argument("--block-checkpointing", default="off,on")
    parser.add_argument("--epochs", type=int, default=3, help="optimizer steps per case, the first a warm-up")
    parser.add_argument("--inference-repeats", type=int, default=1,
                        help="timed plain-inference calls per model and size after one warm-up (0: none)")
    parser.add_argument("--smoke", action="store_true",
                        help="the run path on the CPU with each model's tiny pipeline, 2 steps (figures mean nothing)")
    parser.add_argument("--folder", default=None, help="load the (one) model from this pipeline folder instead")
    parser.add_argument("--results", default=str(RESULTS), help="JSON file for all rows ('' writes none)")
    args = parser.parse_args()
    import torch

    models = args.models.split(",")
    unknown = [m for m in models if m not in CASES]
    if unknown:
        sys.exit(f"error: --models: unknown {unknown[0]!r}; choose from {', '.join(CASES)}")
    if args.folder and len(models) != 1:
        sys.exit("error: --folder holds one pipeline: name its model alone in --models")
    if args.dry_run:
        for model in models:
            with torch.device("meta"):
                counts = parameter_counts(build_pipeline(model))
            print(json.dumps({"model": model, "params_b": {k: round(v, 3) for k, v in counts.items()}}), flush=True)
        return
    if args.smoke:
        from alignprop_core.tiny import build_tiny

        with tempfile.TemporaryDirectory() as tmp:
            folders = {m: str(build_tiny(Path(tmp) / m, TINY_FAMILY[m])) for m in models}
            rows = run_cases(args, models, "cpu", steps=2, folders=folders)
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run with --dry-run to check that every case builds")
    else:
        rows = run_cases(args, models, "cuda")
    if args.results:
        Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")

if __name__ == "__main__":
    main()
