import torch

from alignprop_core import AlignPropTrainer, plugins


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
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    assert "reward/warmth_mean" in result.history[-1]
