"""Gradients averaged over processes in one all-reduce per optimizer step, instead of one per checkpointed call.

DDP all-reduces from hooks that fire as each gradient bucket becomes ready in backward, and it decides in each
forward call made with gradients whether the coming backward syncs. With reentrant checkpointing every checkpointed
denoiser call runs a backward of its own, so DDP all-reduced the LoRA gradients once per call: K times per step, up
to 50. And a call that keeps its activations (``checkpoint_memory_budget_gb``) is a DDP forward with gradients,
which armed DDP's hooks for the backward even under ``no_sync`` entered after it (measured: one bucket all-reduce
on top of the one below). So the whole micro-step, forward and backward, runs under DDP's ``no_sync`` and, on the
micro-step that syncs (``accelerator.sync_gradients``; gradient accumulation keeps local sums until then, as DDP
does), all gradients are averaged in one flat all-reduce: the mean over processes that DDP computes, in one message.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["one_all_reduce"]


@contextmanager
def one_all_reduce(accelerator: Any, model: torch.nn.Module,
                   params: list[torch.nn.Parameter]) -> Iterator[Callable[[torch.Tensor], None]]:
    """Run one micro-step's forward and backward inside: yields ``backward(loss)`` (``accelerator.backward``).
    On leaving, the gradients of ``params`` are averaged over all processes at once. Only for a DDP-wrapped model:
    FSDP and DeepSpeed shard or bucket gradients themselves and keep their own backward."""
    if accelerator.num_processes == 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        yield accelerator.backward
        return
    with model.no_sync():
        yield accelerator.backward
    if accelerator.sync_gradients:
        average(accelerator.num_processes, params)


def average(num_processes: int, params: list[torch.nn.Parameter]) -> None:
    """Each parameter's gradient replaced by its mean over the processes, in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # same layout on every rank
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= num_processes
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()
