"""bench/flow_memory.py builds the published FLUX.1-dev and SD3.5-medium transformers: their sizes match the
published ones and the LoRA reaches every attention projection (meta device only: no memory, a few seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "flow_memory.py"

# Published sizes. FLUX.1-dev: "Model size 11.9B params" on the Hub (safetensors metadata) and flux1-dev.safetensors
# is 23.8 GB in bf16. SD3.5 medium: "Model size 2.47B params" on the Hub, transformer/diffusion_pytorch_model
# .safetensors 4.94 GB in bf16 ("2.5 billion parameters" in Stability's model card). Sources in docs/flow-memory.md.
PUBLISHED = {"flux1-dev": 11.9e9, "sd35-medium": 2.47e9}


def _flow_memory():
    spec = importlib.util.spec_from_file_location("bench_flow_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flow_memory():
    return _flow_memory()


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_transformer_size_is_the_published_one(flow_memory, model):
    transformer = flow_memory.build_transformer(model)
    size = flow_memory.count_with_buffers(transformer)  # SD3's position-embedding table is a buffer (0.23 B)
    assert abs(size - PUBLISHED[model]) / PUBLISHED[model] < 0.01, size
    assert flow_memory.PUBLISHED_TRANSFORMER_SIZE[model] == PUBLISHED[model]
    assert next(transformer.parameters()).device.type == "meta"


def test_lora_covers_every_attention_projection(flow_memory):
    """Rank 16 on to_q/k/v/out.0 and add_q/k/v/to_add_out: each adapted Linear adds 16 x (in + out) parameters."""
    r = 16
    flux = flow_memory.build_transformer("flux1-dev")
    # 19 double blocks x 8 projections (3072 -> 3072), 38 single blocks x to_q/k/v (no output projection)
    assert flow_memory.add_lora(flux) == 19 * 8 * r * 6144 + 38 * 3 * r * 6144
    sd3 = flow_memory.build_transformer("sd35-medium")
    # 24 blocks x to_q/k/v/out.0 + add_q/k/v (1536 -> 1536), 23 x to_add_out (the last block has none),
    # 13 dual-attention blocks x attn2's to_q/k/v/out.0
    assert flow_memory.add_lora(sd3) == (24 * 7 + 23 + 13 * 4) * r * 3072
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in sd3.parameters() if p.requires_grad)
