import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def alignprop(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "alignprop_core", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_help_is_fast_and_imports_no_heavy_module():
    code = ("import sys; from alignprop_core.cli import build_parser; p = build_parser()\n"
            "try:\n    p.parse_args(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--truncation_k INT" in result.stdout and "(default: 1)" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["train", "--truncation", "fixed", "--truncation_k", "0"],
     "error: truncation_k: got 0, allowed: an integer in [1,"),
    (["train", "--rewards", "nope"], "error: unknown reward 'nope'; installed rewards:"),
    (["train", "--rewards", "saturation", "--pretrained_model", "/nonexistent/folder"],
     "error: pretrained_model: folder '/nonexistent/folder' does not exist"),
    (["train", "--preset", "huge"], "error: unknown preset 'huge'; available presets: sd15-aesthetic, tiny"),
    (["train", "missing.yaml"], "error: config file 'missing.yaml' does not exist"),
    (["config", "--num_epochs", "many"], "error: num_epochs: expected int, got 'many'"),
])
def test_errors_print_one_line_and_exit_nonzero(args, message, tmp_path):
    result = alignprop(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_config_write_and_read_back(tmp_path):
    out = tmp_path / "run.yaml"
    assert alignprop("config", "--preset", "tiny", "--num_epochs", "3", "--write", str(out)).returncode == 0
    printed = alignprop("config", str(out))
    assert printed.returncode == 0 and "num_epochs: 3" in printed.stdout and "alignprop:tiny-sd" in printed.stdout


def test_rewards_lists_builtins_with_their_package():
    result = alignprop("rewards")
    assert result.returncode == 0
    assert any(line.split()[:2] == ["saturation", "alignprop-core"] for line in result.stdout.splitlines())


@pytest.mark.slow
def test_tiny_demo_trains_end_to_end(tmp_path):
    """The README's main job on the tiny preset, shortened; ALIGNPROP_CACHE keeps the tiny model in tmp."""
    result = alignprop("train", "--preset", "tiny", "--num_epochs", "4", "--eval_num_samples", "2",
                       "--output_dir", str(tmp_path / "out"), env={"ALIGNPROP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fixed-seed eval reward (2 samples):" in result.stdout
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "cache" / "tiny-sd-v1" / "model_index.json").is_file()
    again = alignprop("train", "--preset", "tiny", "--num_epochs", "2", "--eval_num_samples", "0",
                      "--output_dir", str(tmp_path / "out"), env={"ALIGNPROP_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr[-2000:]  # the demo can be re-run as written
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_example_script_runs_with_defaults(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "alignprop.py"), "--num_epochs", "2",
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True,
                            env={**os.environ, "ALIGNPROP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_version():
    from alignprop_core import __version__

    result = alignprop("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"alignprop {__version__}"


def test_config_write_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "run.yaml"
    out.write_text("my notes\n")
    refused = alignprop("config", "--num_epochs", "3", "--write", str(out))
    assert refused.returncode == 2 and "pass --overwrite to replace it" in refused.stderr
    assert out.read_text() == "my notes\n"
    replaced = alignprop("config", "--num_epochs", "3", "--write", str(out), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "num_epochs: 3" in out.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_misspelled_flags_get_a_hint():
    from alignprop_core.hints import close_names

    options = ["--train_learning_rate", "--train_batch_size", "--num_epochs", "--write", "--width", "--seed"]
    assert close_names("--learning_rate", options) == ["--train_learning_rate"]
    assert close_names("--Train-Batch-Size", options) == ["--train_batch_size"]
    assert close_names("--wirte", options) == ["--write"]
    assert close_names("--epochs", options) == ["--num_epochs"]
    assert close_names("--zzz", options) == []


def test_tiny_pipeline_family_and_overwrite(tmp_path):
    from alignprop_core.cli import main

    assert main(["tiny-pipeline", str(tmp_path / "xl"), "--family", "sdxl"]) == 0
    assert '"StableDiffusionXLPipeline"' in (tmp_path / "xl" / "model_index.json").read_text()
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "notes.txt").write_text("keep me")
    assert main(["tiny-pipeline", str(tmp_path / "sd")]) == 2  # not empty: refused
    assert main(["tiny-pipeline", str(tmp_path / "sd"), "--sdxl", "--overwrite"]) == 0  # --sdxl: the old spelling
    assert '"StableDiffusionXLPipeline"' in (tmp_path / "sd" / "model_index.json").read_text()
    assert (tmp_path / "sd" / "notes.txt").read_text() == "keep me"


def test_library_progress_bars_only_with_verbose(tiny_sd_path, tmp_path):
    """diffusers' "Loading pipeline components..." and transformers' "Loading weights" bars are hidden by default."""
    args = ["sample", "--pretrained_model", str(tiny_sd_path), "--mixed_precision", "no", "--sample_num_steps", "1",
            "--prompt", "a cat"]
    quiet = alignprop(*args, "-o", str(tmp_path / "quiet"), env={"HF_HUB_DISABLE_PROGRESS_BARS": ""})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Loading" not in quiet.stderr and "it/s" not in quiet.stderr, quiet.stderr
    verbose = alignprop("-v", *args, "-o", str(tmp_path / "verbose"), env={"HF_HUB_DISABLE_PROGRESS_BARS": ""})
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert "Loading pipeline components" in verbose.stderr and "Loading weights" in verbose.stderr
