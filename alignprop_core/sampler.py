"""Differentiable sampling: prompts -> embeddings -> denoising chain with truncated backprop -> images in [0, 1].

One path for every model family: the family (:mod:`alignprop_core.families`) encodes the prompts, draws the initial
latents, runs one guided denoiser evaluation and decodes, with the pipeline's own pieces, so that any scheduler with
a differentiable ``step`` (DDIM with its eta, DPM-Solver++, Euler, Euler-ancestral, UniPC, ...) runs exactly as in
diffusers. Truncation follows the AlignProp paper: K is drawn once per batch, the first ``N - K`` denoiser
evaluations run without building a graph, and the last K and the VAE decode keep it, so the reward's gradient
reaches the LoRA weights through exactly the last K denoiser calls. DRaFT-LV is the K = 1 variant with several
re-noised copies of the last step.
"""

from __future__ import annotations

import copy
import random
import weakref
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils.checkpoint import checkpoint

from alignprop_core.families import Evaluate, Family, PromptEmbeddings, family_of
from alignprop_core.kl import BaseModelDistance
from alignprop_core.lora import fused_lora
from alignprop_core.prompt_cache import cache_for

if TYPE_CHECKING:
    from alignprop_core.config import AlignPropConfig

__all__ = ["PromptEmbeddings", "decode_latents", "draw_lv_noise", "draw_truncation_k", "encode_prompts",
           "sample_images"]


def draw_truncation_k(config: "AlignPropConfig", rng: random.Random) -> int:
    """Number of final denoising steps that keep gradients, drawn once per batch from ``rng``."""
    steps = config.sample_num_steps
    if config.truncation == "gaussian":
        return int(min(max(round(rng.gauss(config.truncation_mean, config.truncation_std)), 1), steps))
    low, high = config.truncation_range
    return low if low == high else rng.randint(low, high)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                   device: torch.device, true_cfg_scale: float = 1.0) -> PromptEmbeddings:
    """Frozen text encoding through the pipeline's own ``encode_prompt``, as its family does it; the ``negative*``
    fields are None when there is no negative pass (``guidance_scale <= 1``; FLUX: ``true_cfg_scale <= 1`` or no
    negative prompt)."""
    return family_of(pipe).encode_prompts(pipe, prompts, negative_prompt, guidance_scale, device, true_cfg_scale)


def sample_images(
    pipe,
    embeddings: PromptEmbeddings,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    height: int,
    width: int,
    grad_steps: int,
    generator: Optional[torch.Generator | list[torch.Generator]] = None,
    gradient_checkpointing: bool = True,
    unet: Optional[torch.nn.Module] = None,
    draft_lv_n: int = 0,
    kl: Optional[BaseModelDistance] = None,
    fuse_lora: bool = False,
    checkpoint_memory_budget_gb: Optional[float] = None,
    compile_prefix: bool = False,
    compile_grad_calls: bool = False,
) -> torch.Tensor:
    """Run the denoising chain with ``pipe.scheduler`` and decode; returns float images ``[B, 3, height, width]``
    in ``[0, 1]`` (``[draft_lv_n * B, ...]`` with DRaFT-LV under grad: draw-major, each draw the whole batch).

    ``grad_steps`` (K) is how many final denoiser evaluations build an autograd graph (0 = none: plain sampling);
    the chain has ``len(scheduler.timesteps)`` of them (= ``num_steps`` for every scheduler in
    :data:`alignprop_core.schedulers.SCHEDULERS`). ``draft_lv_n`` > 0 (DRaFT-LV, only when grad is enabled) runs the
    whole chain without a graph, then re-noises its detached result ``draft_lv_n`` times to the last step's noise
    level and repeats that last step on each with gradients (see :func:`_draft_lv_last_step`). ``unet`` (the
    denoiser) defaults to the family's (``pipe.unet``); pass the accelerate-prepared (DDP-wrapped) one when
    training so that gradients are synchronised across processes. With ``gradient_checkpointing`` each denoiser
    call under grad stores only its inputs and is recomputed during backward. ``kl`` (:mod:`alignprop_core.kl`)
    records each call with gradients against the base model's prediction. ``fuse_lora`` runs the calls without a
    graph (only when grad is enabled) with the LoRA folded into the base weights (:func:`~alignprop_core.lora.
    fused_lora`), restored bit for bit before the first call with gradients. ``checkpoint_memory_budget_gb`` (with
    ``gradient_checkpointing``) keeps the activations of as many calls with gradients as fit and recomputes the rest
    (see :func:`_evaluator`). ``compile_prefix`` runs the calls without a graph (when grad is enabled) through
    ``torch.compile`` of the denoiser, compiled once per denoiser (:func:`compiled_denoiser`);
    ``compile_grad_calls`` runs the calls with gradients through it too (the backward compiled by AOTAutograd).
    """
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)  # unwrapped; ``unet`` may be its DDP wrapper
    budget = None if checkpoint_memory_budget_gb is None else int(checkpoint_memory_budget_gb * 1e9)
    # Compiled, the calls with gradients bypass a DDP wrapper (one compiled module for all calls): the trainer's
    # gradients are averaged by grad_sync's one all-reduce, under no_sync, where DDP's forward arms nothing.
    called = compiled_denoiser(denoiser) if compile_grad_calls else unet if unet is not None else denoiser
    evaluate = _evaluator(family, called, gradient_checkpointing, budget, compiled=compile_grad_calls)
    if kl is not None:
        evaluate = kl.wrap(evaluate)
    scheduler = pipe.scheduler
    device = embeddings.positive.device
    grad = torch.is_grad_enabled()
    lv = draft_lv_n > 0 and grad
    denoiser_kwargs = family.denoiser_kwargs(pipe, embeddings, height, width)

    timesteps = family.set_timesteps(pipe, num_steps, device, height, width)
    latents = family.initial_latents(pipe, embeddings.positive.shape[0], height, width, embeddings.positive.dtype,
                                     device, generator)
    step_kwargs = family.step_kwargs(pipe, generator, eta)
    chain = len(timesteps)
    first_grad_step = chain if lv else chain - min(max(grad_steps, 0), chain)
    before_last = None

    def denoise(steps: range, latents: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        nonlocal before_last
        for i in steps:
            if lv and i == chain - 1:
                before_last = copy.deepcopy(scheduler)  # the state the last step starts from, for the LV draws
            with torch.set_grad_enabled(grad and i >= first_grad_step):
                prediction = family.guided_prediction(evaluate, scheduler, latents, timesteps[i], denoiser_kwargs,
                                                      guidance_scale, embeddings.guided)
                latents = scheduler.step(prediction, timesteps[i], latents, **step_kwargs, return_dict=False)[0]
        return latents

    # the calls without a graph may run with the LoRA folded into the base weights (restored exactly after), and
    # through the compiled denoiser
    prefix = grad and first_grad_step > 0
    prefix_evaluate = evaluate
    if compile_prefix and prefix:
        prefix_evaluate = _evaluator(family, compiled_denoiser(denoiser), False, compiled=True)
    with fused_lora(denoiser) if fuse_lora and prefix else nullcontext():
        latents = denoise(range(first_grad_step), latents, prefix_evaluate)
    latents = denoise(range(first_grad_step, chain), latents, evaluate)

    if lv:
        latents = _draft_lv_last_step(pipe, family, evaluate, before_last, latents, timesteps[-1], embeddings,
                                      draft_lv_n, height, width, guidance_scale, step_kwargs, generator)
    with torch.set_grad_enabled(grad and (grad_steps > 0 or lv)):
        return family.decode(pipe, latents)


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def compiled_denoiser(denoiser: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(denoiser)``, made once per denoiser and kept while it lives (it shares the parameters, so
    LoRA updates and the fused weights are seen without recompiling; measured in docs/benchmarks.md)."""
    if denoiser not in _COMPILED:
        _COMPILED[denoiser] = torch.compile(denoiser)
    return _COMPILED[denoiser]


def _evaluator(family: Family, denoiser: torch.nn.Module, gradient_checkpointing: bool,
               memory_budget_bytes: Optional[int] = None, compiled: bool = False) -> Evaluate:
    """``evaluate(model_input, t, kwargs)``: one denoiser call, checkpointed when grad is on and asked for.

    With ``memory_budget_bytes`` (selective checkpointing) calls keep their activations while they fit in the budget
    and only the rest are recomputed, which saves one forward per kept call and gives the same gradients. The first
    call with gradients is kept and measured (the bytes autograd saves, frozen weights not counted); it is held even
    when it alone exceeds the budget, as the backward of a checkpointed call holds one call's activations anyway.
    """
    kept = {"bytes": 0, "per_call": None}

    def call(denoiser: torch.nn.Module, model_input: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]):
        if compiled:
            # dynamo guards on the grad mode and on whether the input requires grad. An input that requires grad
            # under grad (a leaf where the chain starts: one input gradient more per step, unused) and a detached
            # one without (the no-graph forward of a checkpointed call) leave one graph per grad mode (counted
            # with the fused prefix and both checkpointing modes: 4 graphs before, 3 now, one per fused state).
            if not torch.is_grad_enabled():
                model_input = model_input.detach()
            elif not model_input.requires_grad:
                model_input = model_input.detach().requires_grad_()
        return family.call_denoiser(denoiser, model_input, t, kwargs)

    def stored_call(model_input: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if kept["per_call"] is None:
            weights = {p.untyped_storage().data_ptr() for p in denoiser.parameters()}
            saved = [0]

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                if tensor.untyped_storage().data_ptr() not in weights:
                    saved[0] += tensor.untyped_storage().nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = call(denoiser, model_input, t, kwargs)
            kept["per_call"] = saved[0]
        else:
            out = call(denoiser, model_input, t, kwargs)
        kept["bytes"] += kept["per_call"]
        return out

    def evaluate(model_input: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if torch.is_grad_enabled() and gradient_checkpointing:
            if memory_budget_bytes is not None and (kept["per_call"] is None
                                                    or kept["bytes"] + kept["per_call"] <= memory_budget_bytes):
                return stored_call(model_input, t, kwargs)
            # Reentrant checkpointing runs the forward without building the denoiser's inner autograd graph: one
            # node per call. The non-reentrant variant keeps every inner node alive until backward; on CPU those
            # small long-lived allocations fragment the heap, and peak RSS grew with K (K=50 vs K=1 at 32x32
            # latents: 2.5x; reentrant: 1.05x; bench/memory_vs_k.py). It needs an input that requires grad to
            # record the call.
            if not model_input.requires_grad:
                model_input = model_input.detach().requires_grad_()
            return checkpoint(call, denoiser, model_input, t, kwargs, use_reentrant=True)
        return call(denoiser, model_input, t, kwargs)

    evaluate.kept = kept  # for tests and benchmarks: bytes kept, bytes per call
    return evaluate


def draw_lv_noise(like: torch.Tensor, n: int,
                  generator: Optional[torch.Generator | list[torch.Generator]]) -> list[torch.Tensor]:
    """The ``n`` fresh noise tensors of the DRaFT-LV draws (shape of ``like``), from the sampler's generator(s)."""
    from diffusers.utils.torch_utils import randn_tensor

    return [randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype) for _ in range(n)]


def _draft_lv_last_step(pipe, family: Family, evaluate: Evaluate, before_last, x0: torch.Tensor, t: torch.Tensor,
                        embeddings: PromptEmbeddings, n: int, height: int, width: int, guidance_scale: float,
                        step_kwargs: dict[str, Any], generator) -> torch.Tensor:
    """DRaFT-LV (Clark et al. 2023): ``x_i = add_noise(stopgrad(x0), eps_i, t_last)`` for ``n`` fresh ``eps_i``,
    then the scheduler's last step from each ``x_i`` with gradients. All draws share one denoiser call; each runs
    the scheduler's step on its own copy of the pre-last-step state, so draws never see each other's history."""
    x0 = x0.detach()
    t_batch = t.repeat(x0.shape[0])
    noisy = [before_last.add_noise(x0, noise, t_batch) for noise in draw_lv_noise(x0, n, generator)]
    denoiser_kwargs = family.denoiser_kwargs(pipe, embeddings.repeat(n), height, width)
    prediction = family.guided_prediction(evaluate, copy.deepcopy(before_last), torch.cat(noisy), t, denoiser_kwargs,
                                          guidance_scale, embeddings.guided)
    outputs = []
    for sample, draw in zip(noisy, prediction.chunk(n)):
        step = copy.deepcopy(before_last)
        if getattr(step, "last_sample", None) is not None:
            step.last_sample = None  # UniPC: no corrector; a re-noised sample is not its predictor's output
        outputs.append(step.step(draw, t, sample, **step_kwargs, return_dict=False)[0])
    return torch.cat(outputs)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to float images in ``[0, 1]``, as the pipeline's family decodes (see its ``decode``)."""
    return family_of(pipe).decode(pipe, latents)


def sample_prompts(pipe: Any, prompts: list[str], config: "AlignPropConfig", *, height: int, width: int,
                   device: torch.device, generator: Optional[torch.Generator | list[torch.Generator]] = None,
                   grad_steps: int = 0, unet: Optional[torch.nn.Module] = None, draft_lv_n: int = 0,
                   kl: Optional[BaseModelDistance] = None) -> torch.Tensor:
    """Encode ``prompts`` (with the config's negative prompt and guidance) and sample them with the config's sampling
    settings: the one encode-then-sample path of training, eval, sample and the trainer's ``generate``. The
    embeddings come from the pipeline's :mod:`~alignprop_core.prompt_cache` (``config.prompt_cache_size``)."""
    embeddings = cache_for(pipe, config.prompt_cache_size).encode(
        pipe, prompts, config.negative_prompts, config.sample_guidance_scale, device, config.true_cfg_scale)
    return sample_images(pipe, embeddings, num_steps=config.sample_num_steps,
                         guidance_scale=config.sample_guidance_scale, eta=config.sample_eta, height=height, width=width,
                         grad_steps=grad_steps, generator=generator, unet=unet, draft_lv_n=draft_lv_n,
                         gradient_checkpointing=config.gradient_checkpointing, kl=kl,
                         fuse_lora=config.fuse_lora_prefix and config.use_lora,
                         checkpoint_memory_budget_gb=config.checkpoint_memory_budget_gb,
                         compile_prefix=config.compile_prefix, compile_grad_calls=config.compile_grad_calls)
