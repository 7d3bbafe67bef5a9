"""One family's training steps against plain diffusers inference of the same batch, side by side in one process.

    .venv/bin/python bench/limits.py --family sd [--steps 50 --batch 2 --repeats 3 --ks 1,all --threads 2]

prints one JSON line (``bench/run.py --only limits`` runs every family and writes bench/results/limits.json).

Both sides load the same tiny pipeline folder through ``from_pretrained``: *inference* is a fresh
``DiffusionPipeline`` with no LoRA called as a user would (``pipe(prompt=..., num_inference_steps, guidance_scale,
height, width, output_type="pt")``, under ``torch.no_grad`` as diffusers' ``__call__`` is), *train* is
``AlignPropTrainer.train_step`` (sample with gradients through the last K denoiser calls, decode, the weight-free
``saturation`` reward, backward, optimizer step) with the same prompts, steps, guidance, size and scheduler. Each
repeat times inference, then one step per K, in that order; the ratio of a repeat is step / inference of that repeat
(so a slower machine moment hits both sides of a ratio alike). One warm-up of each before the first repeat.

Per-family settings are the models' own sampling settings scaled to the tiny pipelines: SD/SDXL DDIM with eta 1 and
guidance 5 (one batched CFG call); SD3 guidance 5 (true CFG, batched); FLUX.1 embedded guidance 3.5; FLUX.2 [klein]
guidance 4; Qwen-Image true CFG 4 with the negative prompt " "; Z-Image guidance 4. The flow families sample the ODE
(eta 0) on both sides, as their pipelines do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPTS, REWARDS, emit  # noqa: E402

#: family -> (guidance_scale, eta, negative prompt, true_cfg_scale)
SETTINGS = {"sd": (5.0, 1.0, None, 1.0), "sdxl": (5.0, 1.0, None, 1.0), "sd3": (5.0, 0.0, None, 1.0),
            "flux": (3.5, 0.0, None, 1.0), "flux2-klein": (4.0, 0.0, None, 1.0),
            "qwen-image": (5.0, 0.0, " ", 4.0), "z-image": (4.0, 0.0, None, 1.0)}


def build_folder(family: str, root: Path) -> Path:
    from alignprop_core.tiny import build_tiny

    return build_tiny(root / family, family)


def inference_pipeline(folder: Path, family: str):
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    if family in ("sd", "sdxl"):  # the trainer's sampler for these (scheduler: auto -> ddim)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inference(pipe, family: str, prompts: list[str], args: argparse.Namespace, size: int) -> None:
    import torch

    from alignprop_core.families import family_of

    guidance, eta, negative, true_cfg = SETTINGS[family]
    kwargs = family_of(pipe).pipeline_call_kwargs(prompts, args.steps, guidance, size, size, negative_prompt=negative,
                                                  eta=eta, true_cfg_scale=true_cfg)
    pipe(generator=torch.Generator().manual_seed(0), **kwargs)


def positive_int(text: str) -> int:
    """argparse type of the counts (threads, repeats, rows): an integer >= 1."""
    value = int(text)  # not a number: argparse's one-line "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parse_k(text: str) -> str:
    """argparse type of a truncation depth: ``all`` or an integer >= 1 (kept as text, as the case names use it)."""
    if text != "all" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return text


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--steps``, ``--batch`` and ``--size`` as the trainer's config checks them: a one-line error, exit 2."""
    from alignprop_core.config import AlignPropConfig
    from alignprop_core.errors import ConfigError

    try:
        AlignPropConfig(sample_num_steps=args.steps, train_batch_size=args.batch, resolution=args.size).validate()
    except ConfigError as exc:
        parser.error(str(exc))


def parse_override(text: str, option: str = "--compare") -> tuple[str, object]:
    """``key=value`` of ``--compare``: a config field and its value, read as the CLI reads ``--key value`` (the
    field's declared type) and checked by ``AlignPropConfig.validate``; a one-line ConfigError otherwise."""
    from alignprop_core.config import AlignPropConfig, field_type
    from alignprop_core.config_files import coerce_text
    from alignprop_core.errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep or key not in AlignPropConfig.__annotations__:
        raise ConfigError(f"{option}: expected KEY=VALUE with KEY a config field, got {text!r}")
    parsed = coerce_text(key, field_type(key), value)
    AlignPropConfig(**{key: parsed}).validate()
    return key, parsed


def parse_overrides(text: str, option: str = "--compare") -> dict[str, object]:
    """One ``--compare`` case: ``key=value`` pairs separated by spaces (levers measured together), each read by
    :func:`parse_override`, then checked together by ``AlignPropConfig.validate``."""
    from alignprop_core.config import AlignPropConfig

    parts = text.split() or [text]
    overrides = dict(parse_override(part, option) for part in parts)
    AlignPropConfig(**overrides).validate()
    return overrides


def trainer_for(folder: Path, family: str, k: str, args: argparse.Namespace, output_dir: str, **overrides):
    from alignprop_core import AlignPropConfig, AlignPropTrainer

    guidance, eta, negative, true_cfg = SETTINGS[family]
    truncation = {"truncation": "none"} if k == "all" else {"truncation": "fixed", "truncation_k": int(k)}
    config = AlignPropConfig(pretrained_model=str(folder), seed=0, num_epochs=10**6, sample_num_steps=args.steps,
                             sample_guidance_scale=guidance, sample_eta=eta, negative_prompts=negative,
                             true_cfg_scale=true_cfg, train_batch_size=args.batch, gradient_checkpointing=True,
                             eval_num_samples=0, output_dir=output_dir, save_freq=10**9, resolution=args.size,
                             **truncation, **overrides)
    prompts = iter(range(10**9))
    return AlignPropTrainer(config, reward_function=REWARDS["saturation"](),
                            prompt_function=lambda: (PROMPTS[next(prompts) % args.batch], {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--ks", type=lambda text: [parse_k(k.strip()) for k in text.split(",")], default="1,all",
                        help="truncation depths, comma-separated: numbers or 'all' (default 1,all)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                        help="also time each K with this config override (a lever off or on; several levers together: "
                        "'KEY=VALUE KEY2=VALUE2'), in the same repeats")
    args = parser.parse_args()
    check_training_args(parser, args)
    from alignprop_core.errors import ConfigError

    try:
        overrides = [parse_overrides(spec) for spec in args.compare]
    except ConfigError as exc:
        parser.error(str(exc))
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    ks = args.ks
    cases = [(k, k, {}) for k in ks] + [(f"{k} {spec}", k, override) for spec, override in zip(args.compare, overrides)
                                        for k in ks]
    prompts = [PROMPTS[i % args.batch] for i in range(args.batch)]  # the prompts each training step draws
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(args.family, Path(tmp))
        pipe = inference_pipeline(folder, args.family)
        trainers = {name: trainer_for(folder, args.family, k, args, f"{tmp}/out-{i}", **overrides)
                    for i, (name, k, overrides) in enumerate(cases)}
        size = args.size
        assert all((t.height, t.width) == (size, size) for t in trainers.values())
        inference(pipe, args.family, prompts, args, size)  # warm-up
        drawn = {name: [trainer.train_step()["k"]] for name, trainer in trainers.items()}
        times = {"inference": [], **{name: [] for name in trainers}}
        for _ in range(args.repeats):
            start = time.perf_counter()
            inference(pipe, args.family, prompts, args, size)
            times["inference"].append(time.perf_counter() - start)
            for name, trainer in trainers.items():
                start = time.perf_counter()
                drawn[name].append(trainer.train_step()["k"])
                times[name].append(time.perf_counter() - start)
    ratios = {name: [t / i for t, i in zip(times[name], times["inference"])] for name in trainers}
    emit({**vars(args), "times_s": times, "k_drawn": drawn,
          "ratio": {name: {"median": statistics.median(r), "min": min(r), "max": max(r), "all": r}
                    for name, r in ratios.items()}, "torch": torch.__version__, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
