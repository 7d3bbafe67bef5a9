"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) or in one process; used by
tests/test_reliability.py. Checks after every step that all ranks hold the same LoRA, then trains to the end with
logging/checkpoints, and writes this rank's first gradient, final LoRA and metrics to RESULT_DIR/rank<i>.json.

usage: multiprocess_train.py PIPELINE_DIR OUTPUT_DIR RESULT_DIR BATCH_SIZE

MEMORY_BUDGET_GB=x sets checkpoint_memory_budget_gb; the denoiser calls checkpointed (recomputed in backward) are
counted either way. COMPILE_GRAD_CALLS=1 sets compile_grad_calls (a manual check, see docs/benchmarks.md).
"""

import contextlib
import json
import os
import sys

import torch
import torch.distributed

from alignprop_core import AlignPropConfig, AlignPropTrainer, grad_sync, sampler

pipeline, output_dir, result_dir, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = AlignPropConfig(pretrained_model=pipeline, rewards="saturation", num_epochs=4, sample_num_steps=4,
                         train_batch_size=batch_size, truncation="uniform", truncation_max=4, mixed_precision="no",
                         eval_num_samples=0, output_dir=output_dir, save_freq=2, train_learning_rate=1e-2,
                         checkpoint_memory_budget_gb=float(os.environ.get("MEMORY_BUDGET_GB") or 0) or None,
                         compile_grad_calls=os.environ.get("COMPILE_GRAD_CALLS") == "1")
trainer = AlignPropTrainer(config)

calls = {"recomputed": 0}
real_checkpoint = sampler.checkpoint


def counting_checkpoint(*args, **kwargs):
    calls["recomputed"] += 1
    return real_checkpoint(*args, **kwargs)


sampler.checkpoint = counting_checkpoint

# Count the gradient all-reduces: DDP's own (a comm hook sees every bucket it reduces) and torch.distributed's.
counts = {"ddp_buckets": 0, "all_reduce": 0}
if os.environ.get("PLAIN_DDP_BACKWARD"):  # the path before grad_sync, for measuring what it replaced
    @contextlib.contextmanager
    def plain_ddp(accelerator, model, params):
        yield accelerator.backward

    grad_sync.one_all_reduce = plain_ddp
if trainer.accelerator.num_processes > 1:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def counting_hook(state, bucket):
        counts["ddp_buckets"] += 1
        return allreduce_hook(state, bucket)

    trainer.unet.register_comm_hook(None, counting_hook)
    real_all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(*args, **kwargs):
        counts["all_reduce"] += 1
        return real_all_reduce(*args, **kwargs)

    torch.distributed.all_reduce = counting_all_reduce


def lora() -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.trainable_params])


# The first micro-batch's gradient, synchronised across ranks by DDP in backward, before any optimizer step.
trainer._train_micro_batch(0)
first_grad = torch.cat([p.grad.flatten() for p in trainer.trainable_params]).tolist()
trainer.optimizer.zero_grad(set_to_none=True)

history, reduces = [], []
for _ in range(2):  # step by step: every rank must hold identical weights after each optimizer step
    before = dict(counts)
    history.append(trainer.train_step())
    reduces.append({name: counts[name] - before[name] for name in counts})
    everyone = trainer.accelerator.gather(lora()[None])
    assert all(torch.equal(everyone[0], row) for row in everyone), "ranks diverged"
result = trainer.train()  # steps 3-4 with metrics, checkpoints and LoRA export
rank = trainer.accelerator.process_index
with open(f"{result_dir}/rank{rank}.json", "w") as handle:
    json.dump({"world": trainer.accelerator.num_processes, "lora": lora().tolist(), "first_grad": first_grad,
               "history": history + result.history, "reduces_per_step": reduces, "calls": calls}, handle)
