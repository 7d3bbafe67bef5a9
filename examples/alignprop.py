"""alignprop's version of TRL's ``examples/scripts/alignprop.py`` (TRL removed AlignPropTrainer in v0.24).

    python examples/alignprop.py                               # offline: tiny random-weight model, saturation
    python examples/alignprop.py --preset sd15-aesthetic       # the real run: SD 1.5 + aesthetic (GPU, hub)
    python examples/alignprop.py --num_epochs 20 --train_gradient_accumulation_steps 4 --sample_num_steps 50

TRL's original script also runs with only its imports changed: ``alignprop_core.trl_compat`` provides
``AlignPropConfig``, ``AlignPropTrainer``, ``DefaultDDPOStableDiffusionPipeline`` and ``aesthetic_scorer``
(docs/trl-migration.md lists the caveats). This version is written the alignprop way instead: the config fields
are TRL's (any ``--field value``; ``--pretrained_model`` and ``--use_lora`` are fields too); the aesthetic scorer
is the ``alignprop-reward-aesthetic`` plugin selected by name; the trainer loads the pipeline itself from
``pretrained_model``, so no pipeline wrapper is needed; the prompt function and image hook below are passed as in
TRL. The LoRA lands in ``output_dir`` and loads with ``pipe.load_lora_weights(output_dir)``.
"""

import random
import sys

import numpy as np
from PIL import Image

from alignprop_core import AlignPropError, AlignPropTrainer
from alignprop_core.cli import build_parser, resolve_config

ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
           "lion", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat",
           "gorilla", "hedgehog", "kangaroo"]


def prompt_fn():
    """TRL-style prompt function: one (prompt, metadata) per call."""
    return random.choice(ANIMALS), {}


def image_outputs_logger(image_data, global_step, accelerate_logger):
    """TRL's example hook, unchanged: logs the batch's images to the configured tracker (without one they are saved
    as PNGs under output_dir/images/hook/)."""
    result = {}
    images, prompts, rewards = [image_data["images"], image_data["prompts"], image_data["rewards"]]
    for i, image in enumerate(images):
        pil = Image.fromarray((image.cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8))
        pil = pil.resize((256, 256))
        result[f"{prompts[i]:.25} | {rewards[i]:.2f}"] = [pil]
    accelerate_logger.log_images(result, step=global_step)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--preset" not in argv and not any(not a.startswith("--") for a in argv[:1]):
        argv = ["--preset", "tiny", *argv]  # runs offline out of the box
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        argv += ["--output_dir", "alignprop-example-output"]  # its own folder: never replaces the CLI demo's LoRA
    try:
        config = resolve_config(build_parser().parse_args(["train", *argv]))
        trainer = AlignPropTrainer(config, prompt_function=prompt_fn, image_samples_hook=image_outputs_logger)
        result = trainer.train()
    except AlignPropError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved to {result.output_dir}; eval reward {result.eval_before.get('reward')} -> "
          f"{result.eval_after.get('reward')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
