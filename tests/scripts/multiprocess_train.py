"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) or in one process; used by
tests/test_reliability.py. Checks after every step that all ranks hold the same LoRA, then trains to the end with
logging/checkpoints, and writes this rank's first gradient, final LoRA and metrics to RESULT_DIR/rank<i>.json.

usage: multiprocess_train.py PIPELINE_DIR OUTPUT_DIR RESULT_DIR BATCH_SIZE
"""

import json
import sys

import torch

from alignprop_core import AlignPropConfig, AlignPropTrainer

pipeline, output_dir, result_dir, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = AlignPropConfig(pretrained_model=pipeline, rewards="saturation", num_epochs=4, sample_num_steps=4,
                         train_batch_size=batch_size, truncation="uniform", truncation_max=4, mixed_precision="no",
                         eval_num_samples=0, output_dir=output_dir, save_freq=2, train_learning_rate=1e-2)
trainer = AlignPropTrainer(config)


def lora() -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.trainable_params])


# The first micro-batch's gradient, synchronised across ranks by DDP in backward, before any optimizer step.
trainer._train_micro_batch(0)
first_grad = torch.cat([p.grad.flatten() for p in trainer.trainable_params]).tolist()
trainer.optimizer.zero_grad(set_to_none=True)

history = []
for _ in range(2):  # step by step: every rank must hold identical weights after each optimizer step
    history.append(trainer.train_step())
    everyone = trainer.accelerator.gather(lora()[None])
    assert all(torch.equal(everyone[0], row) for row in everyone), "ranks diverged"
result = trainer.train()  # steps 3-4 with metrics, checkpoints and LoRA export
rank = trainer.accelerator.process_index
with open(f"{result_dir}/rank{rank}.json", "w") as handle:
    json.dump({"world": trainer.accelerator.num_processes, "lora": lora().tolist(), "first_grad": first_grad,
               "history": history + result.history}, handle)
