import subprocess
import sys
import textwrap

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
