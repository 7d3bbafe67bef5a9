"""The ``alignprop`` command line. Only the config module is imported up front, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from alignprop_core.config import AlignPropConfig, field_docs, read_config_file
from alignprop_core.errors import AlignPropError


def preset_names() -> list[str]:
    folder = resources.files("alignprop_core").joinpath("presets")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise AlignPropError(f"unknown preset '{name}'; available presets: {', '.join(preset_names())}")
    with resources.as_file(resources.files("alignprop_core").joinpath("presets", f"{name}.yaml")) as path:
        return read_config_file(path)


_METAVARS = {"rewards": "NAME:WEIGHT,...|YAML", "prompts": "NAME|YAML", "image_loggers": "NAME,...|YAML",
             "list": "A,B,...", "dict": "YAML"}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML or TOML config file (fields as below)")
    parser.add_argument("--preset", help=f"start from a bundled config: {', '.join(preset_names())}")
    groups: dict[str, Any] = {}
    for name, type_name, default, text, group in field_docs():
        arg_group = groups.setdefault(group, parser.add_argument_group(f"config fields: {group}"))
        metavar = _METAVARS.get(name) or _METAVARS.get(type_name.split("[")[0]) or \
            type_name.removeprefix("Optional[").removesuffix("]").upper()
        shown = "None" if default is None else repr(default) if isinstance(default, str) else default
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "metavar": metavar,
                                  "help": f"{text} (default: {shown})".replace("%", "%%")}
        if type_name == "bool":
            kwargs.update(nargs="?", const="true")
        arg_group.add_argument(f"--{name}", **kwargs)


def resolve_config(args: argparse.Namespace) -> AlignPropConfig:
    """Preset, then config file, then ``--field value`` overrides; validated."""
    values: dict[str, Any] = {}
    if args.preset:
        values.update(_read_preset(args.preset))
    if args.config:
        values.update(read_config_file(args.config))
    reserved = {"config", "preset", "command", "write", "func"}
    values.update({k: v for k, v in vars(args).items() if k not in reserved})
    return AlignPropConfig.from_dict(values).validate()


def cmd_train(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    from alignprop_core.trainer import AlignPropTrainer

    trainer = AlignPropTrainer(config)
    result = trainer.train()
    if result.eval_before and result.eval_after:
        before, after = result.eval_before["reward"], result.eval_after["reward"]
        print(f"fixed-seed eval reward ({config.eval_num_samples} samples): {before:.4f} -> {after:.4f} "
              f"({after - before:+.4f})")
    print(f"LoRA written to {result.lora_dir}/pytorch_lora_weights.safetensors; load it with "
          f"{type(trainer.pipe).__name__}.load_lora_weights('{result.lora_dir}')")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    text = resolve_config(args).to_yaml()
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    from alignprop_core import plugins

    found = plugins.registrations("reward")
    width = max([len(n) for n in found] + [4])
    print(f"{'name':<{width}}  {'package':<28} plugin / description")
    for name in sorted(found):
        reg = found[name]
        print(f"{name:<{width}}  {reg.package or '?':<28} {reg.plugin}: {reg.description}")
    missing = [f"{n} (pip install {p})" for n, p in plugins.KNOWN_REWARD_PACKAGES.items() if n not in found]
    if missing:
        print("not installed: " + ", ".join(missing))
    for plugin, error in plugins.failed_plugins.items():
        print(f"failed to load: plugin '{plugin}': {error}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from alignprop_core import plugins

    for kind, (_, plural) in plugins.KINDS.items():
        found = plugins.registrations(kind)
        print(f"{plural}: " + ", ".join(f"{n} [{found[n].package or found[n].plugin}]" for n in sorted(found)))
    for plugin, error in plugins.failed_plugins.items():
        print(f"failed to load: plugin '{plugin}': {error}")
    return 0


def cmd_tiny_pipeline(args: argparse.Namespace) -> int:
    from alignprop_core.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

    if args.sdxl:
        print(f"tiny SDXL pipeline written to {build_tiny_sdxl_pipeline(args.path)}")
    else:
        print(f"tiny SD-1.x pipeline written to {build_tiny_pipeline(args.path)}")
    return 0


_EVAL_ARGS = ("lora", "out", "prompts_file", "no_base", "batch_size", "prompt", "lora_scale", "num_per_prompt")


def _resolve_config_ignoring(args: argparse.Namespace, names: Sequence[str] = _EVAL_ARGS) -> AlignPropConfig:
    """``resolve_config`` for commands that add their own (non-config) arguments."""
    return resolve_config(argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in names}))


def cmd_eval(args: argparse.Namespace) -> int:
    config = _resolve_config_ignoring(args)
    from alignprop_core.evaluate import run_eval

    run_eval(config, args.lora or [], out_dir=args.out, prompts_file=args.prompts_file, include_base=not args.no_base,
             batch_size=args.batch_size)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    config = _resolve_config_ignoring(args)
    from alignprop_core.evaluate import read_prompts_file, run_sample

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)[0]
    run_sample(config, prompts, out_dir=args.out, lora=args.lora, lora_scale=args.lora_scale, seed=config.seed,
               num_per_prompt=args.num_per_prompt, batch_size=args.batch_size)
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from alignprop_core.mix import mix_loras

    file = mix_loras(args.loras, args.weights, args.out)
    print(f"mixed LoRA written to {file}; load it with StableDiffusionPipeline.load_lora_weights('{args.out}')")
    return 0


def _add_eval_parsers(sub: Any) -> None:
    evaluate = sub.add_parser(
        "eval", help="score the base model and LoRAs on fixed prompts and seeds",
        description="Render the base model and each LoRA from the same fixed prompts and noise (eval_num_samples "
        "prompts from the prompt source, seeded by eval_seed, or --prompts_file), score them with every configured "
        "reward, print the table and write eval.json, eval.csv, grid.png and index.html into -o.")
    evaluate.add_argument("--lora", nargs="+", metavar="DIR", help="LoRA folders to compare with the base model")
    evaluate.add_argument("--prompts_file", metavar="FILE", help="evaluate these prompts (.txt lines or .jsonl) "
                          "instead of drawing eval_num_samples from the prompt source")
    evaluate.add_argument("--no_base", action="store_true", help="leave the base model out")
    evaluate.add_argument("-o", "--out", default="alignprop-eval", metavar="DIR",
                          help="output folder (default: alignprop-eval)")
    evaluate.add_argument("--batch_size", type=int, metavar="N", help="images per batch (default: train_batch_size)")
    _add_config_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    sample = sub.add_parser(
        "sample", help="generate images from the base model plus an optional LoRA",
        description="Generate --num_per_prompt images per prompt (image j uses seed SEED + j, --seed sets SEED) "
        "with the config's model and sampling settings, plus an optional LoRA; PNGs and samples.jsonl go to -o.")
    sample.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    sample.add_argument("--prompts_file", metavar="FILE", help="more prompts: .txt (one per line) or .jsonl")
    sample.add_argument("--lora", metavar="DIR", help="LoRA folder to apply (default: the base model alone)")
    sample.add_argument("--lora_scale", type=float, default=1.0, metavar="S", help="LoRA strength (default: 1)")
    sample.add_argument("--num_per_prompt", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    sample.add_argument("-o", "--out", default="alignprop-samples", metavar="DIR",
                        help="output folder (default: alignprop-samples)")
    sample.add_argument("--batch_size", type=int, metavar="N", help="images per batch (default: train_batch_size)")
    _add_config_arguments(sample)
    sample.set_defaults(func=cmd_sample)
    mix = sub.add_parser(
        "mix", help="combine LoRAs into one (weighted LoRA soup)",
        description="Write a diffusers-format LoRA whose weight change is sum_i w_i * delta_i of the given LoRAs "
        "(exact: factors concatenated along the rank, each LoRA's alpha/rank honoured).")
    mix.add_argument("loras", nargs="+", metavar="LORA_DIR", help="LoRA folders (pytorch_lora_weights.safetensors)")
    mix.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per LoRA (default: equal, "
                     "summing to 1); negative weights subtract")
    mix.add_argument("-o", "--out", default="alignprop-mix", metavar="DIR", help="output folder (default: "
                     "alignprop-mix)")
    mix.set_defaults(func=cmd_mix)


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignprop", description="Align text-to-image diffusion models with "
                                     "differentiable rewards by reward backpropagation (AlignProp).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a LoRA", description="Fine-tune UNet LoRA weights by "
                           "backpropagating rewards. Every config field can be set in CONFIG or as --field value.")
    _add_config_arguments(train)
    train.set_defaults(func=cmd_train)
    config = sub.add_parser("config", help="print the resolved config, or write it with --write",
                            description="Print the resolved config (defaults < preset < CONFIG < --field value).")
    _add_config_arguments(config)
    config.add_argument("--write", metavar="PATH", help="write the YAML to PATH instead of printing it")
    config.set_defaults(func=cmd_config)
    sub.add_parser("rewards", help="list installed rewards with their plugin and package").set_defaults(
        func=cmd_rewards)
    sub.add_parser("plugins", help="list installed rewards, prompt sources and image loggers").set_defaults(
        func=cmd_plugins)
    tiny = sub.add_parser("tiny-pipeline", help="build a tiny random-weight SD-1.x (or --sdxl) pipeline in a folder")
    tiny.add_argument("path")
    tiny.add_argument("--sdxl", action="store_true", help="build the tiny SDXL pipeline instead")
    tiny.set_defaults(func=cmd_tiny_pipeline)
    _add_eval_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AlignPropError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
