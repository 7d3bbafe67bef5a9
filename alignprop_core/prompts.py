"""Built-in prompt sources (as in ddpo-pytorch). Each source is a no-argument callable returning
``(prompt, metadata)``; randomness comes from Python's global ``random``, which the trainer seeds before every call
from the step and sample index (so resumed runs draw the same prompts without any stored RNG state)."""

from __future__ import annotations

import json
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from alignprop_core import options
from alignprop_core.errors import AlignPropError, PluginError

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


_PROMPT_FILE = "a .txt file with one prompt per line (or a .jsonl of {\"prompt\": ...} records)"
_WORD_FILE = "a UTF-8 text file with one entry per line"


def _text_lines(path: Any, *, owner: str, option: str, label: str, allowed: str, item: str,
                error: type[AlignPropError]) -> tuple[Path, list[tuple[int, str]]]:
    """``(line number, stripped line)`` of the non-blank lines of a UTF-8 text file, with one-line errors for every
    way the path or the file can be wrong."""
    file = options.path(owner, option, path, kind="file", what=label, allowed=allowed, error=error)
    text = options.read_text(owner, option, file, what=label, allowed=allowed, error=error)
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        prefix = f"{owner}: " if owner else ""
        raise error(f"{prefix}{label} '{path}' is empty; put one {item} per line")
    return file, lines


def read_prompt_file(path: str | os.PathLike, *, owner: str = "", option: str = "", label: str = "prompt file",
                     error: type[AlignPropError] = PluginError) -> tuple[list[str], list[dict]]:
    """All prompts and their metadata from a ``.txt`` file (one prompt per line, blank lines skipped) or a ``.jsonl``
    file (``{"prompt": ..., "metadata": {...}}`` per line). A missing path, a folder, a binary, non-UTF-8 or empty
    file and a bad record are one-line ``error``s. ``owner``/``option`` name the plugin option the path came from
    (messages then say "set the '<option>' option to ..."), ``label`` names the file ("prompt file")."""
    file, lines = _text_lines(path, owner=owner, option=option, label=label, allowed=_PROMPT_FILE, item="prompt",
                              error=error)
    if file.suffix.lower() != ".jsonl":
        return [line for _, line in lines], [{} for _ in lines]
    where = f"{owner}: {path}" if owner else f"{path}"
    prompts, metadata = [], []
    for number, line in lines:
        try:
            record = json.loads(line)
            prompt, extra = record["prompt"], record.get("metadata") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise error(f"{where}:{number}: expected a JSON object with a 'prompt' key") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise error(f"{where}:{number}: 'prompt' must be a non-empty string, got {options.describe(prompt)}")
        if not isinstance(extra, dict):
            raise error(f"{where}:{number}: 'metadata' must be a JSON object, got {options.describe(extra)}")
        prompts.append(prompt)
        metadata.append(dict(extra))
    return prompts, metadata


def _word_file(source: str, option: str, path: Any) -> list[str]:
    """The entries of a word list given in a prompt source's option (``nouns_file``, ``activities_file``)."""
    _, lines = _text_lines(path, owner=f"prompt source '{source}'", option=option, label="word list",
                           allowed=_WORD_FILE, item="entry", error=PluginError)
    return [line for _, line in lines]


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
    nouns = _word_file("nouns_activities", "nouns_file", nouns_file) if nouns_file is not None \
        else _data_lines("nouns.txt")
    activities = _word_file("nouns_activities", "activities_file", activities_file) if activities_file is not None \
        else _data_lines("activities.txt")
    return lambda: (f"{random.choice(nouns)} {random.choice(activities)}", {})


def counting(low: int = 2, high: int = 4, nouns_file: str | None = None) -> PromptFn:
    """``"three cats"`` with VQA metadata ``{"questions": [...], "answers": [...]}`` (ddpo-pytorch's counting)."""
    owner = "prompt source 'counting'"
    top = len(_NUMBER_WORDS) - 1
    low = options.number(owner, "low", low, integer=True, minimum=0, maximum=top)
    high = options.number(owner, "high", high, integer=True, minimum=0, maximum=top)
    if high < low:
        raise options.invalid(owner, "high", high, f"an integer in [low={low}, {top}]")
    nouns = _word_file("counting", "nouns_file", nouns_file) if nouns_file is not None else list(SIMPLE_ANIMALS)

    def prompt_fn() -> tuple[str, dict]:
        number = _NUMBER_WORDS[random.randint(low, high)]
        noun = random.choice(nouns)
        many = plural(noun)
        questions = [f"How many {many} are there in this image?", "What animal is in this image?"]
        return f"{number} {many}", {"questions": questions, "answers": [number, noun]}

    return prompt_fn


def from_file(path: str | None = None) -> PromptFn:
    """Random line of a text file, or random record of a ``.jsonl`` file with ``prompt`` and optional
    ``metadata`` keys (read with :func:`read_prompt_file`)."""
    if path is None:
        raise PluginError("prompt source 'from_file' needs options: {path: prompts.txt}")
    prompts, metadata = read_prompt_file(path, owner="prompt source 'from_file'", option="path")
    records = list(zip(prompts, metadata))
    return lambda: random.choice(records)
