import pytest
import torch

from alignprop_core import AlignPropTrainer, plugins
from alignprop_core.plugin_api import PluginError


def test_installed_plugin_is_listed_with_its_package():
    registration = plugins.registrations("reward")["warmth"]
    assert registration.package == "alignprop-reward-example"
    assert registration.plugin == "warmth"


def test_warmth_scores_and_gradient():
    reward = plugins.build("reward", "warmth", {})
    images = torch.zeros(2, 3, 8, 8, requires_grad=True)
    with torch.no_grad():
        images[0, 0] = 1.0  # red image
        images[1, 2] = 1.0  # blue image
    scores = reward(images, ["a", "b"], [{}, {}])
    assert scores.tolist() == [1.0, -1.0]
    scores.sum().backward()
    assert images.grad[0, 0].sum() > 0 and images.grad[0, 2].sum() < 0
    targeted = plugins.build("reward", "warmth", {"target": 0.0})
    assert targeted(images, ["a", "b"], [{}, {}]).tolist() == [-1.0, -1.0]


def test_selected_by_name_in_a_config_and_trained(tiny_config):
    trainer = AlignPropTrainer(tiny_config(rewards=[{"name": "warmth", "weight": 1.0, "options": {"target": 0.2}}]))
    result = trainer.train()
    assert (result.output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert "reward/warmth_mean" in result.history[-1]


def test_bad_target_is_a_one_line_error():
    assert plugins.build("reward", "warmth", {"target": "0.5"}).target == 0.5
    for bad, shown in (("abc", "'abc'"), (float("nan"), "nan"), (float("inf"), "inf"), (2, "2"), (-1.5, "-1.5"),
                       (True, "True (a bool)"), ("", "''")):
        with pytest.raises(PluginError) as info:
            plugins.build("reward", "warmth", {"target": bad})
        assert str(info.value) == f"reward 'warmth': option 'target' must be a number in [-1, 1] (or null), got {shown}"
