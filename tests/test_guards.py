"""The reward-hacking guards on the tiny SD pipeline: KL to the base model, held-out rewards, diversity, early
stopping with best/, and the LoRA-scale sweep (docs/reward-hacking.md)."""

import json

import pytest
import torch

from alignprop_core import AlignPropTrainer
from alignprop_core.checkpoints import read_metrics
from alignprop_core.cli import main
from alignprop_core.evaluate import run_eval
from alignprop_core.families import SD
from alignprop_core.kl import BaseModelDistance
from alignprop_core.lora_scales import parse_lora_scales, run_lora_scales
from alignprop_core.sampler import encode_prompts, sample_images

KL_WEIGHT = 1000.0
GUARDS = dict(eval_num_samples=4, eval_images_per_prompt=2, eval_rewards="contrast", sample_num_steps=3)


def test_kl_is_the_distance_to_the_lora_free_prediction_and_has_a_gradient(make_lora_pipe):
    pipe = make_lora_pipe()  # LoRA factors all non-zero: the prediction differs from the base model's
    embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 3.0, torch.device("cpu"))
    kl = BaseModelDistance(SD, pipe.unet)
    images = sample_images(pipe, embeddings, num_steps=3, guidance_scale=3.0, eta=0.0, height=32, width=32,
                           grad_steps=2, generator=torch.Generator().manual_seed(0), kl=kl)
    assert len(kl.terms) == 2  # one per denoiser call with gradients, none for the no-grad prefix
    value = kl.value()
    assert value.item() > 0 and value.requires_grad
    value.backward()  # (reentrant checkpointing accumulates into .grad; autograd.grad would not see it)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.lora_params)
    assert all(layer_enabled(pipe.unet)), "the adapters are switched back on after each base call"
    assert images.shape == (2, 3, 32, 32)


def layer_enabled(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [not m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def distance_to_base(trainer):
    """The trained LoRA's KL term on a fixed batch (every call with gradients)."""
    pipe = trainer.pipe
    embeddings = encode_prompts(pipe, ["a cat", "a dog"], None, 5.0, torch.device("cpu"))
    kl = BaseModelDistance(SD, pipe.unet)
    with torch.enable_grad():
        sample_images(pipe, embeddings, num_steps=3, guidance_scale=5.0, eta=0.0, height=32, width=32, grad_steps=3,
                      generator=torch.Generator().manual_seed(0), kl=kl)
    return kl.value().item()


def test_kl_is_zero_at_the_first_step_and_grows_and_pulls_towards_the_base(tiny_config, tmp_path):
    settings = dict(num_epochs=4, train_learning_rate=0.05, truncation="none", sample_num_steps=3)
    with_kl = AlignPropTrainer(tiny_config(kl_weight=KL_WEIGHT, **settings))
    history = with_kl.train().history
    kls = [row["kl"] for row in history]
    assert kls[0] == 0.0  # LoRA B = 0 at the start: the same prediction bitwise
    assert kls[-1] > 0
    assert history[1]["loss"] == pytest.approx(-history[1]["reward_mean"] + KL_WEIGHT * kls[1], rel=1e-5)
    plain = AlignPropTrainer(tiny_config(**settings, output_dir=str(tmp_path / "plain")))
    assert "kl" not in plain.train().history[0]
    # the same run without the penalty drifts further from the base model
    assert distance_to_base(with_kl) < distance_to_base(plain)


def test_held_out_rewards_and_diversity_are_logged_every_eval_round(tiny_config):
    trainer = AlignPropTrainer(tiny_config(num_epochs=4, eval_freq=2, **GUARDS))
    result = trainer.train()
    rows, evals = read_metrics(trainer.output_dir / "metrics.jsonl")
    assert [(e["step"], e["eval"]) for e in evals] == [(0, "before"), (2, "step"), (4, "after")]
    for row in evals:
        assert {"eval/reward_mean", "eval/saturation_mean", "eval/contrast_mean", "eval/diversity_within_prompt",
                "eval/diversity_across_prompts", "eval/image_brightness",
                "eval/image_high_frequency_energy"} <= set(row)
        assert row["eval/diversity_within_prompt"] > 0
    assert all("reward/contrast_mean" not in row for row in rows), "a held-out reward is never trained on"
    assert "contrast" in result.eval_after and "diversity_across_prompts" in result.eval_after
    # the gallery charts every round of the training and held-out rewards and diversity
    from alignprop_core.charts import eval_series

    series = eval_series(evals)
    assert [p[0] for p in series["eval: contrast"]] == [0, 2, 4] and "eval: diversity within prompt" in series


def test_early_stopping_fires_when_the_metric_stalls_and_best_holds_the_best_round(tiny_config):
    trainer = AlignPropTrainer(tiny_config(num_epochs=20, eval_freq=1, early_stopping_patience=2,
                                           early_stopping_min_delta=1.0, save_freq=1, **GUARDS))
    result = trainer.train()
    # no round can beat the first by 1.0: rounds at steps 1 and 2 fail, so the run stops after step 2
    assert result.global_step == 2
    assert result.stop_reason.startswith("stopped early at step 2: eval/contrast_mean has not improved by more "
                                          "than 1 for 2 eval rounds (best ")
    assert result.stop_reason.endswith(f"at step 0 in {trainer.output_dir / 'best'}")
    best = json.loads((trainer.output_dir / "best" / "best.json").read_text())
    assert best["step"] == 0 and best["metric"] == "eval/contrast_mean"
    _, evals = read_metrics(trainer.output_dir / "metrics.jsonl")
    assert [(e["step"], e["eval"]) for e in evals] == [(0, "before"), (1, "step"), (2, "step")]  # no repeat at 2
    assert result.eval_after["contrast"] == evals[-1]["eval/contrast_mean"]


def test_best_is_the_best_eval_round_and_alignprop_eval_reproduces_it(tiny_config, tmp_path):
    config = tiny_config(num_epochs=4, eval_freq=1, train_learning_rate=0.05, truncation="none", **GUARDS)
    trainer = AlignPropTrainer(config)
    trainer.train()
    _, evals = read_metrics(trainer.output_dir / "metrics.jsonl")
    best = json.loads((trainer.output_dir / "best" / "best.json").read_text())
    values = {(e["step"], e["eval"]): e["eval/contrast_mean"] for e in evals}
    assert best["value"] == max(values.values())
    assert any(step == best["step"] and value == best["value"] for (step, _), value in values.items())
    # rendering best/ with alignprop eval gives the same held-out score (same samples and noise)
    report = run_eval(config, [trainer.output_dir / "best"], out_dir=tmp_path / "eval", include_base=False,
                      print_fn=lambda *_: None)
    assert report.scores["best"].means()["contrast"] == pytest.approx(best["value"], abs=1e-5)


def test_early_stopping_state_survives_a_resume(tiny_config):
    config = tiny_config(num_epochs=2, eval_freq=1, early_stopping_patience=5, save_freq=1, **GUARDS)
    first = AlignPropTrainer(config)
    first.train()
    checkpoint = first.output_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(checkpoint.read_text())["early_stopping"]  # the round at step 1 (after: not checkpointed)
    assert state["metric"] == "eval/contrast_mean" and state["best"] is not None
    resumed = AlignPropTrainer(tiny_config(num_epochs=3, eval_freq=1, early_stopping_patience=5, save_freq=1,
                                           resume_from="latest", output_dir=config.output_dir, **GUARDS))
    assert resumed.eval_rounds.early_stopping.state() == state


def test_lora_scale_zero_is_the_base_model_and_the_sweep_writes_its_files(tiny_config, tmp_path, capsys):
    trainer = AlignPropTrainer(tiny_config(num_epochs=2, train_learning_rate=0.05, truncation="none", **GUARDS))
    trainer.train()
    config = tiny_config(**GUARDS)
    rows = run_lora_scales(config, trainer.output_dir, [0.0, 0.5, 1.0], out_dir=tmp_path / "scales")
    base = run_eval(config, [], out_dir=tmp_path / "base", print_fn=lambda *_: None).scores["base"].means()
    assert rows[0]["saturation"] == base["saturation"] and rows[0]["contrast"] == base["contrast"]
    assert rows[2]["saturation"] != rows[0]["saturation"]
    assert {"diversity_within_prompt", "image_saturation"} <= set(rows[0])
    document = json.loads((tmp_path / "scales" / "lora_scales.json").read_text())
    assert [r["lora_scale"] for r in document["rows"]] == [0.0, 0.5, 1.0] and document["eval_rewards"] == ["contrast"]
    assert (tmp_path / "scales" / "lora_scales.csv").read_text().startswith("lora_scale,")
    assert (tmp_path / "scales" / "lora_scales.html").read_text().count("<svg") == len(rows[0]) - 1
    assert "lora_scale" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [("", "comma-separated numbers"), ("0,,1", "comma-separated numbers"),
                                           ("0,x", "'x' is not a number"), ("0,nan", "finite numbers"),
                                           ("1,1", "1 is given twice")])
def test_lora_scales_refuse_garbage(text, message):
    with pytest.raises(Exception, match=message):
        parse_lora_scales(text)


def test_lora_scales_cli_needs_exactly_one_lora(tiny_sd_path, tmp_path, capsys):
    code = main(["eval", "--pretrained_model", str(tiny_sd_path), "--lora_scales", "0,1", "-o", str(tmp_path / "o")])
    assert code == 2 and "exactly one LoRA folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
