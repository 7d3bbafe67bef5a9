"""Shared fixtures for the core tests (tests/) and the plugin tests (plugins/*/tests)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a loaded 2-core machine spinning made tiny-model steps 30-50x
# slower (measured 0.1 s vs 2-5 s per tiny generate call). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random-weight SD-1.x pipeline saved with save_pretrained (loaded back via from_pretrained)."""
    from alignprop_core.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def make_lora_pipe(tiny_sd_path):
    """Builds a fresh tiny SD pipeline with frozen weights and a rank-4 LoRA whose factors are all non-zero (so every
    factor gets a gradient); the LoRA parameters are on ``pipe.lora_params``."""
    def make():
        import torch
        from diffusers import StableDiffusionPipeline

        from alignprop_core.lora import add_lora

        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        torch.manual_seed(0)
        pipe.lora_params = add_lora(pipe.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
        for p in pipe.lora_params:
            torch.nn.init.normal_(p, std=0.02)
        return pipe

    return make


@pytest.fixture
def tiny_config(tiny_sd_path, tmp_path):
    """A fast config on the tiny pipeline: 4 denoising steps, batch 2, built-in saturation reward."""
    from alignprop_core import AlignPropConfig

    def make(**overrides):
        values = dict(pretrained_model=str(tiny_sd_path), rewards="saturation", num_epochs=2, sample_num_steps=4,
                      train_batch_size=2, truncation="fixed", truncation_k=2, mixed_precision="no",
                      eval_num_samples=0, output_dir=str(tmp_path / "out"), save_freq=100)
        values.update(overrides)
        return AlignPropConfig(**values)

    return make
