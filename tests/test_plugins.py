import ast
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from alignprop_core import plugins
from alignprop_core.errors import PluginError
from alignprop_core.hookspecs import hookimpl


class Brightness(torch.nn.Module):
    def forward(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


class BrightnessPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("brightness", lambda scale=1.0: Brightness(), "test reward")


@pytest.fixture
def registered():
    """Register plugin objects for one test, then unregister them."""
    names = []

    def add(plugin, name):
        plugins.load_plugins()
        plugins.pm.register(plugin, name=name)
        names.append(name)

    yield add
    for name in names:
        plugins.pm.unregister(name=name)


def test_builtins_are_registered_through_the_hooks():
    rewards = plugins.registrations("reward")
    assert {"saturation", "contrast"} <= set(rewards)
    assert rewards["saturation"].plugin == "alignprop_core.builtin"
    assert rewards["saturation"].package == "alignprop-core"
    prompts = plugins.registrations("prompt source")
    assert {"simple_animals", "imagenet_animals", "nouns_activities", "counting", "from_file"} <= set(prompts)
    assert "folder" in plugins.registrations("image logger")


def test_unknown_reward_lists_installed_ones_and_the_package_to_install(monkeypatch):
    monkeypatch.setitem(plugins.KNOWN_REWARD_PACKAGES, "not_here", "alignprop-reward-not-here")
    with pytest.raises(PluginError) as info:
        plugins.get("reward", "not_here")
    message = str(info.value)
    assert message.startswith("unknown reward 'not_here'; installed rewards: ")
    assert "contrast" in message and "saturation" in message
    assert "pip install alignprop-reward-not-here" in message
    with pytest.raises(PluginError, match="unknown prompt source 'poems'; installed prompt sources: .*counting"):
        plugins.get("prompt source", "poems")


def test_plugin_object_reward_is_selectable_by_name(registered, tiny_config):
    registered(BrightnessPlugin(), "test-brightness")
    assert plugins.registrations("reward")["brightness"].plugin == "test-brightness"
    reward = plugins.build("reward", "brightness", {"scale": 2.0})
    assert isinstance(reward, Brightness)
    from alignprop_core import AlignPropTrainer

    trainer = AlignPropTrainer(tiny_config(rewards=[{"name": "brightness", "weight": 1.0}], num_epochs=1))
    assert [r.name for r in trainer.rewards] == ["brightness"]
    assert trainer.train().history[0]["reward/brightness_mean"] > 0


def test_bad_options_name_the_reward(registered):
    registered(BrightnessPlugin(), "test-brightness")
    with pytest.raises(PluginError, match="reward 'brightness' does not accept options {'gamma': 1}"):
        plugins.build("reward", "brightness", {"gamma": 1})


def test_duplicate_names_are_an_error_naming_both_plugins(registered):
    class Clash:
        @hookimpl
        def register_rewards(self, register):
            register("saturation", lambda: None)

    registered(Clash(), "clashing-plugin")
    with pytest.raises(PluginError) as info:
        plugins.registrations("reward")
    assert "reward 'saturation' is registered twice, by plugin 'alignprop_core.builtin' and by plugin " \
           "'clashing-plugin'" in str(info.value)


def test_plugin_that_fails_to_import_is_reported_and_does_not_break_others(tmp_path):
    """A real entry point (a .dist-info on sys.path) whose module raises on import."""
    dist = tmp_path / "broken_reward-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-reward\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[alignprop]\nbroken = broken_reward_module\n")
    (tmp_path / "broken_reward_module.py").write_text("raise ImportError('needs libfoo')\n")
    code = textwrap.dedent("""
        from alignprop_core import plugins
        from alignprop_core.errors import PluginError
        rewards = plugins.registrations("reward")
        assert "saturation" in rewards, rewards
        assert plugins.failed_plugins == {"broken": "ImportError: needs libfoo"}, plugins.failed_plugins
        try:
            plugins.get("reward", "nope")
        except PluginError as exc:
            assert "plugins that failed to load: broken (ImportError: needs libfoo)" in str(exc), exc
        else:
            raise AssertionError("no error")
        print("ok")
    """)
    env_path = f"{tmp_path}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert result.returncode == 0, result.stderr
    assert "warning: alignprop plugin 'broken' failed to load: ImportError: needs libfoo" in result.stderr
    cli = subprocess.run([sys.executable, "-m", "alignprop_core", "rewards"], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert cli.returncode == 0
    assert "failed to load: plugin 'broken': ImportError: needs libfoo" in cli.stdout
    assert "saturation" in cli.stdout


def test_a_hook_that_raises_is_warned_about_once_and_the_others_still_work(registered, capsys):
    class Raising:
        @hookimpl
        def register_rewards(self, register):
            register("half_registered", lambda: None)
            raise RuntimeError("no GPU found\nsecond line")

    registered(Raising(), "raising-plugin")
    try:
        capsys.readouterr()
        rewards = plugins.registrations("reward")
        assert "saturation" in rewards and "half_registered" not in rewards  # nothing of the failed hook is kept
        plugins.registrations("reward")
        err = capsys.readouterr().err
        assert err.count("warning: alignprop plugin 'raising-plugin' failed in register_rewards: RuntimeError: no GPU "
                         "found\n") == 1, err
        assert plugins.failed_plugins["raising-plugin"] == "RuntimeError: no GPU found"
        with pytest.raises(PluginError, match=r"plugins that failed to load: .*raising-plugin \(RuntimeError: no GPU"):
            plugins.get("reward", "nope")
    finally:
        plugins.failed_plugins.pop("raising-plugin", None)
        plugins._warned.discard(("raising-plugin", "failed in register_rewards"))


# ---------------------------------------------------------------------------------------- the plugin API

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_MODULES = sorted((ROOT / "plugins").glob("*/alignprop_reward_*.py"))


def alignprop_imports(source: str) -> list[str]:
    """Every ``alignprop_core`` module (or ``alignprop_core.<name>``) that ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "alignprop_core":
            found += [f"alignprop_core.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
    return [name for name in found if name.split(".")[0] == "alignprop_core"]


@pytest.mark.parametrize("module", PLUGIN_MODULES, ids=lambda m: m.parent.name)
def test_plugins_import_only_the_plugin_api(module):
    assert len(PLUGIN_MODULES) == 10  # example + 4 rewards of the first zoo + 5 of the second (the glob is not empty)
    assert set(alignprop_imports(module.read_text())) == {"alignprop_core.plugin_api"}


def test_plugin_api_exports_the_internal_objects():
    from alignprop_core import errors, hookspecs, options, plugin_api, preprocess, rewards

    assert "stable API for alignprop plugin authors" in plugin_api.__doc__
    assert sorted(plugin_api.__all__) == sorted(set(plugin_api.__all__))
    homes = (errors, hookspecs, options, preprocess, rewards)
    for name in plugin_api.__all__:
        value = getattr(plugin_api, name)
        assert any(getattr(home, name, None) is value for home in homes), name
    assert plugin_api.hookimpl is hookimpl


def test_frozen_reward_stays_in_eval_mode_without_parameter_gradients():
    from alignprop_core.plugin_api import FrozenReward

    class Scorer(FrozenReward):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
            self.scale = torch.nn.Parameter(torch.full((), 2.0))
            self.add_module("unused", torch.nn.Linear(1, 1))

        def forward(self, images, prompts, metadata):
            return self.scale * self.head(images.mean(dim=(2, 3))).squeeze(-1)

    reward = Scorer()

    def frozen() -> bool:
        return (not any(m.training for m in reward.modules())
                and not any(p.requires_grad for p in reward.parameters()))

    assert frozen()
    assert reward.train() is reward and frozen()
    assert reward.requires_grad_(True) is reward and frozen()
    reward.later = torch.nn.Dropout(0.1)  # assigned after construction: frozen too
    reward.to(torch.float64)
    assert frozen()
    images = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    scores = reward(images, ["a", "b"], [{}, {}])
    assert torch.equal(scores, reward(images, ["a", "b"], [{}, {}]))  # dropout off
    scores.sum().backward()
    assert images.grad.abs().sum() > 0 and all(p.grad is None for p in reward.parameters())


def test_bundled_rewards_are_frozen_rewards_without_their_own_train_overrides():
    import importlib

    from alignprop_core.plugin_api import FrozenReward
    from alignprop_core.rewards import Contrast, Saturation

    classes = [Saturation, Contrast]
    for module, name in (("alignprop_reward_example", "Warmth"), ("alignprop_reward_aesthetic", "AestheticReward"),
                         ("alignprop_reward_pickscore", "PickScoreReward"), ("alignprop_reward_hps", "HPSReward"),
                         ("alignprop_reward_flava_vqa", "FlavaVQAReward")):
        classes.append(getattr(importlib.import_module(module), name))
    for cls in classes:
        assert issubclass(cls, FrozenReward), cls
        assert not {"train", "freeze", "requires_grad_"} & set(vars(cls)), cls
    assert not plugins.build("reward", "saturation", {}).training


def doc_example_modules() -> dict[str, types.ModuleType]:
    """The complete plugin examples of docs/plugins.md (python blocks with a hook), as modules by hook name."""
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    modules = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        hooks = re.findall(r"@api\.hookimpl\ndef (register_\w+)", block)
        if hooks:
            assert alignprop_imports(block) == ["alignprop_core.plugin_api"], block
            module = types.ModuleType(f"doc_example_{hooks[0]}")
            exec(compile(block, f"docs/plugins.md ({hooks[0]})", "exec"), module.__dict__)
            modules[hooks[0]] = module
    assert sorted(modules) == ["register_image_loggers", "register_prompt_sources", "register_rewards"]
    return modules


def registered_by(hook) -> dict:
    found = {}
    hook(register=lambda name, factory, description="": found.setdefault(name, (factory, description)))
    return found


def test_doc_examples_follow_the_hook_contracts(tmp_path):
    from alignprop_core.plugin_api import FrozenReward
    from alignprop_core.seeding import draw_prompts

    examples = doc_example_modules()
    warmth = registered_by(examples["register_rewards"].register_rewards)["warmth"][0](target="0.2")
    assert isinstance(warmth, FrozenReward) and warmth.target == 0.2
    images = torch.rand(3, 3, 8, 12, requires_grad=True)
    scores = warmth(images, ["a"] * 3, [{}] * 3)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(PluginError, match=r"^reward 'warmth': option 'target' must be a number in \[-1, 1\]"):
        warmth.__class__(target="abc")

    prompt_fn = registered_by(examples["register_prompt_sources"].register_prompt_sources)["colours"][0](animal="fox")
    prompts, metadata = draw_prompts(prompt_fn, [11, 12, 13, 14])
    assert (prompts, metadata) == draw_prompts(prompt_fn, [11, 12, 13, 14])  # seeded by the caller: reproducible
    assert all(p == f"a {m['colour']} fox" for p, m in zip(prompts, metadata))

    logger = registered_by(examples["register_image_loggers"].register_image_loggers)["scores"][0](
        output_dir=str(tmp_path / "out"), every=2)
    logged = []
    sink = types.SimpleNamespace(log_images=lambda values, step: logged.append((sorted(values), step)))
    data = {"images": torch.rand(2, 3, 4, 4), "prompts": ["a", "b"], "prompt_metadata": [{}, {}],
            "rewards": torch.tensor([0.5, 0.25]), "reward_components": {}}
    for step in (1, 2, 3):
        logger(data, step, sink)
    lines = (tmp_path / "out" / "scores.jsonl").read_text().splitlines()
    assert [line.count('"step": ') for line in lines] == [1] * 4 and '"step": 3' in lines[-1]
    assert logged == [(["samples"], 1), (["samples"], 3)]


def test_doc_prompt_source_and_image_logger_run_in_training(registered, tiny_config):
    from alignprop_core import AlignPropTrainer

    examples = doc_example_modules()
    registered(examples["register_prompt_sources"], "doc-prompts")
    registered(examples["register_image_loggers"], "doc-loggers")
    config = tiny_config(prompts={"name": "colours", "options": {"animal": "fox"}}, num_epochs=1,
                         image_loggers=[{"name": "scores", "options": {"every": 1}}])
    result = AlignPropTrainer(config).train()
    lines = (Path(config.output_dir) / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 2 * result.global_step and all(" fox" in line for line in lines)


# ---------------------------------------------------------------------------------------- option checks


def one_line_plugin_error(call, *parts):
    """``call()`` raises a one-line PluginError containing every one of ``parts``; returns the message."""
    with pytest.raises(PluginError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.mark.parametrize("eps, shown", [("abc", "'abc'"), (float("nan"), "nan"), (float("inf"), "inf"), (0, "0"),
                                        (-1e-3, "-0.001"), ("", "''"), (True, "True (a bool)"), ([1], "[1] (a list)")])
def test_saturation_eps_of_the_wrong_type_or_range_is_one_line(eps, shown):
    one_line_plugin_error(lambda: plugins.build("reward", "saturation", {"eps": eps}),
                          "reward 'saturation': option 'eps' must be a number > 0, got " + shown)


def test_saturation_eps_accepts_numbers_and_numeric_strings():
    assert plugins.build("reward", "saturation", {"eps": 0.01}).eps == 0.01
    assert plugins.build("reward", "saturation", {"eps": "1e-3"}).eps == 1e-3  # PyYAML reads 1e-3 as a string
    assert plugins.build("reward", "saturation", {"eps": 1}).eps == 1.0


def test_parse_dtype_rejects_non_strings_in_one_line():
    from alignprop_core.plugin_api import parse_dtype

    assert parse_dtype("bf16", "x") == torch.bfloat16 and parse_dtype(None, "x") == torch.float32
    assert parse_dtype(torch.float16, "x") == torch.float16
    for bad in (16, True, ["fp16"], "fp8", ""):
        one_line_plugin_error(lambda: parse_dtype(bad, "aesthetic"), "reward 'aesthetic': option 'dtype' must be "
                              "one of float32, float16, bfloat16 (or null), got")


def test_option_number_checks():
    from alignprop_core import options

    owner = "reward 'r'"
    assert options.number(owner, "n", "3", integer=True, minimum=0, maximum=20) == 3
    assert options.number(owner, "n", 4.0, integer=True) == 4
    assert options.number(owner, "x", None, optional=True) is None
    one_line_plugin_error(lambda: options.number(owner, "n", 2.5, integer=True, minimum=0, maximum=20),
                          "reward 'r': option 'n' must be an integer in [0, 20], got 2.5")
    one_line_plugin_error(lambda: options.number(owner, "x", "-inf", minimum=-1, maximum=1, optional=True),
                          "option 'x' must be a number in [-1, 1] (or null), got '-inf'")
    one_line_plugin_error(lambda: options.number(owner, "x", None), "must be a finite number, got None")
    one_line_plugin_error(lambda: options.number(owner, "x", 0, minimum=0, exclusive_minimum=True), "a number > 0")
    one_line_plugin_error(lambda: options.number(owner, "x", -1, minimum=0), "a number >= 0, got -1")


def test_option_choice_string_and_describe():
    from alignprop_core import options

    assert options.choice("reward 'r'", "v", "b", ("a", "b")) == "b"
    one_line_plugin_error(lambda: options.choice("reward 'r'", "v", 2.1, ("v2", "v2.1")),
                          "reward 'r': option 'v' must be one of v2, v2.1, got 2.1")
    one_line_plugin_error(lambda: options.string("reward 'r'", "s", "  "), "option 's' must be a non-empty string")
    assert options.describe("x" * 200) == "'" + "x" * 76 + "..."
    assert options.describe({"a": 1}) == "{'a': 1} (a dict)" and options.describe(3) == "3"


def test_option_paths_say_missing_folder_file_and_binary(tmp_path):
    from alignprop_core import options

    owner, allowed = "reward 'r'", "a local weights file"
    folder, text, binary = tmp_path / "folder", tmp_path / "ok.txt", tmp_path / "data.bin"
    folder.mkdir()
    text.write_text("hello\n")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    assert options.path(owner, "w", str(text)) == text
    assert options.path(owner, "w", None, optional=True) is None
    one_line_plugin_error(lambda: options.path(owner, "w", 123, allowed=allowed),
                          "reward 'r': option 'w' must be a local weights file, got 123")
    one_line_plugin_error(lambda: options.path(owner, "w", str(tmp_path / "nope"), what="weights file",
                                               allowed=allowed),
                          f"reward 'r': weights file '{tmp_path / 'nope'}' does not exist; set the 'w' option to "
                          "a local weights file")
    one_line_plugin_error(lambda: options.path(owner, "w", str(folder), allowed=allowed), "is a folder, not a file")
    one_line_plugin_error(lambda: options.path(owner, "w", "two\nlines", allowed=allowed), "got 'two\\nlines'")
    one_line_plugin_error(lambda: options.path(owner, "w", str(text), kind="folder"), "is a file, not a folder")
    assert options.read_text(owner, "w", text) == "hello\n"
    one_line_plugin_error(lambda: options.read_text(owner, "w", binary), f"'{binary}' is a binary file, not text")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    one_line_plugin_error(lambda: options.read_text(owner, "w", tmp_path / "latin1.txt"),
                          "is not UTF-8 text (byte 0xe9 at offset 3); set the 'w' option to a UTF-8 text file")


def test_option_folder_or_hub_id(tmp_path):
    from alignprop_core import options

    owner = "reward 'r'"
    assert options.folder_or_hub_id(owner, "m", "owner/name") == "owner/name"
    assert options.folder_or_hub_id(owner, "m", str(tmp_path)) == str(tmp_path)
    (tmp_path / "f.bin").write_bytes(b"x")
    one_line_plugin_error(lambda: options.folder_or_hub_id(owner, "m", str(tmp_path / "f.bin")),
                          "is a file, not a folder; set the 'm' option to")
    one_line_plugin_error(lambda: options.folder_or_hub_id(owner, "m", "./missing"), "'./missing' does not exist")
    one_line_plugin_error(lambda: options.folder_or_hub_id(owner, "m", "not a hub id"),
                          "got 'not a hub id' (neither an existing folder nor a valid hub id)")
    one_line_plugin_error(lambda: options.folder_or_hub_id(owner, "m", 7), "option 'm' must be a hub id")


def test_bad_reward_option_on_the_command_line_is_one_line_and_creates_nothing(tiny_sd_path, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "alignprop_core", "train", "--pretrained_model", str(tiny_sd_path), "--output_dir",
         str(out), "--mixed_precision", "no", "--rewards", "[{name: saturation, options: {eps: abc}}]"],
        capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: reward 'saturation': option 'eps' must be a number > 0, "
                                                  "got 'abc'"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------- CPU torchvision hook


def test_torchvision_hook_check_reports_this_venv():
    """The check, run as the README says, in a subprocess: it must agree with what importing torchvision does here."""
    import importlib.machinery

    check = subprocess.run([sys.executable, "-m", "alignprop_core.torchvision_cpu_fix", "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    report = check.stdout.strip()
    assert len(report.splitlines()) == 1 and sys.executable in report
    if importlib.machinery.PathFinder.find_spec("torchvision") is None:
        assert report.startswith("torchvision is not installed")
        return
    bare = subprocess.run([sys.executable, "-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path if "
                           "type(f).__name__ != '_TorchvisionHook']; import torchvision"], capture_output=True)
    import sysconfig

    installed = (Path(sysconfig.get_paths()["purelib"]) / "_alignprop_torchvision_cpu_fix.pth").is_file()
    if bare.returncode != 0:  # a CPU test machine with the CUDA torchvision wheel: the hook is installed and needed
        assert installed and report.startswith("the CPU torchvision import hook is installed and needed"), report
    else:
        assert report.startswith("the CPU torchvision import hook is installed but not needed" if installed
                                 else "torchvision imports fine"), report


def test_torchvision_hook_decision_and_install(tmp_path, monkeypatch, capsys):
    from alignprop_core import torchvision_cpu_fix as fix

    assert fix.decide(present=False, imports_without_hook=False, installed=False) == ("no-torchvision", False)
    assert fix.decide(present=True, imports_without_hook=True, installed=False) == ("not-needed", False)
    assert fix.decide(present=True, imports_without_hook=True, installed=True) == ("unneeded-installed", False)
    assert fix.decide(present=True, imports_without_hook=False, installed=False) == ("missing", True)
    assert fix.decide(present=True, imports_without_hook=False, installed=True) == ("installed", True)
    assert fix.decide(True, False, True, imports_with_hook=False) == ("broken", True)

    site = tmp_path / "site-packages"  # never the real one: the venv stays as it is
    site.mkdir()
    monkeypatch.setattr(fix, "site_packages", lambda: site)
    monkeypatch.setattr(fix, "torchvision_present", lambda: True)
    imports = {False: True, True: True}  # with_hook -> result
    monkeypatch.setattr(fix, "torchvision_imports", lambda with_hook: imports[with_hook])
    assert fix.main(["install"]) == 0 and not any(site.iterdir())  # torchvision imports: nothing is written
    assert "no CPU import hook needed" in capsys.readouterr().out
    imports[False] = False  # the CUDA wheel on CPU torch
    assert fix.main(["--check"]) == 1 and "not installed" in capsys.readouterr().out
    assert fix.main(["install"]) == 0
    assert (site / "_alignprop_torchvision_cpu_fix.pth").read_text() == fix.PTH_LINE
    assert (site / "_alignprop_torchvision_cpu_fix.py").read_text() == Path(fix.__file__).read_text()
    assert fix.hook_installed(site) and fix.main(["check"]) == 0
    imports[True] = False  # the hook does not help: it is removed again and the command fails
    fix.remove_hook(site)
    assert fix.main(["install"]) == 2 and not any(site.iterdir())


def test_torchvision_hook_is_not_on_any_library_code_path():
    code = ("import sys, alignprop_core, alignprop_core.trainer, alignprop_core.cli, alignprop_core.plugins; "
            "alignprop_core.plugins.load_plugins(); "
            "print('alignprop_core.torchvision_cpu_fix' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


class DetailedPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("detailed", lambda: Brightness(), "test reward",
                 details={"suits": "any family", "source": "no weights", "license": "MIT"})


def test_details_are_kept_in_key_order_and_shown_by_rewards_details(registered, capsys):
    from alignprop_core.cli import main

    registered(DetailedPlugin(), "detailed_plugin")
    assert plugins.registrations("reward")["detailed"].details == (
        ("source", "no weights"), ("license", "MIT"), ("suits", "any family"))
    assert main(["rewards", "--details"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("detailed "))
    assert [line.split(":")[0].strip() for line in out[at + 1:at + 4]] == ["source", "license", "suits"]
    assert out[out.index(next(line for line in out if line.startswith("saturation"))) + 1].split() == [
        "source:", "no", "weights", "(alignprop-core)"]
    assert main(["rewards"]) == 0
    assert "source:" not in capsys.readouterr().out  # without --details: one line per reward


@pytest.mark.parametrize("details", [{"licence": "MIT"}, {"scale": 10}, "MIT", ["source"]])
def test_bad_details_fail_only_their_plugin(registered, capsys, details):
    class BadDetails:
        @hookimpl
        def register_rewards(self, register):
            register("bad_details", lambda: Brightness(), "x", details=details)

    registered(BadDetails(), "bad_details_plugin")
    found = plugins.registrations("reward")
    assert "bad_details" not in found and "saturation" in found
    assert "bad_details_plugin" in plugins.failed_plugins
    assert "details" in plugins.failed_plugins["bad_details_plugin"]
    plugins.failed_plugins.pop("bad_details_plugin")


def test_every_published_reward_is_installed_documented_and_known():
    """Each reward plugin under plugins/ is installed by scripts/install.sh, has docs/rewards/<name>.md, a row in the
    README's rewards table, details for `alignprop rewards --details`, and its package in KNOWN_REWARD_PACKAGES."""
    install = (ROOT / "scripts" / "install.sh").read_text()
    readme = (ROOT / "README.md").read_text()
    found = plugins.registrations("reward")
    published = {n: r for n, r in found.items() if r.package and r.package.startswith("alignprop-reward-")
                 and r.package != "alignprop-reward-example"}
    assert set(published) == set(plugins.KNOWN_REWARD_PACKAGES)
    for name, registration in published.items():
        folder = next(p.parent for p in PLUGIN_MODULES if f'"{registration.package}"' in
                      (p.parent / "pyproject.toml").read_text())
        assert f"plugins/{folder.name}" in install, name
        assert (ROOT / "docs" / "rewards" / f"{name}.md").is_file(), name
        assert f"| `{name}` | `{registration.package}`" in readme, name
        assert plugins.KNOWN_REWARD_PACKAGES[name] == registration.package
        assert {k for k, _ in registration.details} == set(plugins.DETAIL_KEYS), name
