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


def one_line(call, *parts):
    with pytest.raises(PluginError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.fixture
def files(tmp_path):
    """A folder, a binary file, a file with NUL bytes, a blank file and a word list."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")
    (tmp_path / "nul.txt").write_bytes(b"a cat\x00\x00\n")
    (tmp_path / "blank.txt").write_text("\n   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "words.txt").write_text("owl\nyak\n")
    return tmp_path


@pytest.mark.parametrize("name, options, parts", [
    ("counting", {"low": "two"}, ["prompt source 'counting': option 'low' must be an integer in [0, 20], got 'two'"]),
    ("counting", {"low": 2.5}, ["option 'low' must be an integer in [0, 20], got 2.5"]),
    ("counting", {"low": -1}, ["option 'low' must be an integer in [0, 20], got -1"]),
    ("counting", {"high": 21}, ["option 'high' must be an integer in [0, 20], got 21"]),
    ("counting", {"high": float("nan")}, ["option 'high' must be an integer in [0, 20], got nan"]),
    ("counting", {"high": float("inf")}, ["option 'high' must be an integer in [0, 20], got inf"]),
    ("counting", {"low": True}, ["option 'low' must be an integer in [0, 20], got True (a bool)"]),
    ("counting", {"low": 4, "high": 3}, ["option 'high' must be an integer in [low=4, 20], got 3"]),
    ("counting", {"low": None}, ["option 'low' must be an integer in [0, 20], got None"]),
    ("counting", {"nouns_file": 5}, ["prompt source 'counting': option 'nouns_file' must be a UTF-8 text file",
                                     "got 5"]),
    ("counting", {"nouns_file": ""}, ["option 'nouns_file' must be", "got ''"]),
    ("counting", {"nouns_file": "{folder}"}, ["word list '{folder}' is a folder, not a file; set the 'nouns_file'"]),
    ("counting", {"nouns_file": "{image.png}"}, ["word list '{image.png}' is a binary file, not text"]),
    ("counting", {"nouns_file": "{missing.txt}"}, ["word list '{missing.txt}' does not exist; set the 'nouns_file'"]),
    ("counting", {"nouns_file": "{blank.txt}"}, ["word list '{blank.txt}' is empty; put one entry per line"]),
    ("nouns_activities", {"nouns_file": ["a"]},
     ["prompt source 'nouns_activities': option 'nouns_file' must be", "got ['a'] (a list)"]),
    ("nouns_activities", {"activities_file": "{folder}"}, ["'{folder}' is a folder, not a file; set the "
                                                           "'activities_file' option"]),
    ("nouns_activities", {"activities_file": "{nul.txt}"}, ["'{nul.txt}' is a binary file, not text; set the "
                                                            "'activities_file' option"]),
    ("from_file", {"path": 123}, ["prompt source 'from_file': option 'path' must be a .txt file with one prompt per "
                                  "line (or a .jsonl of {\"prompt\": ...} records), got 123"]),
    ("from_file", {"path": ""}, ["prompt source 'from_file': option 'path' must be", "got ''"]),
    ("from_file", {"path": "{folder}"}, ["prompt source 'from_file': prompt file '{folder}' is a folder, not a file; "
                                         "set the 'path' option to a .txt file"]),
    ("from_file", {"path": "{image.png}"}, ["prompt file '{image.png}' is a binary file, not text"]),
    ("from_file", {"path": "{latin1.txt}"}, ["prompt file '{latin1.txt}' is not UTF-8 text (byte 0xe9 at offset 3)"]),
    ("from_file", {"path": "{blank.txt}"}, ["prompt file '{blank.txt}' is empty; put one prompt per line"]),
    ("from_file", {"path": "{missing.txt}"}, ["prompt file '{missing.txt}' does not exist; set the 'path' option"]),
])
def test_bad_prompt_source_options_are_one_line_errors(files, name, options, parts):
    def fill(value):  # "{name}" placeholders -> paths in the files folder
        if not isinstance(value, str):
            return value
        for placeholder in ("folder", "image.png", "nul.txt", "blank.txt", "latin1.txt", "missing.txt"):
            value = value.replace("{" + placeholder + "}", str(files / placeholder))
        return value

    one_line(lambda: source(name, **{k: fill(v) for k, v in options.items()}), *[fill(p) for p in parts])


def test_prompt_source_options_accept_numeric_strings_and_word_files(files):
    random.seed(0)
    assert {source("counting", low="3", high=3.0)()[0].split()[0] for _ in range(5)} == {"three"}
    nouns = {source("counting", nouns_file=str(files / "words.txt"))()[1]["answers"][1] for _ in range(40)}
    assert nouns == {"owl", "yak"}


def test_read_prompt_file_txt_jsonl_and_errors(files):
    from alignprop_core.errors import ConfigError
    from alignprop_core.prompts import read_prompt_file

    text = files / "p.txt"
    text.write_text("\ufeffa red car\n\n  a blue boat  \n", encoding="utf-8")  # BOM and blank lines are fine
    assert read_prompt_file(text) == (["a red car", "a blue boat"], [{}, {}])
    records = files / "p.jsonl"
    records.write_text('{"prompt": "two dogs", "metadata": {"answers": ["two"]}}\n\n{"prompt": "a cat"}\n')
    assert read_prompt_file(str(records)) == (["two dogs", "a cat"], [{"answers": ["two"]}, {}])
    bad = files / "bad.jsonl"
    for line, expected in (('"just a string"', "expected a JSON object with a 'prompt' key"),
                           ("{oops", "expected a JSON object with a 'prompt' key"),
                           ('{"text": "x"}', "expected a JSON object with a 'prompt' key"),
                           ('{"prompt": 3}', "'prompt' must be a non-empty string, got 3"),
                           ('{"prompt": null}', "'prompt' must be a non-empty string, got None"),
                           ('{"prompt": " "}', "'prompt' must be a non-empty string, got ' '"),
                           ('{"prompt": "x", "metadata": [1]}', "'metadata' must be a JSON object, got [1] (a list)")):
        bad.write_text('{"prompt": "fine"}\n\n' + line + "\n")  # line 3: numbers count blank lines
        one_line(lambda: read_prompt_file(bad), f"{bad}:3: {expected}")
    one_line(lambda: read_prompt_file(files / "folder"), "is a folder, not a file; give a .txt file with one prompt "
             "per line (or a .jsonl of {\"prompt\": ...} records)")
    one_line(lambda: read_prompt_file(files / "image.png"), "is a binary file, not text")
    # callers choose the words and the error class (the eval command's --prompts_file is a ConfigError)
    with pytest.raises(ConfigError, match="^prompts file '.*missing.txt' does not exist; give a .txt file"):
        read_prompt_file(files / "missing.txt", label="prompts file", error=ConfigError)
