"""Per-reward ``views`` (tiles, random crops) and ``normalize: running``: what they score, where gradients reach,
the statistics they keep, and that a resumed run keeps them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignprop_core import plugin_api as api
from alignprop_core.checkpoints import TrainerState
from alignprop_core.errors import ConfigError
from alignprop_core.reward_set import RewardSet, WeightedReward, reward_metrics, score_views
from alignprop_core.running_norm import RunningNorm, parse_normalize
from alignprop_core.specs import as_rewards
from alignprop_core.views import Views, parse_views, view_boxes


def center_224_reward(images, prompts, metadata):
    """What a CLIP-style reward sees: shortest side to 224 (bicubic, antialiased), centre crop 224."""
    seen = api.resize_shortest_side(images, 224)
    height, width = seen.shape[-2:]
    top, left = (height - 224) // 2, (width - 224) // 2
    return seen[..., top:top + 224, left:left + 224].mean(dim=(1, 2, 3))


@pytest.mark.parametrize("text, expected", [
    (None, Views()), ("center", Views()), (" tiles:2 ", Views("tiles", 2)),
    ("random_crops:3", Views("random_crops", 3)),
    ("random_crops:4:0.25", Views("random_crops", 4, 0.25)),
])
def test_views_parse(text, expected):
    assert parse_views(text, "r") == expected
    assert parse_views(str(expected), "r") == expected  # str() round-trips (it is what the config file stores)


@pytest.mark.parametrize("text", ["", "tile:2", "tiles", "tiles:", "tiles:0", "tiles:65", "tiles:2:0.5", "center:1",
                                  "random_crops:2:0", "random_crops:2:1.01", "random_crops:x", 3, ["tiles:2"]])
def test_views_garbage_is_a_one_line_error(text):
    with pytest.raises(ConfigError) as info:
        parse_views(text, "rewards: 'hps'")
    assert "\n" not in str(info.value) and str(info.value).startswith("rewards: 'hps': views")


@pytest.mark.parametrize("height, width, count", [(1024, 768, 2), (768, 1024, 2), (1024, 1024, 4), (1000, 333, 3),
                                                  (512, 1024, 1)])
def test_tiles_are_square_equal_and_cover_every_pixel(height, width, count):
    boxes = view_boxes(Views("tiles", count), height, width)
    covered = np.zeros((height, width), dtype=int)
    side = min(height, width) // count
    for top, left, s in boxes:
        assert s == side and 0 <= top <= height - s and 0 <= left <= width - s
        covered[top:top + s, left:left + s] += 1
    assert covered.min() >= 1
    long = max(height, width)
    assert len(boxes) == count * -(-long // side)


def test_on_1024_px_non_square_tiles_give_every_pixel_a_gradient_and_center_does_not():
    """The point of views: a centre-cropping 224 px reward leaves the margins of a 1024x768 image without gradient."""
    images = torch.rand(1, 3, 768, 1024, requires_grad=True)
    fractions = {}
    for text in ("center", "tiles:2", "random_crops:4"):
        grad, = torch.autograd.grad(score_views(center_224_reward, parse_views(text, "r"), images, ["p"], [{}]).sum(),
                                    images)
        fractions[text] = (grad.abs().amax(dim=1) > 0).float().mean().item()
    # the crop drops the left and right eighths (0.762 measured: the antialiased bicubic kernel reaches a few px out)
    assert fractions["center"] == pytest.approx(768 / 1024, abs=0.02)
    assert fractions["tiles:2"] == 1.0
    assert 0.3 < fractions["random_crops:4"] < 1.0  # four crops of 384 px see part of the image


def test_score_views_is_the_mean_over_the_views_with_prompts_repeated():
    images = torch.rand(2, 3, 96, 64)
    seen = []

    def reward(views, prompts, metadata):
        seen.append((views.shape, list(prompts), list(metadata)))
        return views.mean(dim=(1, 2, 3)) * torch.tensor([len(p) for p in prompts], dtype=views.dtype)

    views = Views("tiles", 2)
    scores = score_views(reward, views, images, ["a", "bb"], [{"i": 0}, {"i": 1}])
    boxes = view_boxes(views, 96, 64)
    assert seen[0][0] == (2 * len(boxes), 3, 32, 32) and seen[0][1] == ["a", "bb"] * len(boxes)
    assert seen[0][2] == [{"i": 0}, {"i": 1}] * len(boxes)
    expected = torch.stack([images[:, :, t:t + s, le:le + s].mean(dim=(1, 2, 3)) for t, le, s in boxes]).mean(0)
    torch.testing.assert_close(scores, expected * torch.tensor([1.0, 2.0]))
    assert score_views(reward, Views(), images, ["a", "bb"], [{}, {}]).shape == (2,)
    assert seen[-1][0] == images.shape  # center: the images as they are


def test_random_crops_follow_the_images_and_repeat_for_the_same_images():
    views = Views("random_crops", 5, 0.5)
    first, other = torch.rand(2, 3, 64, 96), torch.rand(2, 3, 64, 96)
    assert view_boxes(views, 64, 96, first) == view_boxes(views, 64, 96, first.clone())
    assert view_boxes(views, 64, 96, first) != view_boxes(views, 64, 96, other)
    for top, left, side in view_boxes(views, 64, 96, first):
        assert side == 32 and 0 <= top <= 32 and 0 <= left <= 64


def test_views_under_16_px_are_refused():
    with pytest.raises(ConfigError, match="64x64 images give 8 px views"):
        view_boxes(Views("tiles", 8), 64, 64)


def test_running_norm_matches_numpy_over_all_batches_and_gathers():
    rng = np.random.default_rng(0)
    batches = [rng.normal(20, 3, size=n) for n in (1, 4, 2, 7)]
    gathered = []
    norm = RunningNorm(gather=lambda t: (gathered.append(t.shape[0]), torch.cat([t, t + 1]))[1])
    assert norm.std == 1.0
    seen = []
    for batch in batches:
        norm.update(torch.tensor(batch, dtype=torch.float32))
        seen += list(batch) + list(batch + 1)
    assert gathered == [1, 4, 2, 7]
    assert norm.count == len(seen)
    assert norm.mean == pytest.approx(np.mean(seen), rel=1e-6)
    assert norm.std == pytest.approx(np.std(seen, ddof=1), rel=1e-5)
    norm.update(torch.tensor([float("nan"), float("inf")]))  # non-finite scores stay out
    assert norm.count == len(seen)
    z = norm(torch.tensor([norm.mean + norm.std]))
    assert z.item() == pytest.approx(1.0, rel=1e-5)


def test_running_norm_state_round_trips_and_refuses_damage():
    norm = RunningNorm()
    norm.update(torch.tensor([1.0, 2.0, 4.0]))
    other = RunningNorm()
    other.restore(norm.state())
    assert (other.count, other.mean, other.std) == (norm.count, norm.mean, norm.std)
    for damaged in ({}, {"count": -1, "mean": 0, "m2": 0}, {"count": 2, "mean": "x", "m2": 0},
                    {"count": 2.5, "mean": 0, "m2": 0}, {"count": 2, "mean": float("nan"), "m2": 0},
                    {"count": 2, "mean": 0, "m2": -1}, {"count": True, "mean": 0, "m2": 0}):
        with pytest.raises(ConfigError, match="running reward statistics"):
            RunningNorm().restore(damaged)


@pytest.mark.parametrize("value, expected", [(None, "none"), (False, "none"), ("none", "none"), ("Running", "running")])
def test_normalize_parse(value, expected):
    assert parse_normalize(value, "r") == expected


@pytest.mark.parametrize("value", ["zscore", True, 1, ["running"], ""])
def test_normalize_garbage(value):
    with pytest.raises(ConfigError, match="normalize .* is not valid; write running"):
        parse_normalize(value, "rewards: 'x'")


def big(images, prompts, metadata):
    return 100 * images.mean(dim=(1, 2, 3))


def small(images, prompts, metadata):
    return images.amax(dim=1).mean(dim=(1, 2))


def test_training_objective_is_normalised_and_eval_is_raw():
    rewards = RewardSet([WeightedReward("big", 0.5, big, norm=RunningNorm()), WeightedReward("small", 2.0, small)])
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    prompts, metadata = ["p"] * 4, [{}] * 4
    raw_total, raw_parts = rewards.score(images, prompts, metadata)  # eval: nothing updated
    assert rewards.rewards[0].norm.count == 0
    torch.testing.assert_close(raw_total, 0.5 * big(images, 0, 0) + 2.0 * small(images, 0, 0))
    total, parts = rewards.score(images, prompts, metadata, training=True)
    norm = rewards.rewards[0].norm
    assert norm.count == 4
    torch.testing.assert_close(parts["big"], raw_parts["big"])  # reported scores stay raw
    expected = 0.5 * (parts["big"] - norm.mean) / norm.std + 2.0 * parts["small"]
    torch.testing.assert_close(total, expected)
    # the gradient of the normalised term is the raw one divided by std (mean and std are constants)
    grad_norm, = torch.autograd.grad(total.sum() - 2.0 * parts["small"].sum(), images)
    grad_raw, = torch.autograd.grad(0.5 * big(images, 0, 0).sum(), images)
    torch.testing.assert_close(grad_norm, grad_raw / norm.std)
    metrics = reward_metrics(total.detach(), {"big": [parts["big"].detach()]}, rewards)
    assert metrics["reward/big_running_mean"] == norm.mean and metrics["reward/big_running_std"] == norm.std
    assert "reward/small_running_mean" not in metrics


def test_normalizer_state_survives_a_trainer_state_checkpoint(tmp_path):
    specs = as_rewards([{"name": "saturation", "normalize": "running", "views": "tiles:2"}, "contrast:0.5"])
    assert (specs[0].views, specs[0].normalize, specs[1].views, specs[1].normalize) == ("tiles:2", "running",
                                                                                          "center", "none")
    rewards = RewardSet.from_specs(specs)
    rewards.score(torch.rand(3, 3, 64, 64, requires_grad=True), ["p"] * 3, [{}] * 3, training=True)
    state = TrainerState()
    state.reward_normalizers = rewards.normalizer_state()
    state.save(tmp_path)
    loaded = TrainerState()
    loaded.load(tmp_path)
    resumed = RewardSet.from_specs(specs)
    resumed.restore_normalizers(loaded.reward_normalizers)
    assert resumed.normalizer_metrics() == rewards.normalizer_metrics()
    assert list(rewards.normalizer_state()) == ["saturation"]


def test_trl_compute_rewards_scores_the_same_views():
    rewards = RewardSet.from_specs(as_rewards([{"name": "saturation", "views": "tiles:2"}, "contrast:0.5"]))
    images = torch.rand(2, 3, 64, 96)
    total, _ = rewards.score(images, ["p"] * 2, [{}] * 2)
    torch.testing.assert_close(rewards.unchecked_total(images, ["p"] * 2, [{}] * 2), total)


def test_a_resumed_run_continues_with_the_same_running_statistics_and_weights(tiny_config):
    """Train 3 steps straight, and 2 + resume 1: same LoRA bitwise and same statistics (they are in the objective)."""
    from alignprop_core import AlignPropTrainer

    rewards = [{"name": "saturation", "normalize": "running", "views": "tiles:2"}, "contrast:0.5"]

    def lora(trainer):
        return torch.cat([p.detach().flatten() for p in trainer.trainable_params])

    straight = AlignPropTrainer(tiny_config(num_epochs=3, rewards=rewards,
                                            output_dir=str(tiny_config().output_dir) + "-straight"))
    straight.train()
    AlignPropTrainer(tiny_config(num_epochs=2, rewards=rewards, save_freq=1)).train()
    resumed = AlignPropTrainer(tiny_config(num_epochs=3, rewards=rewards, save_freq=1, resume_from="latest"))
    resumed.train()  # loads the checkpoint of step 2 (4 scores seen), then trains step 3
    assert resumed.rewards.normalizer_state()["saturation"]["count"] == 6
    assert resumed.rewards.normalizer_state() == straight.rewards.normalizer_state()
    assert torch.equal(lora(resumed), lora(straight))
