"""The reward-hacking measures on known images (image_stats) and early stopping's bookkeeping (monitoring)."""

import math

import pytest
import torch

from alignprop_core import AlignPropConfig
from alignprop_core.errors import ConfigError
from alignprop_core.eval_metrics import default_metric, improvable_metrics
from alignprop_core.image_stats import diversity, image_statistics, pixel_features
from alignprop_core.monitoring import EarlyStopping


def constant(value, n=2, size=16):
    return torch.full((n, 3, size, size), float(value))


def test_statistics_of_constant_images():
    black, white = image_statistics(constant(0.0)), image_statistics(constant(1.0))
    assert black["image_brightness"] == 0 and black["image_dark_fraction"] == 1
    assert black["image_blown_out_fraction"] == 0
    assert white["image_brightness"] == pytest.approx(1.0) and white["image_blown_out_fraction"] == 1
    assert black["image_saturation"] == 0 and white["image_saturation"] == 0
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    stats = image_statistics(red)
    assert stats["image_saturation"] == 1 and stats["image_brightness"] == pytest.approx(0.299)
    assert stats["image_high_frequency_energy"] == 0  # flat: no energy at any frequency


def test_high_frequency_energy_separates_a_grid_from_a_gradient():
    size = 64
    wave = 0.5 + 0.4 * torch.sin(2 * math.pi * torch.arange(size) / size).expand(size, size)  # one period
    smooth = wave.expand(1, 3, size, size).clone()
    checker = ((torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2).float()
    grid = checker.expand(1, 3, size, size).clone()
    assert image_statistics(grid)["image_high_frequency_energy"] > 0.99  # all energy at Nyquist
    assert image_statistics(smooth)["image_high_frequency_energy"] < 1e-6


def test_diversity_is_zero_for_identical_images_and_grows_with_difference():
    prompts = ["cat", "cat", "dog", "dog"]
    same = constant(0.5, n=4)
    assert diversity(same, prompts) == {"diversity_within_prompt": 0.0, "diversity_across_prompts": 0.0}
    varied = torch.stack([torch.full((3, 16, 16), v) for v in (0.0, 0.2, 0.5, 0.9)])
    measured = diversity(varied, prompts)
    # RMS pixel difference of constant images is the difference of the constants
    assert measured["diversity_within_prompt"] == pytest.approx((0.2 + 0.4) / 2, abs=1e-5)
    assert measured["diversity_across_prompts"] == pytest.approx((0.5 + 0.9 + 0.3 + 0.7) / 4, abs=1e-5)


def test_diversity_without_a_pair_of_a_kind_is_nan_and_a_custom_embedding_is_used():
    images = torch.rand(3, 3, 20, 12)
    measured = diversity(images, ["a", "b", "c"])
    assert math.isnan(measured["diversity_within_prompt"]) and measured["diversity_across_prompts"] > 0
    calls = []

    def embed(x):
        calls.append(x.shape)
        return torch.ones(x.shape[0], 5)  # everything alike in this embedding

    assert diversity(images, ["a", "a", "b"], embed)["diversity_within_prompt"] == 0
    assert calls == [images.shape]
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        diversity(images, ["a", "b"])
    assert pixel_features(torch.rand(2, 3, 8, 8)).shape == (2, 3 * 32 * 32)  # small images are upsampled


def test_early_stopping_counts_rounds_without_improvement():
    stopping = EarlyStopping("eval/contrast_mean", patience=2, min_delta=0.01)
    assert stopping.update(0, {"eval/contrast_mean": 0.10})  # the first round is the best so far
    assert stopping.update(5, {"eval/contrast_mean": 0.20})
    assert not stopping.update(10, {"eval/contrast_mean": 0.205})  # within min_delta: no improvement
    assert not stopping.should_stop
    assert not stopping.update(15, {"eval/contrast_mean": float("nan")})  # a NaN round never improves
    assert stopping.should_stop and (stopping.best, stopping.best_step) == (0.20, 5)
    assert "step 15" in stopping.reason(15) and "best 0.2000 at step 5" in stopping.reason(15)
    resumed = EarlyStopping("eval/contrast_mean", 2, 0.01)
    resumed.restore(stopping.state())
    assert resumed.state() == stopping.state()
    other = EarlyStopping("eval/reward_mean", 2, 0.01)
    other.restore(stopping.state())  # another metric: starts afresh
    assert other.best is None
    assert not EarlyStopping("m", 0, 0.0).should_stop  # patience 0: never stops


def test_guard_settings_are_checked_together():
    config = AlignPropConfig(rewards="saturation", eval_rewards="contrast")
    assert default_metric(config) == "eval/contrast_mean"
    assert "eval/diversity_across_prompts" in improvable_metrics(config)
    assert default_metric(AlignPropConfig(rewards="saturation")) == "eval/reward_mean"
    with pytest.raises(ConfigError, match="'saturation' is also a training reward"):
        AlignPropConfig(rewards="saturation", eval_rewards="saturation").validate()
    with pytest.raises(ConfigError, match="early_stopping_metric: got 'eval/image_brightness'"):
        AlignPropConfig(eval_freq=2, early_stopping_metric="eval/image_brightness").validate()
    with pytest.raises(ConfigError, match="needs eval rounds during training"):
        AlignPropConfig(early_stopping_patience=3).validate()
    with pytest.raises(ConfigError, match="kl_weight: .* use_lora: true"):
        AlignPropConfig(kl_weight=0.1, use_lora=False).validate()
