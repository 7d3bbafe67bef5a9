"""How rewards, prompt sources and image loggers are written in a config: ``RewardSpec`` / ``PluginSpec`` and the
forms accepted for them (a name, ``name:weight,name2:weight2``, ``{name, weight, options}`` mappings, lists)."""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from typing import Any

from alignprop_core.errors import ConfigError
from alignprop_core.running_norm import parse_normalize
from alignprop_core.views import parse_views


@dataclass
class RewardSpec:
    """One reward of the weighted sum: ``name`` (as registered by a plugin), ``weight``, factory ``options``,
    the ``views`` it scores (``views.py``) and its training-score ``normalize`` (``running_norm.py``)."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    views: str = "center"
    normalize: str = "none"

    def __post_init__(self) -> None:
        owner = f"rewards: '{self.name}'"
        self.views = str(parse_views(self.views, owner))
        self.normalize = parse_normalize(self.normalize, owner)


@dataclass
class PluginSpec:
    """A prompt source or image logger selected by ``name``, with factory ``options``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


#: the keys a reward entry may have
REWARD_ENTRY_KEYS = ("name", "weight", "options", "views", "normalize")


def parse_reward_shorthand(item: str) -> dict[str, Any]:
    name, _, weight = item.strip().partition(":")
    try:
        return {"name": name.strip(), "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise ConfigError(f"rewards: bad weight in '{item}'; write name:weight, e.g. aesthetic:1.0") from None


def as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, dict)) or is_dataclass(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")


def as_plugin_spec(value: Any, name: str) -> PluginSpec:
    if isinstance(value, PluginSpec):
        return value
    if isinstance(value, str):
        return PluginSpec(value)
    if isinstance(value, dict):
        extra = set(value) - {"name", "options"}
        if "name" not in value or extra:
            raise ConfigError(f"{name}: each entry needs 'name' and optional 'options', got keys {sorted(value)}")
        options = value.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{name}: 'options' must be a mapping, got {type(options).__name__}")
        return PluginSpec(str(value["name"]), dict(options))
    raise ConfigError(f"{name}: expected a name or {{name, options}}, got {type(value).__name__}")


def as_rewards(value: Any, field: str = "rewards") -> list[RewardSpec]:
    specs = []
    for item in as_list(value, field):
        if isinstance(item, RewardSpec):
            specs.append(item)
            continue
        if isinstance(item, str):
            item = parse_reward_shorthand(item)
        if not isinstance(item, dict) or "name" not in item or set(item) - set(REWARD_ENTRY_KEYS):
            raise ConfigError(f"{field}: each entry needs 'name' and optional {', '.join(REWARD_ENTRY_KEYS[1:])}, "
                              f"got {item!r}")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{field}: 'options' of '{item['name']}' must be a mapping")
        weight = item.get("weight", 1.0)
        if isinstance(weight, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; top-level floats accept it too
            try:
                weight = float(weight)
            except ValueError:
                pass
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{field}: weight of '{item['name']}' must be a number, got {weight!r}")
        specs.append(RewardSpec(str(item["name"]), float(weight), dict(options), item.get("views", "center"),
                                item.get("normalize", "none")))
    return specs
