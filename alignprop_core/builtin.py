"""The built-in plugin: registered through the same hooks as installed plugins."""

from alignprop_core import image_loggers, prompts, rewards
from alignprop_core.hookspecs import hookimpl


@hookimpl
def register_rewards(register):
    no_weights = {"source": "no weights (alignprop-core)", "license": "Apache-2.0", "input_size": "any (every pixel)"}
    register("saturation", rewards.Saturation, "mean HSV saturation in [0, 1]; needs no weights",
             details={**no_weights, "scale": "[0, 1]", "suits": "any family; smoke tests and demos"})
    register("contrast", rewards.Contrast, "standard deviation of luma in [0, 0.5]; needs no weights",
             details={**no_weights, "scale": "[0, 0.5]", "suits": "any family; smoke tests and demos"})


@hookimpl
def register_prompt_sources(register):
    register("simple_animals", prompts.simple_animals, "a random common animal (45 names)")
    register("imagenet_animals", prompts.imagenet_animals, "a random ImageNet animal class (398 names)")
    register("nouns_activities", prompts.nouns_activities, "'<noun> <activity>', e.g. 'a fox riding a bike'")
    register("counting", prompts.counting, "'three cats' with VQA questions/answers metadata")
    register("from_file", prompts.from_file, "random line of a .txt or record of a .jsonl file (option: path)")


@hookimpl
def register_image_loggers(register):
    register("folder", image_loggers.FolderLogger,
             "PNGs, samples.jsonl and an HTML gallery (index.html) under output_dir/images")
    register("tensorboard", image_loggers.TensorBoardLogger,
             "images, prompts and scores to TensorBoard (needs: pip install tensorboard)")
    register("wandb", image_loggers.WandbLogger, "images with captions and a table to Weights & Biases "
             "(needs: pip install wandb; mode: offline works without network)")
