"""TRL's spellings of config fields and how they map onto alignprop's: the ``truncated_backprop_*`` truncation fields,
accelerate ``ProjectConfiguration`` keys in ``project_kwargs``, and the fields TRL's example scripts declare
themselves (hidden from HfArgumentParser). docs/trl-migration.md explains each."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from alignprop_core.errors import ConfigError
from alignprop_core.hints import did_you_mean
from alignprop_core.validation import check_type, require

#: TRL's truncation fields: real fields, translated onto ``truncation*`` (see ``apply_trl_truncation``).
TRL_TRUNCATION_FIELDS = ("truncated_backprop_rand", "truncated_backprop_timestep", "truncated_rand_backprop_minmax")
#: Fields that TRL's example scripts declare in their own ``ScriptArguments``: hidden from HfArgumentParser, which
#: would otherwise register ``--pretrained_model`` twice (see ``hide_from_hf_argparser``).
HF_ARGPARSER_HIDDEN = ("pretrained_model", "pretrained_revision", "use_lora")
#: ProjectConfiguration keys TRL scripts pass in ``project_kwargs`` and what alignprop does with each.
PROJECT_KWARGS = ("project_dir", "logging_dir", "total_limit", "automatic_checkpoint_naming", "save_on_each_node")


def apply_trl_truncation(config: Any) -> None:
    """TRL counts *detached* steps: with ``truncated_backprop_timestep`` t of N steps the last N - t keep gradients;
    with ``truncated_rand_backprop_minmax`` (a, b) TRL detaches a random count in [a, b]. So K = N - t (fixed) or
    K ~ U[max(1, N - b), N - a] (uniform), with TRL's defaults for the fields not given (rand true, t 49, (0, 50)).
    A ``truncation*`` field that was set to something else than its default and disagrees is an error."""
    steps = config.sample_num_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        return  # validate() reports sample_num_steps
    rand = True if config.truncated_backprop_rand is None else config.truncated_backprop_rand
    timestep = 49 if config.truncated_backprop_timestep is None else config.truncated_backprop_timestep
    minmax = [0, 50] if config.truncated_rand_backprop_minmax is None else config.truncated_rand_backprop_minmax
    check_type("truncated_backprop_rand", rand, "bool")
    check_type("truncated_backprop_timestep", timestep, "int")
    if not (isinstance(minmax, list) and len(minmax) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in minmax)):
        raise ConfigError(f"truncated_rand_backprop_minmax: got {minmax!r}, allowed: two integers [a, b]")
    if rand:
        low, high = minmax
        require(0 <= low <= high and low < steps, "truncated_rand_backprop_minmax", minmax,
                 f"[a, b] with 0 <= a <= b and a < sample_num_steps={steps} (a = {steps} or more detaches every "
                 "step, so no step would keep a gradient)")
        wanted = {"truncation": "uniform", "truncation_min": max(1, steps - high), "truncation_max": steps - low}
    else:
        require(0 <= timestep < steps, "truncated_backprop_timestep", timestep,
                 f"an integer in [0, sample_num_steps - 1 = {steps - 1}] (t = {steps} or more detaches every step, "
                 "so no step would keep a gradient)")
        wanted = {"truncation": "fixed", "truncation_k": steps - timestep}
    defaults = {"truncation": "uniform", "truncation_k": 1, "truncation_min": 1, "truncation_max": None}
    earlier = getattr(config, "_trl_translation", {})  # what an earlier translation set is not the user's value
    given = ", ".join(f"{n}={getattr(config, n)!r}" for n in TRL_TRUNCATION_FIELDS if getattr(config, n) is not None)
    for name, value in wanted.items():
        current = getattr(config, name)
        if current not in (defaults[name], value, earlier.get(name)):
            raise ConfigError(f"{name}: got {current!r}, but TRL's {given} means {name}={value!r}; give the "
                              "truncation in one spelling (truncation* or TRL's truncated_backprop_*)")
    for name, value in wanted.items():
        setattr(config, name, value)
    config._trl_translation = wanted


def apply_project_kwargs(config: Any) -> None:
    """TRL scripts pass accelerate ``ProjectConfiguration`` keys; alignprop writes everything under ``output_dir``:
    ``project_dir`` is output_dir (it replaces the default one), ``total_limit`` is num_checkpoint_limit,
    ``automatic_checkpoint_naming`` is what alignprop always does (checkpoints/checkpoint-<step>), ``logging_dir``
    is the tracker folder (see ``tracker_logging_dir``)."""
    kwargs = config.project_kwargs
    unknown = sorted(str(k) for k in kwargs if k not in PROJECT_KWARGS)
    if unknown:
        hint = did_you_mean(unknown[0], PROJECT_KWARGS)
        hint = f" ({hint})" if hint else ""
        raise ConfigError(f"project_kwargs: unknown key '{unknown[0]}'{hint}; allowed: {', '.join(PROJECT_KWARGS)}"
                          + ("; checkpoints are numbered by step, drop 'iteration'" if unknown[0] == "iteration"
                             else ""))
    for key in ("project_dir", "logging_dir"):
        if key in kwargs and not (isinstance(kwargs[key], (str, os.PathLike)) and str(kwargs[key])):
            raise ConfigError(f"project_kwargs.{key}: got {kwargs[key]!r}, allowed: a folder path")
    for key in ("automatic_checkpoint_naming", "save_on_each_node"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise ConfigError(f"project_kwargs.{key}: got {kwargs[key]!r}, allowed: true or false")
    if "project_dir" in kwargs:
        project_dir = os.path.expanduser(str(kwargs["project_dir"]))
        if config._output_dir_derived:
            config.output_dir = project_dir
        elif os.path.abspath(project_dir) != os.path.abspath(config.output_dir):
            raise ConfigError(f"project_kwargs.project_dir: got '{project_dir}' but output_dir is "
                              f"'{config.output_dir}'; alignprop writes the whole run to output_dir: drop one of them "
                              "or make them equal")
    if "total_limit" in kwargs:
        limit = kwargs["total_limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"project_kwargs.total_limit: got {limit!r}, allowed: an integer >= 1 (it sets "
                              "num_checkpoint_limit)")
        if config.num_checkpoint_limit not in (5, limit):
            raise ConfigError(f"num_checkpoint_limit: got {config.num_checkpoint_limit}, but project_kwargs.total_limit"
                              f" is {limit}; give the checkpoint limit once")
        config.num_checkpoint_limit = limit


def hide_from_hf_argparser(cls: type, names: tuple[str, ...] = HF_ARGPARSER_HIDDEN) -> None:
    """HfArgumentParser skips fields whose ``init`` flag is off. TRL's example scripts parse
    ``(ScriptArguments, AlignPropConfig)`` where ScriptArguments already declares ``pretrained_model``,
    ``pretrained_revision`` and ``use_lora``; argparse refuses an option declared twice. Turning the flag off after
    the dataclass has generated ``__init__`` keeps these fields in the constructor, YAML and our CLI, and hides them
    from HfArgumentParser only (``dataclasses.replace`` cannot set them: use ``AlignPropConfig.replace``)."""
    for f in dataclasses.fields(cls):
        if f.name in names:
            f.init = False
