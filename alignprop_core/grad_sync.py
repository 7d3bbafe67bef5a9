"""Gradients averaged over processes in one all-reduce per optimizer step, instead of one per checkpointed call.

DDP all-reduces from hooks that fire as each gradient bucket becomes ready in backward. With reentrant checkpointing
every checkpointed denoiser call runs a backward of its own, so DDP all-reduced the LoRA gradients once per call: K
times per step, up to 50. Here the backward runs under DDP's ``no_sync`` and, on the micro-step that syncs
(``accelerator.sync_gradients``; gradient accumulation keeps local sums until then, as DDP does), all gradients are
averaged in one flat all-reduce: the mean over processes that DDP computes, in one message.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["backward"]


def backward(accelerator: Any, model: torch.nn.Module, params: list[torch.nn.Parameter], loss: torch.Tensor) -> None:
    """``accelerator.backward(loss)``, then the gradients of ``params`` averaged over all processes at once. Only for
    a DDP-wrapped model: FSDP and DeepSpeed shard or bucket gradients themselves, and keep their own backward."""
    if accelerator.num_processes == 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        accelerator.backward(loss)
        return
    with model.no_sync():
        accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # same layout on every rank
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()
