import re

import pytest
import yaml

from alignprop_core.cli import build_parser, resolve_config
from alignprop_core.config import AlignPropConfig, field_docs
from alignprop_core.errors import ConfigError


def resolve(*argv):
    return resolve_config(build_parser().parse_args(["config", *argv]))


def test_defaults_are_valid_and_follow_trl():
    config = AlignPropConfig().validate()
    assert config.pretrained_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml's was removed
    assert [(r.name, r.weight) for r in config.rewards] == [("aesthetic", 1.0)]
    assert config.prompts.name == "simple_animals"
    # TRL AlignPropConfig defaults
    assert (config.num_epochs, config.sample_num_steps, config.sample_eta,
            config.sample_guidance_scale) == (100, 50, 1.0, 5.0)
    assert (config.train_learning_rate, config.train_adam_weight_decay, config.train_max_grad_norm) == (1e-3, 1e-4, 1.0)
    assert (config.mixed_precision, config.save_freq, config.num_checkpoint_limit) == ("auto", 1, 5)
    assert config.scheduler == "auto" and config.lora_target_modules == []  # the family's own, below
    assert (config.lora_rank, config.lora_alpha, config.gradient_checkpointing) == (4, 4.0, True)
    assert config.truncation_range == (1, 50)


def test_auto_settings_are_the_families_own(monkeypatch):
    """mixed_precision auto: TRL's fp16 for SD/SDXL on a GPU, bf16 for the flow transformers, fp32 on CPU;
    scheduler auto: TRL's DDIM for SD/SDXL, flow Euler for SD3/FLUX; other values pass through or are refused."""
    import torch

    from alignprop_core.families import FLUX, SD, SD3, SDXL
    from alignprop_core.pipelines import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [resolve_mixed_precision("auto", f) for f in (SD, SDXL, SD3, FLUX)] == ["fp16", "fp16", "bf16", "bf16"]
    assert resolve_mixed_precision("fp16", FLUX) == "fp16" and resolve_mixed_precision("no", SD) == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto", FLUX) == "no"
    assert [f.scheduler_name("auto") for f in (SD, SDXL, SD3, FLUX)] == ["ddim", "ddim", "flow_euler", "flow_euler"]
    assert SD.scheduler_name("unipc") == "unipc" and FLUX.scheduler_name("flow_sde") == "flow_sde"
    with pytest.raises(ConfigError, match="scheduler: 'ddim' does not fit a FLUX model; use auto or one of "
                                          "flow_euler, flow_sde"):
        FLUX.scheduler_name("ddim")
    with pytest.raises(ConfigError, match="scheduler: 'flow_euler' does not fit a SD-1.x model"):
        SD.scheduler_name("flow_euler")


def test_yaml_file_and_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"num_epochs": 7, "rewards": [{"name": "saturation", "weight": 0.5},
                                                                 {"name": "contrast", "weight": 2, "options": {}}],
                                    "prompts": {"name": "from_file", "options": {"path": "p.txt"}}}))
    config = resolve(str(path), "--num_epochs", "9", "--gradient_checkpointing", "false", "--height", "64",
                     "--lora_target_modules", "to_q,to_v", "--tracker_kwargs", "{wandb: {mode: offline}}")
    assert config.num_epochs == 9 and config.gradient_checkpointing is False and config.height == 64
    assert [(r.name, r.weight) for r in config.rewards] == [("saturation", 0.5), ("contrast", 2.0)]
    assert config.prompts.options == {"path": "p.txt"}
    assert config.lora_target_modules == ["to_q", "to_v"]
    assert config.tracker_kwargs == {"wandb": {"mode": "offline"}}
    written = tmp_path / "out.yaml"
    written.write_text(config.to_yaml())
    assert AlignPropConfig.from_file(written) == config


def test_toml_and_presets(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('num_epochs = 3\n[[rewards]]\nname = "contrast"\nweight = 1.5\n')
    config = AlignPropConfig.from_file(path)
    assert config.num_epochs == 3 and config.rewards[0].name == "contrast" and config.rewards[0].weight == 1.5
    tiny = resolve("--preset", "tiny", "--num_epochs", "2")
    assert tiny.pretrained_model == "alignprop:tiny-sd" and tiny.num_epochs == 2
    assert tiny.rewards[0].name == "saturation"


def test_reward_shorthand_and_trl_truncation_fields():
    config = resolve("--rewards", "saturation:0.25,contrast")
    assert [(r.name, r.weight) for r in config.rewards] == [("saturation", 0.25), ("contrast", 1.0)]
    fixed = AlignPropConfig.from_dict({"truncated_backprop_rand": False, "truncated_backprop_timestep": 49})
    assert fixed.truncation == "fixed" and fixed.truncation_k == 1  # TRL's "49 of 50 detached" = last step only
    rand = AlignPropConfig.from_dict({"truncated_rand_backprop_minmax": [35, 45]})
    assert rand.truncation == "uniform" and rand.truncation_range == (5, 15)


def test_every_field_is_documented_in_help():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name, _type, default, help_text, _group in field_docs():
        assert f"--{name}" in text, name
        assert help_text, f"field {name} has no help"
    assert "(default: 'stable-diffusion-v1-5/stable-diffusion-v1-5')" in re.sub(r"-\s+", "-", " ".join(text.split()))


INVALID = [
    ({"sample_num_steps": 0}, "sample_num_steps: got 0, allowed: an integer >= 1"),
    ({"sample_eta": 1.5}, "sample_eta: got 1.5, allowed: a number in [0, 1]"),
    ({"truncation": "random"}, "truncation: got 'random', allowed: one of fixed, uniform, gaussian, none"),
    ({"truncation": "fixed", "truncation_k": 51},
     "truncation_k: got 51, allowed: an integer in [1, sample_num_steps=50]"),
    ({"truncation": "fixed", "truncation_k": 0},
     "truncation_k: got 0, allowed: an integer in [1, sample_num_steps=50]"),
    ({"truncation_min": 10, "truncation_max": 5},
     "truncation_max: got 5, allowed: an integer in [truncation_min=10, sample_num_steps=50]"),
    ({"truncation": "gaussian", "truncation_std": 0.0}, "truncation_std: got 0.0, allowed: a number > 0"),
    ({"train_batch_size": 0}, "train_batch_size: got 0, allowed: an integer >= 1"),
    ({"train_gradient_accumulation_steps": 0}, "train_gradient_accumulation_steps: got 0, allowed: an integer >= 1"),
    ({"num_epochs": -1}, "num_epochs: got -1, allowed: an integer >= 1"),
    ({"train_learning_rate": 0.0}, "train_learning_rate: got 0.0, allowed: a finite number > 0"),
    ({"train_adam_beta1": 1.0}, "train_adam_beta1: got 1.0, allowed: a number in [0, 1)"),
    ({"mixed_precision": "fp8"}, "mixed_precision: got 'fp8', allowed: one of auto, no, fp16, bf16"),
    ({"resolution": 100}, "resolution: got 100, allowed: empty or a positive multiple of 8"),
    ({"width": 0}, "width: got 0, allowed: empty or a positive multiple of 8"),
    ({"lora_rank": 0}, "lora_rank: got 0, allowed: an integer >= 1"),
    ({"lora_target_modules": ["to_q", ""]}, "lora_target_modules: got ['to_q', ''], allowed: empty (the family's"),
    ({"true_cfg_scale": -2}, "true_cfg_scale: got -2, allowed: >= 0"),
    ({"rewards": []}, "rewards: got [], allowed: at least one"),
    ({"rewards": "saturation:-1,contrast:0.5"},
     "rewards: got 'weights summing to -0.5', allowed: weights whose sum is > 0"),
    ({"rewards": "saturation:0"}, "rewards: got 'weights summing to 0', allowed: weights whose sum is > 0"),
    ({"rewards": "saturation,saturation"}, "rewards: got 'saturation', allowed: each reward name at most once"),
    ({"log_with": "neptune"}, "log_with: got 'neptune', allowed: empty or one of tensorboard"),
    ({"num_epochs": "ten"}, "num_epochs: expected int, got 'ten'"),
    ({"seed": 1.5}, "seed: expected int, got 1.5"),
    ({"gradient_checkpointing": "maybe"}, "gradient_checkpointing: expected bool, got 'maybe'"),
    ({"learning_rate": 1e-3}, "unknown config field 'learning_rate' (did you mean 'train_learning_rate'?)"),
    ({"rewards": [{"name": "x", "weight": "heavy"}]}, "rewards: weight of 'x' must be a number"),
    ({"prompts": {"nam": "counting"}}, "prompts: each entry needs 'name' and optional 'options'"),
]


@pytest.mark.parametrize("values,message", INVALID, ids=[next(iter(v)) for v, _ in INVALID])
def test_invalid_values_give_one_clear_line(values, message):
    with pytest.raises(ConfigError) as info:
        AlignPropConfig.from_dict(values).validate()
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        AlignPropConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_epochs: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        AlignPropConfig.from_file(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        AlignPropConfig.from_file(listy)


def test_configuration_docs_list_every_field_and_are_current():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "scripts" / "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (repo / "docs" / "configuration.md").read_text()
    assert all(f"| `{name}` |" in text for name, *_ in field_docs())
