"""GPU memory of LoRA reward backprop through FLUX.1-dev and SD3.5-medium at real sizes, on paper.

Nothing is downloaded and nothing real is computed. The transformers and VAEs are built from their published configs
(bench/flow_configs/) on the meta device; parameter counts come from those models. Activation sizes come from running
the real diffusers code on fake tensors (torch FakeTensorMode: shapes and dtypes, no data) at the real width and
sequence length, with the attention kernel and the autocast rules of a CUDA bf16 run: the bytes autograd saves for
backward (torch.autograd.graph.saved_tensors_hooks, deduplicated by storage, parameters left out), and the peak of the
live tensors during forward+backward (torch.distributed._tools.mem_tracker.MemTracker). The transformers run at reduced
depth (FLUX 2 double + 2 single blocks, SD3.5 5 blocks) and the per-block sizes are scaled to the full depth;
--check-full-depth also runs the full-depth models and compares. docs/flow-memory.md explains the method. Run:

    OMP_NUM_THREADS=1 .venv/bin/python bench/flow_memory.py [--check-full-depth] [--out bench/results/flow_memory.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "flow_configs"
DEFAULT_OUT = HERE / "results" / "flow_memory.json"
GIB = 1024 ** 3

LORA_RANK = 16
LORA_ALPHA = 16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
STEPS = 28  # K = all: every one of the 28 sampling steps under grad
SIZES = (512, 1024)
BYTES_BF16 = 2
BYTES_LORA = 4 * 4  # fp32 parameter + fp32 grad + two fp32 AdamW states

# Published sizes (sources in docs/flow-memory.md); tests/test_flow_memory.py checks the counts against them.
PUBLISHED_TRANSFORMER_SIZE = {"flux1-dev": 11.9e9, "sd35-medium": 2.47e9}

# Text encoders: architecture fields of their published transformers configs (the same models in FLUX.1-dev and
# SD3.5: CLIP ViT-L/14 text tower, OpenCLIP ViT-bigG/14 text tower, T5 v1.1 XXL encoder).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              is_encoder_decoder=False, tie_word_embeddings=False)

MODELS = {
    "flux1-dev": dict(
        title="FLUX.1-dev", transformer="flux1-dev-transformer.json", vae="flux1-dev-vae.json",
        # guidance-distilled: guidance is an input, one transformer pass per step, no CFG batch
        cfg_batch=1, text_tokens=512,
        text_encoders={"CLIP-L (CLIPTextModel)": ("clip", CLIP_L, False), "T5-XXL encoder": ("t5", T5_XXL, None)},
        reduced={"num_layers": 2, "num_single_layers": 2},
        # block kind -> (count in the full model, count in the reduced model, index of the reduced block whose
        # increment is scaled: the second block of a kind, so that what all blocks share is charged already)
        kinds={"double": (19, 2, 1), "single": (38, 2, 1)}),
    "sd35-medium": dict(
        title="SD3.5 medium", transformer="sd35-medium-transformer.json", vae="sd35-medium-vae.json",
        # true CFG: two passes per step, run as one batch of 2; CLIP 77 tokens + T5 256 tokens
        cfg_batch=2, text_tokens=77 + 256,
        text_encoders={"CLIP-L (CLIPTextModelWithProjection)": ("clip", CLIP_L, True),
                       "OpenCLIP bigG (CLIPTextModelWithProjection)": ("clip", CLIP_BIGG, True),
                       "T5-XXL encoder": ("t5", T5_XXL, None)},
        reduced={"num_layers": 5, "dual_attention_layers": [0, 1]},
        # blocks 0-12 have dual attention (MMDiT-X), 13-22 are plain joint blocks, 23 is the context_pre_only block
        kinds={"dual": (13, 2, 1), "joint": (10, 2, 3), "last": (1, 1, 4)}),
}


# ---------------------------------------------------------------------------------------------------------- building
def load_config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_with_buffers(module) -> int:
    """Parameters and buffers, what the weights occupy in memory (SD3's 384x384 position-embedding table is a buffer
    of 0.23 B values, stored in the published checkpoint)."""
    return count(module) + sum(b.numel() for b in module.buffers())


def build_transformer(model: str, overrides: dict | None = None):
    """The transformer on the meta device in bf16, frozen."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.utils import logging

    cls = FluxTransformer2DModel if model == "flux1-dev" else SD3Transformer2DModel
    config = {**load_config(MODELS[model]["transformer"]), **(overrides or {})}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "modules that should be kept in float32: []" note on .to(bf16)
    try:
        with torch.device("meta"):
            transformer = cls.from_config(config).to(torch.bfloat16)
    finally:
        logging.set_verbosity(verbosity)
    transformer.requires_grad_(False)
    return transformer


def add_lora(transformer) -> int:
    """Adds the rank-16 LoRA (peft suffix matching on LORA_TARGETS) on meta, trainable factors cast to fp32 as
    alignprop_core.lora.add_lora does; returns the LoRA parameter count."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    with torch.device("meta"):
        transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
                                           init_lora_weights="gaussian"))
    cast_training_params(transformer, dtype=torch.float32)
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def build_vae(model: str):
    import torch
    from diffusers import AutoencoderKL
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(load_config(MODELS[model]["vae"])).to(torch.bfloat16)
    finally:
        logging.set_verbosity(verbosity)
    vae.requires_grad_(False)
    return vae


def text_encoder_params(model: str) -> dict[str, int]:
    """Parameter counts of the frozen text encoders, built on meta from their published architecture fields."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    counts = {}
    for name, (kind, fields, projection) in MODELS[model]["text_encoders"].items():
        with torch.device("meta"):
            if kind == "clip":
                encoder = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**fields))
            else:
                encoder = T5EncoderModel(T5Config(**fields))
        counts[name] = count(encoder)
    return counts


def parameter_counts(model: str) -> dict:
    """Transformer (parameters + buffers), LoRA, VAE and text-encoder counts; meta device only, a few seconds."""
    transformer = build_transformer(model)
    params, with_buffers = count(transformer), count_with_buffers(transformer)
    lora = add_lora(transformer)
    vae = build_vae(model)
    return {"transformer": with_buffers, "transformer_parameters": params,
            "transformer_buffers": with_buffers - params, "lora": lora, "vae": count_with_buffers(vae),
            "vae_decoder": count_with_buffers(vae.decoder), "text_encoders": text_encoder_params(model)}


# ---------------------------------------------------------------------------------------------- fake-tensor running
def fakeify(module, mode) -> None:
    """Replaces every parameter and buffer by a data-less fake CPU tensor of the same shape, dtype and requires_grad."""
    import torch

    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                               requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def storage_key(t) -> int:
    return t.untyped_storage()._cdata


def nbytes(items: dict) -> int:
    return sum(items.values())


def storages(tensors) -> dict:
    return {storage_key(t): t.untyped_storage().nbytes() for t in tensors}


def tensors_in(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


class SavedMeter:
    """Records the storages of the tensors autograd saves for backward, under the label current when they are saved
    (a block's name, or None outside the blocks); a storage saved under two labels is listed under both. Storages in
    ``exclude`` (parameters, buffers, the call's inputs) are left out."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.label = None
        self.by_label: dict = {}  # label -> {storage key: nbytes}
        self.inputs: dict = {}  # label -> {storage key: nbytes} of the tensors passed to that block
        self.keep: list = []  # the block inputs, held so that no later tensor can reuse their storage's address
        self.largest = (0, None)

    def pack(self, t):
        key = storage_key(t)
        if key not in self.exclude:
            size = t.untyped_storage().nbytes()
            self.by_label.setdefault(self.label, {})[key] = size
            if size > self.largest[0]:
                self.largest = (size, f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} in {self.label}")
        return t

    def enter(self, label, tensors) -> None:
        self.label = label
        self.inputs[label] = storages(tensors)
        self.keep.extend(tensors)

    def union(self, labels=None) -> dict:
        out = {}
        for label, items in self.by_label.items():
            if labels is None or label in labels:
                out.update(items)
        return out

    def input_union(self, labels) -> dict:
        out = {}
        for label in labels:
            out.update(self.inputs.get(label, {}))
        return out


@contextlib.contextmanager
def label_blocks(meter: SavedMeter, blocks: dict):
    """Sets meter.label while each block runs (its first run: not the recomputation in backward) and records the
    tensors passed to it."""
    handles = []
    for label, block in blocks.items():
        def pre(module, args, kwargs, label=label):
            if label not in meter.inputs:
                meter.enter(label, list(tensors_in((args, kwargs))))

        def post(module, args, kwargs, output):
            meter.label = None

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def peak_tracker():
    """torch's MemTracker (a TorchDispatchMode that follows every storage's life, also through checkpoint
    recomputation), without its gradient hooks, which it would put on the frozen parameters too."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return Tracker()


def activation_bytes(snapshot: dict) -> int:
    """Live bytes that are neither parameters/buffers nor the tracked external inputs."""
    (per_device,) = snapshot.values()
    fixed = sum(v for k, v in per_device.items() if k != "Total" and k.value in ("Parameter", "Buffer", "Other"))
    return per_device["Total"] - fixed


class Log:
    def __init__(self):
        self.calls: dict[str, int] = {}

    def add(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1


@contextlib.contextmanager
def gpu_attention(path: str, log: Log):
    """Routes torch.nn.functional.scaled_dot_product_attention (called by diffusers' native attention backend and by
    its SD3 processors) to the kernel PyTorch's SDPA picks on an H100/H200 for these shapes: flash attention for head
    dims up to 256 (FLUX 128, SD3 64), memory-efficient attention above (the VAE's single 512-wide head). Both save
    q, k, v, the output and a logsumexp for backward, never the attention matrix. path="math" runs PyTorch's math
    reference instead, which saves the attention probabilities. Inputs are cast to bf16 as CUDA autocast does for
    SDPA. (On fake CPU tensors an unpatched F.scaled_dot_product_attention would follow the CPU kernel choice.)"""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or enable_gqa:
            raise NotImplementedError("only the unmasked, dropout-free attention of these models is modelled")
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = (x.to(dtype) for x in (query, key, value))
        head_dim = query.shape[-1]
        with torch.autocast("cpu", enabled=False):
            if path == "math":
                kind = "math"
                out = torch.ops.aten._scaled_dot_product_attention_math(query, key, value, None, 0.0, is_causal,
                                                                         None, scale=scale)[0]
            elif head_dim <= 256:
                kind = "flash"
                out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                          scale=scale)[0]
            else:
                kind = "memory-efficient"
                out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0,
                                                                              is_causal, scale=scale)[0]
        log.add(f"{kind} attention (head_dim {head_dim}, {query.shape[-2]} tokens, "
                f"{str(query.dtype).replace('torch.', '')})")
        return out

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# torch.nn.functional ops that CUDA autocast runs in fp32 (AT_FORALL_FP32 / AT_FORALL_FP32_SET_OPT_DTYPE in
# torch/include/ATen/autocast_mode.h) and that these models call with bf16 inputs; CPU autocast keeps them in bf16.
CUDA_FP32_FUNCTIONAL = ("layer_norm", "group_norm", "rms_norm", "interpolate", "softmax", "log_softmax")
# other ops of those lists: a bf16 input to one of them would run in bf16 here, unlike on CUDA; they are logged
# ("NOT EMULATED") so that a model calling one shows up in the result
CUDA_FP32_OTHERS = ("pow", "__pow__", "rsqrt", "exp", "log", "sum", "cumsum", "prod", "softmax", "log_softmax")


@contextlib.contextmanager
def cuda_autocast_policy(log: Log):
    """Applies CUDA's autocast rule to the CUDA_FP32_FUNCTIONAL ops (cast bf16/fp16 inputs to fp32, run with autocast
    off) by patching them in torch.nn.functional, so that autograd saves what it saves in a CUDA bf16 autocast run.
    Patched functions rather than a TorchFunctionMode, because checkpointed regions are recomputed inside backward."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    low = (torch.bfloat16, torch.float16)

    def has_low(args, kwargs):
        return any(x.dtype in low for x in tensors_in((args, kwargs)))

    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in low else x

    def fp32(fn, name):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu") and has_low(args, kwargs):
                log.add(f"fp32 {name}")
                with torch.autocast("cpu", enabled=False):
                    return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
            return fn(*args, **kwargs)
        return run

    others = {getattr(torch, n) for n in CUDA_FP32_OTHERS if hasattr(torch, n)}
    others |= {getattr(torch.Tensor, n) for n in CUDA_FP32_OTHERS if hasattr(torch.Tensor, n)}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in others and torch.is_autocast_enabled("cpu") and has_low(args, kwargs):
                log.add(f"NOT EMULATED: bf16 input to {getattr(func, '__name__', func)}")
            return func(*args, **kwargs)

    originals = {name: getattr(F, name) for name in CUDA_FP32_FUNCTIONAL}
    for name, fn in originals.items():
        setattr(F, name, fp32(fn, name))
    try:
        with Watch():
            yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@contextlib.contextmanager
def gpu_rules(attention: str, log: Log):
    """The attention kernel and the CUDA autocast rules; both stay active through backward, where checkpointed
    regions are recomputed (torch.utils.checkpoint restores the autocast state itself)."""
    with gpu_attention(attention, log), cuda_autocast_policy(log):
        yield


def autocast(mode: str):
    """mode="autocast": bf16 weights, fp32 LoRA, bf16 autocast (what alignprop's trainer runs under with
    mixed_precision bf16). mode="bf16": no autocast (bf16 compute; peft then upcasts the LoRA inputs to fp32)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()


def block_checkpointing(module) -> None:
    """diffusers' gradient checkpointing: torch.utils.checkpoint (non-reentrant) around each transformer block, or
    around the VAE decoder's mid block and each up block."""
    module.enable_gradient_checkpointing()


def forward_backward(module, fake, inputs: dict, forward, exclude: list, blocks: dict, attention: str, mode: str,
                     track: bool) -> dict:
    """One forward+backward of ``forward(**inputs)`` on fake tensors. track=False: the saved-tensor accounting, per
    block (the block inputs are held to the end so that no later storage can reuse their address); track=True: the
    peak of the live activation bytes, from MemTracker, in a pass without any held reference."""
    import torch

    log = Log()
    meter = SavedMeter(set(storages(exclude)))
    tracker = peak_tracker() if track else None
    for p in module.parameters():
        p.grad = None  # a previous pass's LoRA grads would otherwise be counted in this pass's peak
    with fake:
        if tracker:
            tracker.track_external(module, *tensors_in(inputs))
        with gpu_rules(attention, log), tracker or contextlib.nullcontext():
            with label_blocks(meter, {} if track else blocks), autocast(mode), \
                    torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                out = forward(**inputs)
            live = activation_bytes(tracker.get_tracker_snapshot("current")) if tracker else None
            out.float().sum().backward()
            shape = tuple(out.shape)
    result = {"meter": meter, "ops": log.calls, "output_shape": shape}
    if tracker:
        result.update(peak=activation_bytes(tracker.get_tracker_snapshot("peak")), live_after_forward=live)
    return result


# --------------------------------------------------------------------------------------------- transformer calls
def latent_hw(size: int) -> int:
    return size // 8  # both VAEs downsample 8x


def image_tokens(size: int) -> int:
    return (latent_hw(size) // 2) ** 2  # FLUX packs 2x2 latent pixels, SD3 patchifies 2x2: the same count


def transformer_inputs(model: str, size: int, requires_grad: bool = True) -> dict:
    """The keyword inputs of one transformer call at ``size`` px, batch 1 (SD3: the CFG batch of 2), as the diffusers
    pipelines build them. Call inside an active FakeTensorMode."""
    import torch

    spec = MODELS[model]
    batch, text, bf16 = spec["cfg_batch"], spec["text_tokens"], torch.bfloat16
    if model == "flux1-dev":
        tokens = image_tokens(size)
        return dict(hidden_states=torch.empty(batch, tokens, 64, dtype=bf16).requires_grad_(requires_grad),
                    encoder_hidden_states=torch.empty(batch, text, 4096, dtype=bf16),
                    pooled_projections=torch.empty(batch, 768, dtype=bf16),
                    timestep=torch.empty(batch, dtype=bf16), guidance=torch.empty(batch, dtype=torch.float32),
                    img_ids=torch.empty(tokens, 3, dtype=bf16), txt_ids=torch.empty(text, 3, dtype=bf16),
                    return_dict=False)
    hw = latent_hw(size)
    return dict(hidden_states=torch.empty(batch, 16, hw, hw, dtype=bf16).requires_grad_(requires_grad),
                encoder_hidden_states=torch.empty(batch, text, 4096, dtype=bf16),
                pooled_projections=torch.empty(batch, 2048, dtype=bf16),
                timestep=torch.empty(batch, dtype=bf16), return_dict=False)


def blocks_of(model: str, transformer) -> dict:
    """label -> block module, in execution order."""
    if model == "flux1-dev":
        blocks = {f"double.{i}": b for i, b in enumerate(transformer.transformer_blocks)}
        blocks.update({f"single.{i}": b for i, b in enumerate(transformer.single_transformer_blocks)})
        return blocks
    dual = set(transformer.config.dual_attention_layers)
    last = len(transformer.transformer_blocks) - 1
    return {f"{'last' if i == last else 'dual' if i in dual else 'joint'}.{i}": b
            for i, b in enumerate(transformer.transformer_blocks)}


def measure_call(model: str, size: int, *, full_depth: bool = False, attention: str = "gpu", mode: str = "autocast",
                 block_ckpt: bool = False, peak: bool = True) -> dict:
    """One transformer call, forward then backward, on fake tensors: the bytes saved for backward (in all, outside
    the blocks, per block, the block inputs) and, with ``peak``, the peak of the live activation bytes. With
    block_ckpt only the peak is measured (the recomputed blocks' tensors are saved by the checkpoint's own hooks)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    transformer = build_transformer(model, None if full_depth else MODELS[model]["reduced"])
    add_lora(transformer)
    if block_ckpt:
        block_checkpointing(transformer)
    fake = FakeTensorMode()
    fakeify(transformer, fake)
    blocks = blocks_of(model, transformer)

    def one_pass(track: bool) -> dict:
        with fake:
            inputs = transformer_inputs(model, size)
        exclude = [*transformer.parameters(), *transformer.buffers(), *tensors_in(inputs)]
        out = forward_backward(transformer, fake, inputs, lambda **kw: transformer(**kw)[0], exclude, blocks,
                               attention, mode, track)
        assert all(p.grad is not None for p in transformer.parameters() if p.requires_grad), "a LoRA got no grad"
        out["call_input_bytes"] = nbytes(storages(tensors_in(inputs)))
        return out

    if block_ckpt:
        tracked = one_pass(track=True)
        return {"peak": tracked["peak"], "live_after_forward": tracked["live_after_forward"], "ops": tracked["ops"]}
    counted = one_pass(track=False)
    meter = counted["meter"]
    labels = list(blocks)
    outside = meter.by_label.get(None, {})
    increments, input_increments, seen, seen_inputs = {}, {}, dict(outside), {}
    for label in labels:  # what each block adds to the blocks before it (and to what is saved outside the blocks)
        own, own_inputs = meter.by_label.get(label, {}), meter.inputs.get(label, {})
        increments[label] = nbytes({k: v for k, v in own.items() if k not in seen})
        input_increments[label] = nbytes({k: v for k, v in own_inputs.items() if k not in seen_inputs})
        seen.update(own)
        seen_inputs.update(own_inputs)
    # with block checkpointing: stored = what is saved outside the blocks + the block inputs; recomputing block b
    # adds what it saves that is not stored already
    stored = {**outside, **meter.input_union(labels)}
    block_extra = {label: nbytes({k: v for k, v in meter.by_label.get(label, {}).items() if k not in stored})
                   for label in labels}
    out = {"saved": nbytes(meter.union()), "saved_outside_blocks": nbytes(outside),
           "saved_per_block": {label: nbytes(meter.by_label.get(label, {})) for label in labels},
           "increments": increments, "input_increments": input_increments,
           "stored_block_inputs_and_outside": nbytes(stored), "block_recompute": block_extra,
           "largest_saved_tensor": meter.largest[1], "largest_saved_bytes": meter.largest[0],
           "ops": counted["ops"], "call_input_bytes": counted["call_input_bytes"], "peak": None}
    if peak:
        tracked = one_pass(track=True)
        out.update(peak=tracked["peak"], live_after_forward=tracked["live_after_forward"],
                   saved_in_tracked_pass=nbytes(tracked["meter"].union()))
    return out


def scale(model: str, reduced: dict, reduced_ckpt: dict | None = None) -> dict:
    """Full-depth figures from reduced-depth measurements: add (full count - reduced count) x the measured increment
    of each block kind. Peaks: the reduced model's measured peak plus the extra saved bytes (no block checkpointing)
    or the extra stored block inputs (block checkpointing) of the added blocks; the backward working memory on top of
    the saved tensors does not grow with depth (checked by --check-full-depth)."""
    saved, stored, by_kind = reduced["saved"], reduced["stored_block_inputs_and_outside"], {}
    for kind, (n_full, n_reduced, index) in MODELS[model]["kinds"].items():
        label = f"{kind}.{index}"
        saved += (n_full - n_reduced) * reduced["increments"][label]
        stored += (n_full - n_reduced) * reduced["input_increments"][label]
        by_kind[kind] = max(v for k, v in reduced["block_recompute"].items() if k.startswith(kind + "."))
    out = {"saved": saved, "stored_block_inputs_and_outside": stored, "block_recompute_by_kind": by_kind,
           "saved_block_ckpt": stored + max(by_kind.values())}
    if reduced["peak"] is not None:
        out["peak"] = reduced["peak"] + saved - reduced["saved"]
        out["backward_working_memory"] = reduced["peak"] - reduced["saved"]
    if reduced_ckpt is not None:
        out["peak_block_ckpt"] = reduced_ckpt["peak"] + stored - reduced["stored_block_inputs_and_outside"]
    return out


def direct(full: dict, full_ckpt: dict | None = None) -> dict:
    """The same figures from a full-depth measurement."""
    by_kind = {}
    for label, value in full["block_recompute"].items():
        kind = label.split(".")[0]
        by_kind[kind] = max(by_kind.get(kind, 0), value)
    out = {"saved": full["saved"], "stored_block_inputs_and_outside": full["stored_block_inputs_and_outside"],
           "block_recompute_by_kind": by_kind, "saved_block_ckpt": full["stored_block_inputs_and_outside"]
           + max(by_kind.values())}
    if full["peak"] is not None:
        out["peak"] = full["peak"]
        out["backward_working_memory"] = full["peak"] - full["saved"]
    if full_ckpt is not None:
        out["peak_block_ckpt"] = full_ckpt["peak"]
    return out


# -------------------------------------------------------------------------------- stored inputs of checkpointed calls
def measure_chain(model: str, size: int, calls: int) -> tuple[int, int]:
    """Bytes autograd keeps for a chain of ``calls`` sampling steps, each transformer call under torch.utils.checkpoint
    (non-reentrant: it stores the call's positional inputs, here the latents) followed by the CFG combination (SD3)
    and the Euler update. Reduced-depth model: the stored inputs do not depend on depth. Also returns the bytes of the
    conditioning tensors every call reads (text embeddings, pooled embedding, timestep, guidance, position ids)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.checkpoint import checkpoint

    transformer = build_transformer(model, MODELS[model]["reduced"])
    add_lora(transformer)
    fake = FakeTensorMode()
    fakeify(transformer, fake)
    log = Log()
    with fake:
        inputs = transformer_inputs(model, size, requires_grad=False)
        latents = inputs.pop("hidden_states")[:1].clone()  # one image (SD3 builds its CFG batch per step)
        meter = SavedMeter(set(storages([*transformer.parameters(), *transformer.buffers()])))

        def call(x, **kw):
            return transformer(hidden_states=x, **kw)[0]

        with gpu_rules("gpu", log):
            with autocast("autocast"), torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                for _ in range(calls):
                    x = latents if model == "flux1-dev" else torch.cat([latents] * 2)
                    v = checkpoint(call, x, use_reentrant=False, **inputs)
                    if model != "flux1-dev":
                        uncond, cond = v.chunk(2)
                        v = uncond + 4.5 * (cond - uncond)
                    # FlowMatchEulerDiscreteScheduler.step's arithmetic: fp32, back to the model's dtype
                    latents = (latents.float() + (-1.0 / STEPS) * v.float()).to(v.dtype)
            latents.float().sum().backward()  # recomputes each call: checks that the checkpointed chain is complete
        shared = nbytes(storages(tensors_in(inputs)))
    return nbytes(meter.union()), shared


def stored_inputs(model: str, size: int) -> dict:
    """What the K checkpointed calls keep until backward: per call, the growth from a 1-call to a 2-call chain;
    shared, the conditioning read by every call (alive for the whole chain)."""
    (one, shared), (two, _) = measure_chain(model, size, 1), measure_chain(model, size, 2)
    per_call = two - one
    fixed = one - per_call  # stored once whatever K (0: the latents are the only positional input)
    return {"shared_conditioning": shared, "fixed": fixed, "per_call": per_call,
            "k1": shared + fixed + per_call, "k_all": shared + fixed + STEPS * per_call}


# ---------------------------------------------------------------------------------------------------------- VAE
def measure_vae(model: str, size: int, attention: str = "gpu", mode: str = "autocast",
                block_ckpt: bool = False) -> dict:
    """VAE decode, forward then backward, on fake tensors: latents (1, 16, size/8, size/8) bf16 requiring grad,
    unscaled and shifted as the pipelines do, through vae.decode. Saved bytes per decoder block and the peak of the
    live activation bytes; ``block_ckpt``: diffusers' VAE gradient checkpointing (decoder mid block and each up
    block checkpointed), peak only."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    vae = build_vae(model)
    if block_ckpt:
        block_checkpointing(vae)
    fake = FakeTensorMode()
    fakeify(vae, fake)
    blocks = {"mid_block": vae.decoder.mid_block}
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(vae.decoder.up_blocks)})
    hw = latent_hw(size)
    shift, scaling = vae.config.shift_factor, vae.config.scaling_factor

    def decode(z):
        return vae.decode(z / scaling + shift, return_dict=False)[0]

    def one_pass(track: bool) -> dict:
        with fake:
            z = torch.empty(1, 16, hw, hw, dtype=torch.bfloat16, requires_grad=True)
        out = forward_backward(vae, fake, {"z": z}, decode, [*vae.parameters(), *vae.buffers(), z], blocks,
                               attention, mode, track)
        assert z.grad is not None
        return out

    tracked = one_pass(track=True)
    out = {"peak": tracked["peak"], "live_after_forward": tracked["live_after_forward"], "ops": tracked["ops"]}
    if not block_ckpt:
        meter = one_pass(track=False)["meter"]
        out.update(saved=nbytes(meter.union()), saved_outside_blocks=nbytes(meter.by_label.get(None, {})),
                   saved_per_block={label: nbytes(meter.by_label.get(label, {})) for label in blocks},
                   largest_saved_tensor=meter.largest[1])
    return out


# ---------------------------------------------------------------------------------------------------------- report
def gib(n: float) -> float:
    return n / GIB


def measure_size(model: str, size: int, check_full_depth: bool) -> dict:
    reduced = measure_call(model, size)
    reduced_ckpt = measure_call(model, size, block_ckpt=True)
    out = {"image_tokens": image_tokens(size), "text_tokens": MODELS[model]["text_tokens"],
           "batch_per_call": MODELS[model]["cfg_batch"], "reduced_depth": reduced,
           "reduced_depth_block_ckpt": reduced_ckpt, "full_depth": scale(model, reduced, reduced_ckpt),
           "stored_inputs": stored_inputs(model, size), "vae": measure_vae(model, size),
           "vae_block_ckpt": measure_vae(model, size, block_ckpt=True)}
    if check_full_depth:
        # saved-tensor accounting at full depth (fast); the peak tracker at full depth takes minutes, so it runs for
        # FLUX at 1024 px only
        with_peak = model == "flux1-dev" and size == max(SIZES)
        full = measure_call(model, size, full_depth=True, peak=with_peak)
        full_ckpt = measure_call(model, size, full_depth=True, block_ckpt=True) if with_peak else None
        out["full_depth_direct"] = direct(full, full_ckpt)
    if size == max(SIZES):  # how much one call depends on the attention kernel and on autocast
        out["variants"] = {
            "math_attention": scale(model, measure_call(model, size, attention="math", peak=False)),
            "no_autocast": scale(model, measure_call(model, size, mode="bf16", peak=False)),
            "vae_math_attention": measure_vae(model, size, attention="math"),
            "vae_no_autocast": measure_vae(model, size, mode="bf16"),
            "vae_no_autocast_block_ckpt": measure_vae(model, size, mode="bf16", block_ckpt=True)}
    return out


def run(check_full_depth: bool) -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    started = time.perf_counter()
    result = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/flow_memory.py"
                         + (" --check-full-depth" if check_full_depth else ""),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                           "transformers": transformers.__version__},
              "assumptions": {
                  "batch": 1, "steps": STEPS,
                  "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": LORA_TARGETS, "dtype": "float32",
                           "bytes_per_param": BYTES_LORA},
                  "weights": "bf16, frozen (transformer with buffers, text encoders, whole VAE)",
                  "precision": "bf16 autocast with CUDA's fp32 op list (layer/group/rms norm, upsampling in fp32)",
                  "attention": "flash (head_dim <= 256), memory-efficient (VAE, head_dim 512)",
                  "per_call_checkpointing": "always: each call stores its inputs, is recomputed in backward",
                  "block_checkpointing": "diffusers enable_gradient_checkpointing on the transformer and the VAE",
                  "total": "weights + LoRA/grads/Adam + stored call inputs + max(one-call peak, VAE decode peak)",
                  "not_included": ["reward model", "CUDA context", "allocator overhead and fragmentation"]},
              "models": {}, "rows": []}
    for model, spec in MODELS.items():
        t0 = time.perf_counter()
        entry = {"title": spec["title"], "params": parameter_counts(model), "sizes": {}}
        for size in SIZES:
            entry["sizes"][str(size)] = measure_size(model, size, check_full_depth)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        result["models"][model] = entry
        result["rows"].extend(rows_for(model, entry))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def rows_for(model: str, entry: dict) -> list[dict]:
    params = entry["params"]
    weights = {"transformer": params["transformer"] * BYTES_BF16,
               "text_encoders": sum(params["text_encoders"].values()) * BYTES_BF16,
               "vae": params["vae"] * BYTES_BF16}
    lora = params["lora"] * BYTES_LORA
    rows = []
    for size, sized in entry["sizes"].items():
        full = sized["full_depth"]
        for k in ("1", "all"):
            stored = sized["stored_inputs"]["k1" if k == "1" else "k_all"]
            for block_ckpt in (False, True):
                call = full["peak_block_ckpt" if block_ckpt else "peak"]
                vae = sized["vae_block_ckpt" if block_ckpt else "vae"]["peak"]
                # the VAE's backward runs first and ends before the first transformer call is recomputed: the two
                # peaks do not add up, the larger one counts
                total = sum(weights.values()) + lora + stored + max(call, vae)
                rows.append({"model": model, "size": int(size), "K": k, "block_checkpointing": block_ckpt,
                             "weights_transformer": weights["transformer"],
                             "weights_text_encoders": weights["text_encoders"], "weights_vae": weights["vae"],
                             "lora_grads_adam": lora, "stored_call_inputs": stored, "one_call_peak": call,
                             "vae_decode_peak": vae, "total": total,
                             "total_text_encoders_offloaded": total - weights["text_encoders"]})
    return rows


TABLE_HEAD = ("model", "px", "K", "block ckpt", "weights", "of which text enc.", "LoRA+grads+Adam",
              "stored call inputs", "one-call peak", "VAE decode peak", "total", "total, text enc. offloaded")


def table_rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        weights = r["weights_transformer"] + r["weights_text_encoders"] + r["weights_vae"]
        cells = [MODELS[r["model"]]["title"], str(r["size"]), r["K"] if r["K"] == "1" else f"all ({STEPS})",
                 "on" if r["block_checkpointing"] else "off"]
        cells += [f"{gib(v):.2f}" for v in (weights, r["weights_text_encoders"], r["lora_grads_adam"],
                                             r["stored_call_inputs"], r["one_call_peak"], r["vae_decode_peak"],
                                             r["total"], r["total_text_encoders_offloaded"])]
        out.append(cells)
    return out


def print_table(result: dict) -> None:
    """The table in GiB, as the Markdown of docs/flow-memory.md."""
    print("| " + " | ".join(TABLE_HEAD) + " |")
    print("|" + "---|" * 4 + "---:|" * (len(TABLE_HEAD) - 4))
    for cells in table_rows(result):
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-full-depth", action="store_true",
                        help="also run the full-depth transformers and compare with the scaled figures (minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = run(args.check_full_depth)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
