"""The defects found trying alignprop from outside: lost or overwritten work, misleading messages, non-finite
weights called "good", signals, files that differ for identical weights. Each test fails on the code before the fix."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignprop_core import AlignPropConfig, AlignPropTrainer
from alignprop_core.checkpoints import list_checkpoints
from alignprop_core.errors import AlignPropError, ConfigError


def lora_vector(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.trainable_params])


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_resuming_into_another_runs_folder_is_refused_and_branching_into_a_fresh_one_works(tiny_config, tmp_path):
    AlignPropTrainer(tiny_config(num_epochs=2, save_freq=1, output_dir=str(tmp_path / "runA"))).train()
    AlignPropTrainer(tiny_config(num_epochs=3, save_freq=1, output_dir=str(tmp_path / "runB"))).train()
    before = snapshot(tmp_path / "runB")
    with pytest.raises(ConfigError) as info:
        AlignPropTrainer(tiny_config(num_epochs=4, output_dir=str(tmp_path / "runB"),
                                     resume_from=str(tmp_path / "runA" / "checkpoints" / "checkpoint-2")))
    assert "belongs to the run in" in str(info.value) and "runA" in str(info.value) and "runB" in str(info.value)
    assert snapshot(tmp_path / "runB") == before
    branch = AlignPropTrainer(tiny_config(num_epochs=3, output_dir=str(tmp_path / "branch"),
                                          resume_from=str(tmp_path / "runA" / "checkpoints" / "checkpoint-2")))
    assert branch.state.global_step == 2 and branch.train().global_step == 3


def test_resuming_from_an_older_checkpoint_of_the_same_run_would_overwrite_and_is_refused(tiny_config):
    config = tiny_config(num_epochs=3, save_freq=1)
    AlignPropTrainer(config).train()
    older = Path(config.output_dir) / "checkpoints" / "checkpoint-2"
    with pytest.raises(ConfigError, match="is not the newest checkpoint .*checkpoint-3 exists"):
        AlignPropTrainer(tiny_config(num_epochs=4, resume_from=str(older)))


def test_a_resumed_run_does_not_log_steps_twice(tiny_config):
    config = tiny_config(num_epochs=3, save_freq=2)
    AlignPropTrainer(config).train()  # checkpoints 2 and 3
    checkpoint_3 = Path(config.output_dir) / "checkpoints" / "checkpoint-3"
    import shutil

    shutil.rmtree(checkpoint_3)  # as if killed after logging step 3 but before checkpointing it
    AlignPropTrainer(tiny_config(num_epochs=3, save_freq=2, resume_from="latest")).train()
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" not in r] == [1, 2, 3]


SIGNAL_RUN = """
import sys, time
import alignprop_core.trainer as trainer
from alignprop_core.cli import main
original = trainer.AlignPropTrainer.train_step
def slow_step(self):
    metrics = original(self)
    if self.state.global_step == 2:
        open(sys.argv[1], "w").write("at step 2")
        time.sleep(3)  # the signal arrives during this step's bookkeeping
    return metrics
trainer.AlignPropTrainer.train_step = slow_step
sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_stop_with_a_checkpoint_and_the_lora(signal_number, tiny_sd_path, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    args = ["--pretrained_model", str(tiny_sd_path), "--rewards", "saturation", "--num_epochs", "50",
            "--save_freq", "100", "--sample_num_steps", "2", "--mixed_precision", "no", "--eval_num_samples", "0",
            "--output_dir", str(out)]
    process = subprocess.Popen([sys.executable, "-c", SIGNAL_RUN, str(marker), *args], stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal_number, err[-2000:]
    name = signal.Signals(signal_number).name
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and f"stopped by {name} at step 2 of 50" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_a_step_that_makes_the_weights_non_finite_is_rolled_back(tiny_config):
    trainer = AlignPropTrainer(tiny_config(num_epochs=2))
    inner = trainer.optimizer.optimizer
    original = inner.step

    def overflowing_step(*args, **kwargs):  # what a huge learning rate or weight decay does to the weights
        result = original(*args, **kwargs)
        with torch.no_grad():
            trainer.trainable_params[0].fill_(float("inf"))
        return result

    inner.step = overflowing_step
    before = lora_vector(trainer)
    metrics = trainer.train_step()
    assert metrics["skipped_nonfinite"] == 1.0
    assert torch.equal(lora_vector(trainer), before) and torch.isfinite(before).all()
    assert not trainer.optimizer.optimizer.state  # the optimizer's moments were rolled back too


def test_non_finite_or_overflowing_floats_are_rejected():
    with pytest.raises(ConfigError, match="train_adam_weight_decay: got inf, allowed: a finite number"):
        AlignPropConfig(train_adam_weight_decay=float("inf")).validate()
    with pytest.raises(ConfigError, match="train_learning_rate: got 1e\\+300, allowed: a finite number within"):
        AlignPropConfig(train_learning_rate=1e300).validate()


def test_a_checkpoint_of_another_base_model_or_lora_shape_is_refused_by_name(tiny_config, tmp_path):
    from alignprop_core.tiny import build_tiny_pipeline

    config = tiny_config(num_epochs=1, save_freq=1)
    AlignPropTrainer(config).train()
    with pytest.raises(ConfigError, match="was trained with lora_rank=4, this run has lora_rank=8; resume with "
                                          "lora_rank=4"):
        AlignPropTrainer(tiny_config(num_epochs=2, resume_from="latest", lora_rank=8))
    with pytest.raises(ConfigError, match="was trained with lora_target_modules=.*this run has"):
        AlignPropTrainer(tiny_config(num_epochs=2, resume_from="latest", lora_target_modules="to_q"))
    other = build_tiny_pipeline(tmp_path / "other-base", seed=1)
    with pytest.raises(ConfigError, match="was trained on base model .* but this run loads .*other-base"):
        AlignPropTrainer(tiny_config(num_epochs=2, resume_from="latest", pretrained_model=str(other)))


def test_a_damaged_trainer_state_is_refused(tiny_config):
    config = tiny_config(num_epochs=1, save_freq=1)
    AlignPropTrainer(config).train()
    state = list_checkpoints(config.output_dir)[-1] / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "global_step": -3}))
    with pytest.raises(ConfigError, match="trainer_state.json' is damaged \\(global_step is -3"):
        AlignPropTrainer(tiny_config(num_epochs=2, resume_from="latest"))


def test_a_full_disk_while_saving_is_one_line_and_keeps_earlier_checkpoints(tiny_config, monkeypatch):
    config = tiny_config(num_epochs=3, save_freq=1)
    trainer = AlignPropTrainer(config)
    original = trainer.accelerator.save_state

    def save_state(output_dir, **kwargs):
        if trainer.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(output_dir, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", save_state)
    with pytest.raises(AlignPropError) as info:
        trainer.train()
    message = str(info.value)
    assert "could not save checkpoint-2" in message and "the disk is full" in message and "\n" not in message
    assert "checkpoint-1" in message
    root = Path(config.output_dir) / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["checkpoint-1"]  # the partial save is gone, the earlier one kept


def test_metrics_are_strict_json(tiny_config):
    def nan_once(images, prompts, metadata, calls=[]):
        calls.append(1)
        score = images.mean(dim=(1, 2, 3))
        return score * float("nan") if len(calls) == 2 else score

    config = tiny_config(num_epochs=2)
    AlignPropTrainer(config, reward_function=nan_once).train()

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    rows = [json.loads(line, parse_constant=refuse)
            for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward_mean"] is None and rows[0]["grad_norm"] is None and rows[1]["reward_mean"] is not None


def test_identical_loras_are_identical_files(tiny_sd_path, tmp_path):
    """The safetensors writer orders metadata by a hash map seeded per process: run the export in two processes."""
    files = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "alignprop_core", "train", "--pretrained_model", str(tiny_sd_path),
                        "--rewards", "saturation", "--num_epochs", "1", "--sample_num_steps", "2",
                        "--mixed_precision", "no", "--eval_num_samples", "0", "--output_dir", str(out)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        files.append((out / "pytorch_lora_weights.safetensors").read_bytes())
    assert files[0] == files[1]


def test_the_removed_default_model_id_is_an_alias(capsys):
    from alignprop_core.pipelines import resolve_model_path

    assert AlignPropConfig().pretrained_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_model_path("runwayml/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was removed from the Hugging Face Hub" in err[0]


def test_corrupt_model_index_and_missing_tokenizer_are_named(tiny_config, tiny_sd_path, tmp_path):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_sd_path, corrupt)
    (corrupt / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="model_index.json' is not valid JSON"):
        AlignPropTrainer(tiny_config(pretrained_model=str(corrupt)))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_sd_path, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(ConfigError, match="lists a tokenizer in model_index.json but has no tokenizer/ folder"):
        AlignPropTrainer(tiny_config(pretrained_model=str(no_tokenizer)))


def test_sample_num_steps_above_the_models_training_steps_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="sample_num_steps: got 1001, allowed: at most the model's 1000 training"):
        AlignPropTrainer(tiny_config(sample_num_steps=1001, truncation_k=1))


def test_tilde_in_paths_means_home(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = AlignPropConfig(output_dir="~/runs/x", resume_from="~/runs/x/checkpoints/checkpoint-1")
    assert config.output_dir == str(tmp_path / "runs" / "x")
    assert config.resume_from.startswith(str(tmp_path))


def test_an_unreachable_hub_fails_fast_with_the_fix(monkeypatch):
    import socket

    from huggingface_hub import constants

    from alignprop_core.pipelines import load_pipeline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    with pytest.raises(AlignPropError, match="cannot be reached \\(no network\\?\\).*HF_HUB_OFFLINE=1"):
        load_pipeline("someone/not-cached-model")
    assert time.perf_counter() - start < 5  # no retries (they took 29 s here)
