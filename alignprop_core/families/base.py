"""The family protocol: everything model-specific that sampling, training, evaluation and LoRA files need.

A *family* is one kind of diffusers pipeline (SD 1.x/2.x, SDXL, ...). The sampler, trainer, ``eval``/``sample`` and
``mix`` only call the methods of :class:`Family`, so adding a family means adding one module to this package and
its instance to ``FAMILIES`` in ``families/__init__.py``. Nothing here imports torch or diffusers at import time
(the CLI lists the families for ``--help``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from alignprop_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: attention projections that get LoRA adapters by default (diffusers' names, peft suffix matching)
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

#: ``evaluate(model_input, t, denoiser_kwargs) -> prediction``: one denoiser call, given by the sampler (which
#: decides about gradient checkpointing).
Evaluate = Callable[["torch.Tensor", "torch.Tensor", dict], "torch.Tensor"]


@dataclass
class PromptEmbeddings:
    """Text conditioning of one batch: ``positive`` ``[B, ...]``; ``negative`` is None when guidance is off.
    Families with more conditioning subclass it (every field a tensor ``[B, ...]`` or None)."""

    positive: torch.Tensor
    negative: Optional[torch.Tensor]

    @property
    def guided(self) -> bool:
        """Whether the denoiser runs classifier-free guided (a negative half in every call)."""
        return self.negative is not None

    def repeat(self, n: int) -> "PromptEmbeddings":
        """The batch repeated ``n`` times (draw-major: the whole batch, then the whole batch again, ...)."""
        import torch

        def rep(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else torch.cat([x] * n)

        return type(self)(*(rep(getattr(self, f.name)) for f in fields(self)))


class Family:
    """One model family. Subclasses set the class attributes and implement the methods that raise here."""

    #: config / CLI name ("sd")
    name: str = ""
    #: the family in messages ("SD-1.x")
    label: str = ""
    #: what the "supported:" list says after the pipeline class ("SD 1.x/2.x")
    description: str = ""
    #: diffusers pipeline classes (``_class_name`` in ``model_index.json``) it handles; the first one loads
    pipeline_classes: tuple[str, ...] = ()
    #: the pipeline component that is denoised through and gets the LoRA
    denoiser_name: str = "unet"
    #: the denoiser in messages
    denoiser_label: str = "UNet"
    #: the sampling settings the pipeline's ``__call__`` has an argument for, beyond prompts, steps, guidance and
    #: size ("negative_prompt", "eta", "true_cfg_scale"): what :meth:`pipeline_call_kwargs` passes on
    pipeline_call_settings: tuple[str, ...] = ("negative_prompt",)
    #: pipeline components a LoRA file of this family may adapt (``<component>.`` key prefixes)
    lora_components: tuple[str, ...] = ()
    #: denoiser modules that get LoRA adapters by default
    lora_target_modules: tuple[str, ...] = ()
    #: ``pretrained_model`` id of its tiny random-weight pipeline (None: no tiny pipeline)
    tiny_id: Optional[str] = None
    #: the scheduler ``scheduler: auto`` means, and the kind of scheduler the denoiser needs ("noise": DDPM-style
    #: noise/v prediction; "flow": flow-matching velocity; see :mod:`alignprop_core.schedulers`)
    default_scheduler: str = "ddim"
    scheduler_kind: str = "noise"
    #: what ``mixed_precision: auto`` means on a GPU (fp32 on CPU)
    default_mixed_precision: str = "fp16"

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ------------------------------------------------------------------ loading

    def pipeline_class(self) -> Any:
        """The diffusers class that loads this family's pipelines and writes its LoRA files."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def handles(self, pipe: Any) -> bool:
        """Whether ``pipe`` (a loaded pipeline) is of this family: an instance of one of its classes."""
        import diffusers

        return isinstance(pipe, tuple(getattr(diffusers, name) for name in self.pipeline_classes))

    def load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (parts that sampling never uses, left out)."""
        return {}

    def load(self, source: str, **kwargs: Any) -> Any:
        """Load a pipeline of this family from a hub id or folder (``kwargs`` go to ``from_pretrained``)."""
        return self.pipeline_class().from_pretrained(source, **self.load_kwargs(), **kwargs)

    #: the pipeline's models that ``prepare`` freezes and moves, in this order (absent ones skipped)
    models: tuple[str, ...] = ()
    #: whether LoRA files record the family's name (``lora_files.FAMILY_KEY``): where other families adapt the same
    #: components, so that ``mix`` and messages name the right pipeline class
    tags_lora_files: bool = False
    #: whether a ``force_upcast`` VAE stays fp32 when the frozen weights are fp16 (it overflows in fp16)
    upcast_vae_in_fp16: bool = False

    def prepare(self, pipe: Any, scheduler: str, device: Any, dtype: Any) -> None:
        """Set a loaded pipeline up for differentiable sampling: scheduler ``scheduler`` (``auto`` or a name of
        :data:`alignprop_core.schedulers.SCHEDULERS`), every model frozen, on ``device``, in ``dtype`` (see
        :meth:`model_dtype`)."""
        from alignprop_core.schedulers import make_scheduler

        pipe.scheduler = make_scheduler(self.scheduler_name(scheduler), pipe.scheduler.config)
        for name in self.models:
            module = getattr(pipe, name, None)
            if module is None:
                continue
            module.requires_grad_(False)
            module.to(device)
            target = self.model_dtype(pipe, module, dtype)
            if module.dtype != target:
                module.to(dtype=target)
        pipe.set_progress_bar_config(disable=True)

    def model_dtype(self, pipe: Any, module: Any, dtype: Any) -> Any:
        """The dtype ``prepare`` gives ``module`` when the frozen weights are in ``dtype``."""
        import torch

        if (self.upcast_vae_in_fp16 and module is pipe.vae and dtype == torch.float16
                and getattr(module.config, "force_upcast", False)):
            return torch.float32
        return dtype

    def scheduler_name(self, scheduler: str) -> str:
        """The config's ``scheduler`` for this family: ``auto`` -> its default; a one-line :class:`ConfigError` for
        a scheduler of the other kind (a DDPM-style sampler on a flow-matching model, or the reverse)."""
        from alignprop_core.schedulers import AUTO, SCHEDULERS, scheduler_kind

        if scheduler == AUTO:
            return self.default_scheduler
        if scheduler_kind(scheduler) != self.scheduler_kind:
            fitting = [name for name in SCHEDULERS if scheduler_kind(name) == self.scheduler_kind]
            raise ConfigError(f"scheduler: {scheduler!r} does not fit a {self.label} model; use auto or one of "
                              f"{', '.join(fitting)}")
        return scheduler

    def denoiser(self, pipe: Any) -> Any:
        """The module that gets LoRA (or is fine-tuned): the UNet or transformer."""
        return getattr(pipe, self.denoiser_name)

    def default_size(self, pipe: Any) -> int:
        """Image side in pixels when the config gives none."""
        raise NotImplementedError

    def size_multiple(self, pipe: Any) -> int:
        """Image sides must be a multiple of this (the VAE factor, times any patch size)."""
        return int(pipe.vae_scale_factor)

    # ------------------------------------------------------------------ sampling

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
                       device: Any, true_cfg_scale: float = 1.0) -> PromptEmbeddings:
        """Frozen text encoding (no graph) of one batch; ``negative`` set when the family guides with a negative
        pass (``guidance_scale > 1`` for CFG families; FLUX: ``true_cfg_scale > 1`` with a negative prompt)."""
        raise NotImplementedError

    def join_embeddings(self, rows: list[PromptEmbeddings]) -> PromptEmbeddings:
        """One batch from one-prompt embeddings (``encode_prompts`` of one prompt each), as ``encode_prompts`` of
        the whole batch lays it out; fixed-length families concatenate every field."""
        import torch

        def join(name: str) -> Optional[torch.Tensor]:
            parts = [getattr(row, name) for row in rows]
            return None if parts[0] is None else torch.cat(parts)

        return type(rows[0])(*(join(f.name) for f in fields(rows[0])))

    def set_timesteps(self, pipe: Any, num_steps: int, device: Any, height: int, width: int) -> Any:
        """Reset ``pipe.scheduler`` for a new chain of ``num_steps`` evaluations; returns its timesteps."""
        raise NotImplementedError

    def initial_latents(self, pipe: Any, batch: int, height: int, width: int, dtype: Any, device: Any,
                        generator: Any) -> Any:
        """Starting noise of the chain (scaled as the scheduler expects), from ``generator`` (one or one per image)."""
        raise NotImplementedError

    def step_kwargs(self, pipe: Any, generator: Any, eta: float) -> dict[str, Any]:
        """Extra keyword arguments of ``scheduler.step`` (eta, generator) that the scheduler accepts."""
        raise NotImplementedError

    def pipeline_call_kwargs(self, prompts: list[str], num_steps: int, guidance_scale: float, height: int,
                             width: int, negative_prompt: Optional[str] = None, eta: float = 1.0,
                             true_cfg_scale: float = 1.0) -> dict[str, Any]:
        """The arguments of the pipeline's own ``__call__`` that sample what :func:`~alignprop_core.sampler.
        sample_images` samples with these settings (images as a ``[0, 1]`` tensor; the caller adds ``generator``).
        Settings outside :attr:`pipeline_call_settings` are left out, as they change nothing there (``eta`` in
        the flow families, ``true_cfg_scale`` outside FLUX.1 and Qwen-Image). A pipeline without a negative prompt
        argument guides against ``""`` (FLUX.2 [klein]), so any other negative prompt is a ValueError."""
        kwargs = dict(prompt=list(prompts),  # a copy: ZImagePipeline rewrites the prompt list in place
                      num_inference_steps=num_steps, guidance_scale=guidance_scale, height=height, width=width,
                      output_type="pt")
        if "negative_prompt" in self.pipeline_call_settings:
            if negative_prompt is not None:
                kwargs["negative_prompt"] = [negative_prompt] * len(prompts)  # a list, as the prompts are one
        elif negative_prompt:
            raise ValueError(f"{self.pipeline_classes[0]} takes no negative prompt, so it cannot sample what "
                             f"negative_prompts={negative_prompt!r} samples")
        if "eta" in self.pipeline_call_settings:
            kwargs["eta"] = eta
        if "true_cfg_scale" in self.pipeline_call_settings:
            kwargs["true_cfg_scale"] = true_cfg_scale
        return kwargs

    def denoiser_kwargs(self, pipe: Any, embeddings: PromptEmbeddings, height: int, width: int) -> dict[str, Any]:
        """Keyword arguments of one guidance-batched denoiser call (negative half first), computed once per chain."""
        raise NotImplementedError

    def call_denoiser(self, denoiser: Any, sample: Any, t: Any, kwargs: dict[str, Any]) -> Any:
        """One plain denoiser call; the sampler wraps it for gradient checkpointing."""
        raise NotImplementedError

    def guided_prediction(self, evaluate: Evaluate, scheduler: Any, latents: Any, t: Any, kwargs: dict[str, Any],
                          guidance_scale: float, guided: bool) -> Any:
        """One guided denoiser evaluation at ``t``: the scheduler's input scaling, one ``evaluate`` call, guidance;
        returns what ``scheduler.step`` takes."""
        raise NotImplementedError

    def decode(self, pipe: Any, latents: Any) -> Any:
        """Latents to float images ``[B, 3, H, W]`` in ``[0, 1]`` (differentiable when grad is enabled)."""
        raise NotImplementedError

    def enable_vae_tiling(self, pipe: Any, tile_size: int) -> None:
        """Make :meth:`decode` run in overlapping tiles of ``tile_size`` pixels (diffusers' VAE tiling: a quarter of
        each tile overlaps its neighbours and is blended, so images differ slightly at the seams). Here for the KL
        VAEs (AutoencoderKL, AutoencoderKLFlux2), which take their tile size from two attributes."""
        vae = pipe.vae
        vae.enable_tiling()
        vae.tile_sample_min_size = tile_size
        vae.tile_latent_min_size = tile_size // 2 ** (len(vae.config.block_out_channels) - 1)  # diffusers' formula

    # ------------------------------------------------------------------ LoRA files

    def recognises_lora_modules(self, modules: dict[str, list[str]]) -> bool:
        """Whether adapted modules (component -> module names) look like this family's, where several families
        share the components."""
        return True

    def save_lora_weights(self, directory: str | os.PathLike, layers: dict[str, dict[str, Any]],
                          metadata: dict[str, dict]) -> None:
        """Write ``{component: {key: tensor}}`` LoRA layers with their peft adapter configs through the family's
        pipeline class ``save_lora_weights`` (diffusers' format, safetensors), byte-stable (sorted metadata), tagged
        with the family name where :attr:`tags_lora_files`."""
        kwargs: dict[str, Any] = {}
        for component, state in layers.items():
            kwargs[f"{component}_lora_layers"] = state
            if component in metadata:
                kwargs[f"{component}_lora_adapter_metadata"] = metadata[component]
        self.pipeline_class().save_lora_weights(save_directory=str(directory), safe_serialization=True, **kwargs)
        from alignprop_core import lora_files

        tag = {lora_files.FAMILY_KEY: self.name} if self.tags_lora_files else None
        lora_files.canonicalize_safetensors_header(Path(directory) / lora_files.LORA_WEIGHTS_NAME, tag)

    def lora_state_dict(self, directory: str | os.PathLike, **kwargs: Any) -> Any:
        """The family pipeline class's ``lora_state_dict`` of a LoRA folder (what it returns, as it returns it)."""
        return self.pipeline_class().lora_state_dict(str(directory), **kwargs)

    def save_lora(self, denoiser: Any, directory: str | os.PathLike) -> None:
        """Write the denoiser's LoRA as ``directory/pytorch_lora_weights.safetensors``, byte-identical for identical
        weights. The adapter config (rank, alpha, targets) goes into the metadata: without it diffusers would load a
        LoRA trained with ``lora_alpha != lora_rank`` at the wrong scale."""
        from alignprop_core import lora_files

        config = lora_files.sorted_sets(denoiser.peft_config["default"].to_dict())
        self.save_lora_weights(directory, {self.denoiser_name: self.lora_layers(denoiser)},
                               {self.denoiser_name: config})

    def lora_layers(self, denoiser: Any) -> dict[str, Any]:
        """The denoiser's LoRA weights with the key names its pipeline's ``save_lora_weights`` writes (UNets:
        diffusers' ``lora.down``/``lora.up`` names)."""
        from alignprop_core import lora_files

        return lora_files.unet_lora_state_dict(denoiser)

    def peft_keys(self, state: dict[str, Any]) -> dict[str, Any]:
        """A LoRA file's denoiser weights (prefix removed) with peft's key names, for ``set_peft_model_state_dict``."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        return convert_unet_state_dict_to_peft(state)

    def load_lora(self, denoiser: Any, directory: str | os.PathLike) -> None:
        """Load a LoRA folder's denoiser weights into the denoiser's existing peft adapter ``default``."""
        from peft.utils import set_peft_model_state_dict

        state = self.lora_state_dict(directory)
        state = state[0] if isinstance(state, tuple) else state  # UNet loaders also return network alphas
        prefix = self.denoiser_name + "."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(denoiser, self.peft_keys(own), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ConfigError(f"LoRA in '{directory}' does not fit this {self.denoiser_label} (unexpected keys "
                              f"such as {unexpected[0]}); resume with the same lora_rank and lora_target_modules")

    # ------------------------------------------------------------------ tiny pipeline

    def build_tiny(self, path: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
        """Build this family's tiny random-weight pipeline (seeded) and save it to ``path``; returns ``path``."""
        raise NotImplementedError(f"the {self.label} family has no tiny pipeline")
