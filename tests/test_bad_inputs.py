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


def table(header: str) -> list[tuple[str, ...]]:
    """The rows of the table in DOC whose header row starts with ``header``, cells without their backticks."""
    rows, inside = [], False
    for line in DOC.read_text().splitlines():
        if line.startswith(header):
            inside = True
        elif inside and line.startswith("| "):
            rows.append(tuple(cell.strip().strip("`") for cell in line.strip().strip("|").split("|")))
        elif inside and not line.startswith("|"):
            inside = False
    return rows


ROWS = table("| command | case |")
BASE = dict(table("| command | base arguments |"))
COMMANDS = ("train", "config", "eval", "sample", "mix", "tiny-pipeline", "-")
BAD_REWARDS = '''
import torch
from alignprop_core import hookimpl

@hookimpl
def register_rewards(register):
    register("wrong_shape", lambda: lambda images, prompts, metadata: images.mean())
    register("not_a_tensor", lambda: lambda images, prompts, metadata: [1.0] * len(prompts))
    register("no_grad", lambda: lambda images, prompts, metadata: torch.ones(len(prompts)))
'''

RAISING_HOOK = '''
from alignprop_core import hookimpl

@hookimpl
def register_rewards(register):
    raise RuntimeError("no GPU found")
'''


def fake_plugin(root: Path, name: str, module: str, source: str) -> None:
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[alignprop]\n{name} = {module}\n")
    (root / f"{module}.py").write_text(source)


def other_base_model_lora(lora: Path, out: Path) -> None:
    """A copy of ``lora`` whose attn2.to_k factors take a wider input, as an SDXL LoRA's do next to an SD one's."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = lora / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as handle:
        state, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    for key in [k for k in state if "attn2.to_k" in k and ".down." in k]:
        state[key] = torch.randn(state[key].shape[0], state[key].shape[1] + 8)
    out.mkdir()
    save_file(state, str(out / file.name), metadata=metadata)


@pytest.fixture(scope="module")
def world(tiny_sd_path, tmp_path_factory):
    """Folders and files the table's placeholders point to, and three installed test plugins (two broken)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty").mkdir()
    (root / "file").write_text("not a folder")
    (root / "binary").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (root / "latin1").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (root / "blank").write_text("\n   \n\n")
    (root / "bad.jsonl").write_text('{"prompt": "a cat"}\n[1, 2]\n')
    (root / "null.jsonl").write_text('{"prompt": null}\n')
    (root / "report").mkdir()
    (root / "report" / "eval.json").write_text("{}")
    (root / "samples").mkdir()
    (root / "samples" / "000-cat-seed0.png").write_bytes(b"an earlier image")
    used = root / "used"
    AlignPropTrainer(AlignPropConfig(pretrained_model=str(tiny_sd_path), rewards="saturation", num_epochs=1,
                                     sample_num_steps=2, mixed_precision="no", eval_num_samples=0,
                                     output_dir=str(used))).train()
    checkpoint = used / "checkpoints" / "checkpoint-1"
    shutil.copytree(checkpoint, root / "incomplete")
    (root / "incomplete" / "trainer_state.json").unlink()
    shutil.copytree(checkpoint, root / "damaged")
    (root / "damaged" / "optimizer.bin").write_bytes(b"\x00garbage")
    (root / "lora").mkdir()
    shutil.copy(used / "pytorch_lora_weights.safetensors", root / "lora")
    other_base_model_lora(root / "lora", root / "lora_other")
    (root / "garbage_lora").mkdir()
    (root / "garbage_lora" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00garbage")
    from alignprop_core.families import FLUX, SD3, Z_IMAGE

    FLUX.build_tiny(root / "tiny_flux")
    SD3.build_tiny(root / "tiny_sd3")
    Z_IMAGE.build_tiny(root / "tiny_z_image")
    site = root / "site"
    site.mkdir()
    fake_plugin(site, "broken", "broken_reward_plugin", "raise ImportError('needs libfoo')\n")
    fake_plugin(site, "bad-rewards", "bad_rewards_plugin", BAD_REWARDS)
    fake_plugin(site, "raising", "raising_reward_plugin", RAISING_HOOK)
    sys.path.insert(0, str(site))
    plugins.reset()
    yield root
    sys.path.remove(str(site))
    plugins.reset()


def placeholders(world: Path, tiny_sd_path: Path) -> dict[str, str]:
    names = ("out", "nonexistent", "empty", "file", "binary", "latin1", "blank", "lora", "lora_other",
             "garbage_lora", "incomplete", "damaged", "used", "report", "samples", "tiny_flux", "tiny_sd3",
             "tiny_z_image")
    return {**{name: str(world / name) for name in names}, "tiny": str(tiny_sd_path),
            "badjsonl": str(world / "bad.jsonl"), "nullprompt": str(world / "null.jsonl")}


def fill(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``{name}`` placeholder replaced (other braces, e.g. YAML flow mappings, kept)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_the_table_has_enough_cases():
    assert len(ROWS) >= 100
    assert {row[0] for row in ROWS} == set(COMMANDS) == set(BASE)
    assert all(len(row) == 4 for row in ROWS), [row for row in ROWS if len(row) != 4]


def run_row(command: str, arguments: str, values: dict[str, str]) -> int:
    """``alignprop <command> <base arguments> <arguments>`` in this process; the exit status."""
    argv = ([] if command == "-" else [command]) + shlex.split(BASE[command]) + shlex.split(arguments)
    try:
        return main([fill(arg, values) for arg in argv])
    except SystemExit as exc:  # argparse errors
        return exc.code


@pytest.mark.parametrize("command,case,arguments,message", ROWS, ids=[f"{row[0]}: {row[1]}" for row in ROWS])
def test_bad_input_gives_one_line_and_writes_nothing(command, case, arguments, message, world, tiny_sd_path, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(world)
    values = placeholders(world, tiny_sd_path)
    before = snapshot(world)
    capsys.readouterr()
    status = run_row(command, arguments, values)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2, err
    assert len(lines) == 1 and fill(message, values) in lines[0], err
    assert "Traceback" not in err
    assert not (world / "out").exists() and not (world / "nonexistent").exists()
    assert snapshot(world) == before


def test_a_plugin_whose_hook_raises_is_warned_about_once(world, capsys):
    plugins.reset()
    capsys.readouterr()
    assert "saturation" in plugins.registrations("reward")  # the others still work
    plugins.registrations("reward")
    err = capsys.readouterr().err
    assert err.count("warning: alignprop plugin 'raising' failed in register_rewards: RuntimeError: no GPU found") == 1
    assert err.count("warning: alignprop plugin 'broken' failed to load: ImportError: needs libfoo") == 1
    assert plugins.failed_plugins["raising"] == "RuntimeError: no GPU found"


def test_misspelled_names_of_uninstalled_rewards_get_both_hints(monkeypatch):
    monkeypatch.setitem(plugins.KNOWN_REWARD_PACKAGES, "not_here", "alignprop-reward-not-here")
    with pytest.raises(plugins.PluginError) as info:
        plugins.get("reward", "not_hre")
    assert "did you mean 'not_here'? It is provided by alignprop-reward-not-here: pip install " \
           "alignprop-reward-not-here" in str(info.value)
    with pytest.raises(plugins.PluginError, match=r"\. 'not_here' is provided by alignprop-reward-not-here"):
        plugins.get("reward", "not_here")
