"""The alignprop plugin hooks: these docstrings are the API reference for plugin authors (``docs/plugins.md`` is
the guide, with examples).

A plugin is a module (or any object) with functions decorated by :data:`hookimpl`, published in the
``alignprop`` entry-point group of its package::

    [project.entry-points.alignprop]
    my_reward = "my_package.plugin"

A plugin imports from :mod:`alignprop_core.plugin_api` only. Each hook receives one argument, ``register``, a
function to call once per thing the plugin provides: ``register(name, factory, description="")``. Names are global
across all installed plugins: registering a name twice is an error that names both plugins. A hook that raises is
warned about once and its plugin's names are missing; the other plugins still work.

Factories are called with the entry's ``options`` as keyword arguments (options a factory does not accept are a
one-line error before it is called); they should check their options and raise a one-line ``PluginError``.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("alignprop")
hookimpl = HookimplMarker("alignprop")


@hookspec
def register_rewards(register):
    """Register differentiable rewards by name.

    Call ``register(name, factory, description="", details=None)``. ``details``: optional strings under ``source``,
    ``license``, ``scale``, ``input_size``, ``suits``, shown by ``alignprop rewards --details``.
    ``factory(**options)`` is called with the ``options``
    mapping of the config entry that selects this reward (``rewards: [{name, weight, options}]``) and returns the
    reward: a callable ``reward(images, prompts, metadata) -> Tensor`` where

    - ``images`` is a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` that is part of the autograd graph
      (H and W are whatever the sampler produced: any size, not necessarily square);
    - ``prompts`` is a list of B strings and ``metadata`` a list of B dicts from the prompt source
      (e.g. ``{"questions": [...], "answers": [...]}`` from the ``counting`` source);
    - the result is a tensor of shape ``[B]``, higher is better, differentiable with respect to ``images``.

    If the reward is a ``torch.nn.Module``, the trainer moves it with ``reward.to(device)`` and freezes it
    (``eval()``, ``requires_grad_(False)``) so that its own parameters never receive gradients; subclass
    ``plugin_api.FrozenReward`` to keep it frozen outside the trainer too. It is called under the trainer's autocast
    with images on that device. The trainer checks every result (a float tensor ``[B]`` with a ``grad_fn``; a TRL-style
    ``(rewards, info)`` tuple is accepted). Factories should import heavy libraries lazily and load weights only when
    called.

    A config entry's ``views`` and ``normalize`` are applied by the core around the reward (it is then called on
    ``V * B`` crops, prompts and metadata repeated): a reward just scores the images it gets, at any size.

    Optional: a reward with a method ``embed_images(images) -> Tensor[B, D]`` (its image embedding, no gradient
    needed) can serve as the features of the eval diversity measure (``eval_diversity_features: <name>``).
    """


@hookspec
def register_image_loggers(register):
    """Register image loggers by name.

    Call ``register(name, factory, description="")``. ``factory(output_dir, **options)`` returns a callable
    ``logger(image_data, global_step, accelerate_logger)`` that the trainer calls every ``log_image_freq``
    optimizer steps on the main process. ``image_data`` is a dict of batched ``images`` (float ``[B,3,H,W]``
    in ``[0,1]``, detached, on the CPU), ``prompts``, ``prompt_metadata``, ``rewards`` (``[B]`` weighted total)
    and ``reward_components`` (a dict ``name -> [B]``); for configured image loggers also ``fixed``: ``{"images"
    [N,3,H,W], "prompts", "seeds"}``, the first fixed evaluation samples rendered with the current weights (the same
    prompts and noise at every call, so progress shows as a strip). ``accelerate_logger`` has ``log_images(dict, step)``
    and ``log(dict, step)``, and works even when no tracker is configured. A logger may have a ``close()``
    method, called once at the end of training.
    """


@hookspec
def register_prompt_sources(register):
    """Register prompt sources by name.

    Call ``register(name, factory, description="")``. ``factory(**options)`` returns a callable taking no
    arguments that returns one ``(prompt: str, metadata: dict)`` pair per call (TRL's ``prompt_fn``); ``metadata``
    is passed on to the rewards and image loggers. Draw randomness from Python's global ``random`` (or numpy's
    global) generator: the trainer seeds both before every call from ``(seed, step, sample index)`` (evaluation
    samples: from ``eval_seed`` and the index) and restores them after, so a resumed run draws the same prompts
    without any RNG state in its checkpoints. Do not keep a private generator or a counter.
    """
