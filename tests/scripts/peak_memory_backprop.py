"""Peak RSS growth (MiB) of one full-backprop sample+backward on a pipeline folder; used by test_sampler.

The peak is this process's VmHWM, reset to the current RSS just before the measured step (/proc/self/clear_refs).
Not ``ru_maxrss``: Linux carries it over from the parent through fork and exec, so a child of a large pytest process
(the full suite) reported a growth of 0 for both settings.

usage: peak_memory_backprop.py PIPELINE_DIR CHECKPOINTING(0|1) STEPS SIZE
"""
import sys

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from alignprop_core.lora import add_lora
from alignprop_core.sampler import encode_prompts, sample_images


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


path, ckpt, steps, size = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
for module in (pipe.unet, pipe.vae, pipe.text_encoder):
    module.requires_grad_(False)
params = add_lora(pipe.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
emb = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, torch.device("cpu"))
g = torch.Generator().manual_seed(0)
sample_images(pipe, emb, num_steps=2, guidance_scale=5.0, eta=1.0, height=size, width=size, grad_steps=0, generator=g)
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM to the current RSS
base = status_kib("VmRSS")
images = sample_images(pipe, emb, num_steps=steps, guidance_scale=5.0, eta=1.0, height=size, width=size,
                       grad_steps=steps, generator=g, gradient_checkpointing=ckpt)
images.mean().backward()
print((status_kib("VmHWM") - base) / 1024, "MiB")
