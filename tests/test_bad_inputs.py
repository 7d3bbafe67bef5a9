"""Runs every row of docs/bad-inputs.md through the CLI: one line, exit status 2, nothing written."""

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from alignprop_core import AlignPropConfig, AlignPropTrainer, plugins
from alignprop_core.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
ROWS = [tuple(cell.strip().strip("`") for cell in line.strip().strip("|").split("|"))
        for line in DOC.read_text().splitlines() if line.startswith("| ") and not line.startswith("| case")]

BAD_REWARDS = '''
import torch
from alignprop_core import hookimpl

@hookimpl
def register_rewards(register):
    register("wrong_shape", lambda: lambda images, prompts, metadata: images.mean())
    register("not_a_tensor", lambda: lambda images, prompts, metadata: [1.0] * len(prompts))
    register("no_grad", lambda: lambda images, prompts, metadata: torch.ones(len(prompts)))
'''


def fake_plugin(root: Path, name: str, module: str, source: str) -> None:
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[alignprop]\n{name} = {module}\n")
    (root / f"{module}.py").write_text(source)


@pytest.fixture(scope="module")
def world(tiny_sd_path, tmp_path_factory):
    """Folders the table's placeholders point to, and two installed test plugins (one broken)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty").mkdir()
    (root / "file").write_text("not a folder")
    used = root / "used"
    AlignPropTrainer(AlignPropConfig(pretrained_model=str(tiny_sd_path), rewards="saturation", num_epochs=1,
                                     sample_num_steps=2, mixed_precision="no", eval_num_samples=0,
                                     output_dir=str(used))).train()
    checkpoint = used / "checkpoints" / "checkpoint-1"
    shutil.copytree(checkpoint, root / "incomplete")
    (root / "incomplete" / "trainer_state.json").unlink()
    shutil.copytree(checkpoint, root / "damaged")
    (root / "damaged" / "optimizer.bin").write_bytes(b"\x00garbage")
    site = root / "site"
    site.mkdir()
    fake_plugin(site, "broken", "broken_reward_plugin", "raise ImportError('needs libfoo')\n")
    fake_plugin(site, "bad-rewards", "bad_rewards_plugin", BAD_REWARDS)
    sys.path.insert(0, str(site))
    plugins.reset()
    yield root
    sys.path.remove(str(site))
    plugins.reset()


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_the_table_has_enough_cases():
    assert len(ROWS) >= 15


@pytest.mark.parametrize("case,arguments,message", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_gives_one_line_and_writes_nothing(case, arguments, message, world, tiny_sd_path, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(world)
    out = world / "out"
    base = ["train", "--pretrained_model", str(tiny_sd_path), "--rewards", "saturation", "--num_epochs", "1",
            "--sample_num_steps", "2", "--mixed_precision", "no", "--eval_num_samples", "0",
            "--output_dir", str(out)]
    extra = [re.sub(r"\{(\w+)\}", lambda m: str(world / m.group(1)), arg) for arg in shlex.split(arguments)]
    before = snapshot(world)
    capsys.readouterr()
    try:
        status = main(base + extra)
    except SystemExit as exc:  # argparse errors
        status = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert snapshot(world) == before
