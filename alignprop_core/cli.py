"""The ``alignprop`` command line. Only the config module is imported up front, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import importlib.abc
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from alignprop_core import __version__
from alignprop_core.config import AlignPropConfig, field_docs, preset_names, read_config_file, read_preset
from alignprop_core.errors import AlignPropError, ConfigError
from alignprop_core.hints import did_you_mean
from alignprop_core.paths import check_output_file, write_text_atomically

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
    """Preset, then config file, then ``--field value`` overrides; validated. Options that are not config fields
    (a command's own, such as ``--lora`` or ``--write``) are left out."""
    values: dict[str, Any] = {}
    if args.preset is not None:
        values.update(read_preset(args.preset))
    if args.config is not None:
        values.update(read_config_file(args.config))
    fields = {name for name, *_ in field_docs()}
    values.update({k: v for k, v in vars(args).items() if k in fields})
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
    if trainer.use_lora:
        print(f"LoRA written to {result.output_dir}/pytorch_lora_weights.safetensors; load it with "
              f"{type(trainer.pipe).__name__}.load_lora_weights('{result.output_dir}')")
    else:
        denoiser = trainer.family.denoiser(trainer.pipe)
        name = trainer.family.denoiser_name
        print(f"{trainer.family.denoiser_label} written to {result.output_dir}/{name}; load it with "
              f"{type(denoiser).__name__}.from_pretrained('{result.output_dir}', subfolder='{name}')")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    file = None if args.write is None else check_output_file(args.write, "--write", overwrite=args.overwrite)
    text = resolve_config(args).to_yaml()
    if file is None:
        print(text, end="")
        return 0
    write_text_atomically(file, text)
    print(f"wrote {args.write}")
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    from alignprop_core import plugins

    found = plugins.registrations("reward")
    width = max([len(n) for n in found] + [4])
    print(f"{'name':<{width}}  {'package':<28} plugin / description")
    for name in sorted(found):
        reg = found[name]
        print(f"{name:<{width}}  {reg.package or '?':<28} {reg.plugin}: {reg.description}")
        if args.details:
            for key, text in reg.details or (("details", "none registered by its plugin"),):
                print(f"{'':<{width}}    {key.replace('_', ' ') + ':':<12} {text}")
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
    from alignprop_core.tiny import build_tiny, tiny_families

    path = build_tiny(args.path, args.family, overwrite=args.overwrite)
    print(f"tiny {tiny_families()[args.family].label} pipeline written to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.lora_scales is not None:
        return cmd_lora_scales(args)
    config = resolve_config(args)
    from alignprop_core.evaluate import run_eval

    run_eval(config, args.lora or [], out_dir=args.out, prompts_file=args.prompts_file, include_base=not args.no_base,
             batch_size=args.batch_size, overwrite=args.overwrite)
    return 0


def cmd_lora_scales(args: argparse.Namespace) -> int:
    from alignprop_core.lora_scales import parse_lora_scales

    scales = parse_lora_scales(args.lora_scales)
    if not args.lora or len(args.lora) != 1:
        raise ConfigError("--lora_scales: give exactly one LoRA folder with --lora DIR")
    config = resolve_config(args)
    from alignprop_core.lora_scales import run_lora_scales

    run_lora_scales(config, args.lora[0], scales, out_dir=args.out, prompts_file=args.prompts_file,
                    batch_size=args.batch_size, overwrite=args.overwrite)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    from alignprop_core.evaluate import read_prompts_file
    from alignprop_core.samples import run_sample

    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        prompts += read_prompts_file(args.prompts_file)[0]
    run_sample(config, prompts, out_dir=args.out, lora=args.lora, lora_scale=args.lora_scale, seed=config.seed,
               num_per_prompt=args.num_per_prompt, batch_size=args.batch_size, overwrite=args.overwrite)
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from alignprop_core.families import family_for_lora
    from alignprop_core.lora_files import file_family
    from alignprop_core.mix import mix_loras, read_lora

    file = mix_loras(args.loras, args.weights, args.out, overwrite=args.overwrite)
    pipeline = family_for_lora(read_lora(args.out), file_family(file)).pipeline_classes[0]  # whose loader reads it
    print(f"mixed LoRA written to {file}; load it with {pipeline}.load_lora_weights('{args.out}')")
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
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier report in the output folder")
    evaluate.add_argument("--lora_scales", metavar="S,S,...", help="score the one --lora at each of these strengths "
                          "(e.g. 0,0.25,0.5,0.75,1; 0 = the base model) with every reward, held-out reward and "
                          "diversity; writes lora_scales.json/.csv/.html")
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
    sample.add_argument("--overwrite", action="store_true", help="replace images of the same names in the output "
                        "folder")
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
    mix.add_argument("--overwrite", action="store_true", help="replace a LoRA already in the output folder")
    mix.set_defaults(func=cmd_mix)


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def _choice_hint(message: str) -> str:
    """argparse's "invalid choice: 'trian' (choose from ...)" plus "did you mean 'train'?" when one is close."""
    match = _INVALID_CHOICE.search(message)
    if not match:
        return message
    hint = did_you_mean(match.group(1), [c.strip().strip("'\"") for c in match.group(2).split(",")])
    return f"{message} ({hint})" if hint else message


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _with_flag_hints(extras: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """The unrecognized arguments, each misspelled flag followed by "(did you mean --flag?)"."""
    options = _long_options(parser)
    shown = []
    for token in extras:
        hint = did_you_mean(token.split("=", 1)[0], options, quote="") if token.startswith("-") else ""
        shown.append(f"{token} ({hint})" if hint else token)
    return " ".join(shown)


def _chosen_subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(getattr(args, action.dest, None))
    return None


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line errors (no usage dump), "did you mean" hints and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3", "-inf" and "-nan" for options ("expected one argument"); with no option of ours
        # spelled like a number, every number-shaped token is a value
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)

    def error(self, message: str):
        self.exit(2, f"error: {_choice_hint(message)}; see `{self.prog} --help`\n")

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = _chosen_subparser(self, parsed) or self
            parser.error(f"unrecognized arguments: {_with_flag_hints(extras, parser)}")
        return parsed


def _add_verbose(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show the progress bars of diffusers/transformers/huggingface_hub while loading models")


def _add_tiny_parser(sub: Any) -> None:
    from alignprop_core.tiny import tiny_families  # no torch: the families load it on use

    families = tiny_families()
    labels = " or ".join(family.label for family in families.values())
    tiny = sub.add_parser("tiny-pipeline", help=f"build a tiny random-weight {labels} pipeline in a folder",
                          description="Build the tiny random-weight test pipeline into PATH (a new or empty folder).")
    tiny.add_argument("path", metavar="PATH", help="folder to create (must be new or empty unless --overwrite)")
    family = tiny.add_mutually_exclusive_group()
    default = next(iter(families))
    family.add_argument("--family", choices=tuple(families), default=default, help=f"model family (default: {default})")
    # the first spelling of the SDXL choice, kept working
    family.add_argument("--sdxl", dest="family", action="store_const", const="sdxl", help="same as --family sdxl")
    tiny.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty, replacing "
                      "pipeline files of the same names")
    tiny.set_defaults(func=cmd_tiny_pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignprop", description="Align text-to-image diffusion models with "
                                     "differentiable rewards by reward backpropagation (AlignProp).")
    parser.add_argument("--version", action="version", version=f"alignprop {__version__}")
    _add_verbose(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a LoRA", description="Fine-tune UNet LoRA weights by "
                           "backpropagating rewards. Every config field can be set in CONFIG or as --field value.")
    _add_config_arguments(train)
    train.set_defaults(func=cmd_train)
    config = sub.add_parser("config", help="print the resolved config, or write it with --write",
                            description="Print the resolved config (defaults < preset < CONFIG < --field value).")
    _add_config_arguments(config)
    config.add_argument("--write", metavar="PATH", help="write the YAML to PATH instead of printing it")
    config.add_argument("--overwrite", action="store_true", help="let --write replace an existing file")
    config.set_defaults(func=cmd_config)
    rewards = sub.add_parser("rewards", help="list installed rewards with their plugin and package")
    rewards.add_argument("--details", action="store_true",
                         help="also show each reward's weights source, licence, score scale, input size and the "
                              "model families it suits")
    rewards.set_defaults(func=cmd_rewards)
    sub.add_parser("plugins", help="list installed rewards, prompt sources and image loggers").set_defaults(
        func=cmd_plugins)
    _add_tiny_parser(sub)
    _add_eval_parsers(sub)
    for subparser in sub.choices.values():
        _add_verbose(subparser, default=argparse.SUPPRESS)  # -v also after the command
    return parser


# ---------------------------------------------------------------------- library progress bars


class _CallbackLoader(importlib.abc.Loader):
    """Wraps a module's loader: runs ``callback(module)`` once the module has been executed."""

    def __init__(self, loader: Any, callback: Callable[[Any], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _call_quietly(self._callback, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders and wraps its loader in a :class:`_CallbackLoader` (once)."""

    def __init__(self, name: str, callback: Callable[[Any], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CallbackLoader(spec.loader, self.callback)
                return spec
        return None


def _call_quietly(callback: Callable[[Any], None], module: Any) -> None:
    try:
        callback(module)
    except Exception:  # a library without this switch: keep its bars rather than fail
        pass


def run_after_import(module_name: str, callback: Callable[[Any], None]) -> None:
    """Call ``callback(module)`` now if ``module_name`` is imported, else right after its first import."""
    if module_name in sys.modules:
        _call_quietly(callback, sys.modules[module_name])
    elif not any(isinstance(f, _AfterImport) and f.name == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(module_name, callback))


def quiet_library_progress() -> None:
    """Hide the bars diffusers ("Loading pipeline components..."), transformers ("Loading weights") and
    huggingface_hub (downloads) draw, without importing them. alignprop's own training bar is plain tqdm and stays.
    ``HF_HUB_DISABLE_PROGRESS_BARS=0`` in the environment keeps them all, as ``--verbose`` does."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub, and so transformers, at import
    if "huggingface_hub" in sys.modules:
        run_after_import("huggingface_hub.utils", lambda module: module.disable_progress_bars())
    run_after_import("transformers.utils.logging", lambda module: module.disable_progress_bar())
    run_after_import("diffusers.utils.logging", lambda module: module.disable_progress_bar())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_library_progress()
    try:
        return args.func(args)
    except AlignPropError as exc:
        stopped_by_signal = getattr(exc, "exit_code", None)  # trainer.TrainingInterrupted: saved, not an error
        if stopped_by_signal:
            print(str(exc), file=sys.stderr)
            return stopped_by_signal
        message = " ".join(str(exc).split("\n"))  # one line, whatever the message
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `alignprop rewards --details | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":
    sys.exit(main())
