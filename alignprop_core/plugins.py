"""The one plugin manager: loads built-in and installed plugins once and resolves names to factories."""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy

from alignprop_core import hookspecs
from alignprop_core.errors import PluginError
from alignprop_core.hints import close_names
from alignprop_core.options import error_text

ENTRY_POINT_GROUP = "alignprop"
BUILTIN_PLUGINS = ("alignprop_core.builtin",)

#: Rewards we know of that live in separately installable packages (shown when a name is not installed).
KNOWN_REWARD_PACKAGES = {
    "aesthetic": "alignprop-reward-aesthetic",
    "hps": "alignprop-reward-hps",
    "pickscore": "alignprop-reward-pickscore",
    "flava_vqa": "alignprop-reward-flava-vqa",
    "imagereward": "alignprop-reward-imagereward",
    "clip_score": "alignprop-reward-clipscore",
    "aesthetic_v25": "alignprop-reward-aesthetic-v25",
    "mps": "alignprop-reward-mps",
    "hpsv3": "alignprop-reward-hpsv3",
}

#: The keys of a registration's ``details`` (``alignprop rewards --details``), in the order they are shown.
DETAIL_KEYS = ("source", "license", "scale", "input_size", "suits")

# kind -> (hook name, plural used in messages)
KINDS = {
    "reward": ("register_rewards", "rewards"),
    "image logger": ("register_image_loggers", "image loggers"),
    "prompt source": ("register_prompt_sources", "prompt sources"),
}

pm = pluggy.PluginManager("alignprop")
pm.add_hookspecs(hookspecs)

#: plugin name -> "ExcType: message" for plugins whose import or registration failed.
failed_plugins: dict[str, str] = {}
_warned: set[tuple[str, str]] = set()  # (plugin, what failed) already warned about in this process
_plugin_packages: dict[str, str] = {}  # plugin name -> distribution that installed it
_loaded = False


@dataclass(frozen=True)
class Registration:
    """One named thing a plugin registered."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    package: str | None
    description: str = ""
    details: tuple[tuple[str, str], ...] = ()  # (key, text) pairs, keys from DETAIL_KEYS


def load_plugins() -> None:
    """Register the built-in plugins and every ``alignprop`` entry point, once per process.

    A plugin that fails to import is recorded in :data:`failed_plugins` (and warned about) without
    affecting the others.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        _plugin_packages[module_name] = "alignprop-core"
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name) or ep.name in failed_plugins:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            _record_failure(ep.name, "failed to load", exc)
            continue
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            _plugin_packages[ep.name] = ep.dist.name


def _record_failure(plugin: str, what: str, exc: Exception) -> None:
    """Remember a plugin's failure in :data:`failed_plugins` and warn about it once, in one stderr line."""
    failed_plugins[plugin] = error_text(exc)
    if (plugin, what) not in _warned:
        _warned.add((plugin, what))
        print(f"warning: alignprop plugin '{plugin}' {what}: {failed_plugins[plugin]}", file=sys.stderr)


def reset() -> None:
    """Forget loaded plugins so the next lookup loads entry points again (after ``pip install`` in a notebook)."""
    global _loaded
    for name, _plugin in list(pm.list_name_plugin()):
        pm.unregister(name=name)
    failed_plugins.clear()
    _warned.clear()
    _plugin_packages.clear()
    _loaded = False


def registrations(kind: str) -> dict[str, Registration]:
    """Every registered ``kind`` ("reward", "image logger", "prompt source") by name, from all plugins."""
    load_plugins()
    hook_name, _ = KINDS[kind]
    found: dict[str, Registration] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():  # in registration order
        plugin = impl.plugin_name
        mine: dict[str, Registration] = {}  # kept only if the hook returns: a hook that raises registers nothing

        def register(name: str, factory: Callable[..., Any], description: str = "", details: Any = None,
                     _plugin: str = plugin, _mine: dict[str, Registration] = mine) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin '{_plugin}' registered a {kind} with an invalid name {name!r}")
            checked_details = _check_details(details, f"plugin '{_plugin}' ({kind} '{name}')")
            if name in found or name in _mine:
                raise PluginError(
                    f"{kind} '{name}' is registered twice, by plugin '{(found.get(name) or _mine[name]).plugin}' and "
                    f"by plugin '{_plugin}'; uninstall one of them"
                )
            _mine[name] = Registration(kind, name, factory, _plugin, _plugin_packages.get(_plugin), description,
                                       checked_details)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:  # a hook that raises: its plugin's names are missing, the others still work
            _record_failure(plugin, f"failed in {hook_name}", exc)
            continue
        found.update(mine)
    return found


def _check_details(details: Any, owner: str) -> tuple[tuple[str, str], ...]:
    """A registration's ``details`` mapping as ``(key, text)`` pairs in :data:`DETAIL_KEYS` order. An unknown key or
    a value that is not a string raises ``TypeError``: that plugin's hook fails (warned once), the others work."""
    if details is None:
        return ()
    if not isinstance(details, dict):
        raise TypeError(f"{owner}: details must be a dict of {', '.join(DETAIL_KEYS)}, got {type(details).__name__}")
    unknown = [k for k in details if k not in DETAIL_KEYS]
    if unknown or not all(isinstance(v, str) for v in details.values()):
        raise TypeError(f"{owner}: details takes string values for {', '.join(DETAIL_KEYS)}; got "
                        f"{ {k: type(v).__name__ for k, v in details.items()} }")
    return tuple((k, details[k]) for k in DETAIL_KEYS if details.get(k))


def get(kind: str, name: str) -> Registration:
    """The registration for ``name``, or a one-line :class:`PluginError` listing what is installed."""
    found = registrations(kind)
    if name in found:
        return found[name]
    plural = KINDS[kind][1]
    message = f"unknown {kind} '{name}'; installed {plural}: {', '.join(sorted(found)) or '(none)'}"
    known = KNOWN_REWARD_PACKAGES if kind == "reward" else {}
    if name in known:
        message += f". '{name}' is provided by {known[name]}: pip install {known[name]}"
    else:
        close = close_names(str(name), list(found) + [n for n in known if n not in found])
        if close:
            message += "; did you mean " + " or ".join(f"'{n}'" for n in close) + "?"
        if close and close[0] not in found:
            message += f" It is provided by {known[close[0]]}: pip install {known[close[0]]}"
    if failed_plugins:
        message += "; plugins that failed to load: " + ", ".join(f"{p} ({e})" for p, e in failed_plugins.items())
    raise PluginError(message)


def build(kind: str, name: str, options: dict[str, Any] | None = None, **context: Any) -> Any:
    """Resolve ``name`` and call its factory with ``options`` (and ``context``, e.g. ``output_dir``)."""
    registration = get(kind, name)
    kwargs = {**context, **(options or {})}
    try:
        inspect.signature(registration.factory).bind(**kwargs)
    except TypeError as exc:
        raise PluginError(f"{kind} '{name}' does not accept options {options or {}} ({exc}); "
                          "fix its 'options'") from exc
    except ValueError:  # no signature available (some builtins): just call it
        pass
    return registration.factory(**kwargs)
