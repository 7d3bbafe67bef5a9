"""Built-in prompt sources (as in ddpo-pytorch). Each source is a no-argument callable returning
``(prompt, metadata)``; randomness comes from Python's global ``random`` (seeded and checkpointed by the trainer)."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Callable

from alignprop_core.errors import PluginError

PromptFn = Callable[[], tuple[str, dict]]

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
    "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig "
    "turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()

_IRREGULAR_PLURALS = {"mouse": "mice", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish",
                      "wolf": "wolves", "ox": "oxen", "person": "people", "child": "children", "moose": "moose"}
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty").split()


def _data_lines(name: str) -> list[str]:
    text = resources.files("alignprop_core").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _file_lines(path: str | Path, option: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"prompt file '{path}' does not exist; set the '{option}' option to a text file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise PluginError(f"prompt file '{path}' is empty; put one prompt per line")
    return lines


def plural(noun: str) -> str:
    """English plural, good enough for animal names."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def simple_animals() -> PromptFn:
    """A random animal from a list of 45 common animals."""
    return lambda: (random.choice(SIMPLE_ANIMALS), {})


def imagenet_animals() -> PromptFn:
    """A random ImageNet-1k animal class name (classes 0-397)."""
    names = _data_lines("imagenet_animals.txt")
    return lambda: (random.choice(names), {})


def nouns_activities(nouns_file: str | None = None, activities_file: str | None = None) -> PromptFn:
    """``"<noun> <activity>"``, e.g. "a raccoon riding a bike"; lists can be replaced by files."""
    nouns = _file_lines(nouns_file, "nouns_file") if nouns_file else _data_lines("nouns.txt")
    activities = _file_lines(activities_file, "activities_file") if activities_file else _data_lines("activities.txt")
    return lambda: (f"{random.choice(nouns)} {random.choice(activities)}", {})


def counting(low: int = 2, high: int = 4, nouns_file: str | None = None) -> PromptFn:
    """``"three cats"`` with VQA metadata ``{"questions": [...], "answers": [...]}`` (ddpo-pytorch's counting)."""
    if not 0 <= low <= high <= 20:
        raise PluginError(f"counting: need 0 <= low <= high <= 20, got low={low}, high={high}")
    nouns = _file_lines(nouns_file, "nouns_file") if nouns_file else list(SIMPLE_ANIMALS)

    def prompt_fn() -> tuple[str, dict]:
        number = _NUMBER_WORDS[random.randint(low, high)]
        noun = random.choice(nouns)
        many = plural(noun)
        questions = [f"How many {many} are there in this image?", "What animal is in this image?"]
        return f"{number} {many}", {"questions": questions, "answers": [number, noun]}

    return prompt_fn


def from_file(path: str = "") -> PromptFn:
    """Random line of a text file, or random record of a ``.jsonl`` file with ``prompt`` and optional
    ``metadata`` keys."""
    if not path:
        raise PluginError("prompt source 'from_file' needs options: {path: prompts.txt}")
    lines = _file_lines(path, "path")
    if str(path).endswith(".jsonl"):
        records = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                records.append((str(record["prompt"]), dict(record.get("metadata") or {})))
            except (ValueError, KeyError, TypeError):
                raise PluginError(f"{path}:{number}: expected a JSON object with a 'prompt' key") from None
        return lambda: random.choice(records)
    return lambda: (random.choice(lines), {})
