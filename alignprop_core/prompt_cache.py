"""Text embeddings kept per prompt string, so that a prompt source that repeats (45 animals) runs the frozen text
encoders once per distinct prompt instead of once per batch.

A cached prompt is encoded alone (a batch of one): its embedding then depends on the prompt only, not on the other
prompts it happened to share a batch with (on this CPU a batched encode differs from a lone one by up to 5e-7 in
SDXL's and SD3's pooled projections, because the GEMM blocks the batch dimension), so training, eval, resume and
every process see the same embedding for the same prompt whatever the history. A batch is then assembled from its
prompts' rows with the family's ``join_embeddings``, which pads the variable-length families (Qwen-Image, Z-Image) to
the batch's longest prompt as their pipelines do. ``capacity`` 0 turns the cache off: each batch is encoded together,
as the pipeline's ``__call__`` does.

Entries live on the device they were encoded on (per prompt, bf16: FLUX.1 4 MiB, FLUX.2 [klein] 7.5 MiB, double that
with a negative pass; the tiny models a few KiB), least recently used first out. One cache belongs to one pipeline
object and dies with it; :func:`forget` empties it when the text encoders change (``alignprop eval`` and
``sample`` call it around each LoRA they load, since a LoRA file may adapt the text encoders too).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch

from alignprop_core.families import PromptEmbeddings, family_of

__all__ = ["PromptEmbeddingCache", "cache_for", "forget"]


class PromptEmbeddingCache:
    """Least-recently-used per-prompt embeddings of one pipeline; ``hits``/``misses`` count prompts looked up."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[tuple, PromptEmbeddings] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], negative_prompt: Optional[str], guidance_scale: float,
               device: torch.device, true_cfg_scale: float = 1.0) -> PromptEmbeddings:
        """The batch's embeddings, as ``family.encode_prompts`` returns them, from cached per-prompt rows."""
        family = family_of(pipe)
        if self.capacity <= 0:
            return family.encode_prompts(pipe, prompts, negative_prompt, guidance_scale, device, true_cfg_scale)
        # everything the encoding depends on besides the prompt (autocast changes the encoders' dtype)
        setting = (negative_prompt, float(guidance_scale), float(true_cfg_scale), str(device),
                   torch.is_autocast_enabled(torch.device(device).type))
        rows = []
        for prompt in prompts:
            key = (prompt, *setting)
            row = self._rows.get(key)
            if row is None:
                self.misses += 1
                row = family.encode_prompts(pipe, [prompt], negative_prompt, guidance_scale, device, true_cfg_scale)
                self._rows[key] = row
                while len(self._rows) > self.capacity:
                    self._rows.popitem(last=False)
            else:
                self.hits += 1
                self._rows.move_to_end(key)
            rows.append(row)
        return family.join_embeddings(rows)


_CACHES: "weakref.WeakKeyDictionary[Any, PromptEmbeddingCache]" = weakref.WeakKeyDictionary()


def cache_for(pipe: Any, capacity: int) -> PromptEmbeddingCache:
    """The cache of ``pipe`` (made on first use; a new ``capacity`` starts it afresh)."""
    cache = _CACHES.get(pipe)
    if cache is None or cache.capacity != capacity:
        cache = _CACHES[pipe] = PromptEmbeddingCache(capacity)
    return cache


def forget(pipe: Any) -> None:
    """Drop ``pipe``'s cached embeddings: call it when its text encoders change (a LoRA loaded into them)."""
    _CACHES.pop(pipe, None)
