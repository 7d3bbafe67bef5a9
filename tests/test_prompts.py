import json
import random

import pytest

from alignprop_core import plugins
from alignprop_core.errors import PluginError
from alignprop_core.prompts import plural


def source(name, **options):
    return plugins.build("prompt source", name, options)


@pytest.mark.parametrize("name", ["simple_animals", "imagenet_animals", "nouns_activities", "counting"])
def test_sources_return_prompt_and_metadata_reproducibly(name):
    fn = source(name)
    random.seed(3)
    first = [fn() for _ in range(20)]
    random.seed(3)
    assert [fn() for _ in range(20)] == first  # driven by the global random state the trainer checkpoints
    for prompt, metadata in first:
        assert isinstance(prompt, str) and prompt and isinstance(metadata, dict)
    assert len({p for p, _ in first}) > 3


def test_counting_metadata_matches_the_prompt():
    fn = source("counting", low=2, high=3)
    random.seed(0)
    for _ in range(50):
        prompt, metadata = fn()
        number, noun_plural = prompt.split(" ", 1)
        assert number in ("two", "three")
        assert metadata["questions"] == [f"How many {noun_plural} are there in this image?",
                                         "What animal is in this image?"]
        assert metadata["answers"][0] == number and plural(metadata["answers"][1]) == noun_plural


def test_plurals():
    assert [plural(n) for n in ("cat", "fox", "mouse", "sheep", "butterfly", "monkey", "wolf")] == \
        ["cats", "foxes", "mice", "sheep", "butterflies", "monkeys", "wolves"]


def test_imagenet_animals_are_the_398_animal_classes():
    from importlib import resources

    names = resources.files("alignprop_core").joinpath("data", "imagenet_animals.txt").read_text().splitlines()
    assert len(names) == 398 and names[0] == "tench" and names[-1] == "pufferfish"


def test_from_file_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red car\n\na blue boat\n")
    assert {source("from_file", path=str(text))()[0] for _ in range(30)} == {"a red car", "a blue boat"}
    records = tmp_path / "prompts.jsonl"
    records.write_text(json.dumps({"prompt": "two dogs", "metadata": {"questions": ["How many dogs?"],
                                                                      "answers": ["two"]}}) + "\n")
    assert source("from_file", path=str(records))() == ("two dogs", {"questions": ["How many dogs?"],
                                                                     "answers": ["two"]})
    with pytest.raises(PluginError, match="prompt file '.*nope.txt' does not exist; set the 'path' option"):
        source("from_file", path=str(tmp_path / "nope.txt"))
    with pytest.raises(PluginError, match="needs options: {path: prompts.txt}"):
        source("from_file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"text\": 1}\n")
    with pytest.raises(PluginError, match="bad.jsonl:1: expected a JSON object with a 'prompt' key"):
        source("from_file", path=str(bad))
