"""The checkpoint lifecycle of a run: where a run's files live, the trainer state, saving, pruning, resuming.

Layout of ``output_dir``::

    checkpoints/checkpoint-<step>/   accelerate state (trained weights only, optimizer, RNG) + trainer_state.json
    metrics.jsonl                    one strict-JSON line per optimizer step (NaN/inf written as null), eval rows
    alignprop_config.yaml            the run's config
    pytorch_lora_weights.safetensors the exported LoRA (or unet/ after full fine-tuning)

Rules that keep earlier work safe: a checkpoint folder appears only when complete (written under a temporary name,
fsynced, renamed); an existing checkpoint is never replaced; a run never starts in a folder holding another run's work
unless asked to (``overwrite_output_dir``); resuming continues only the run a checkpoint belongs to, from its newest
checkpoint, or branches into a fresh folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from alignprop_core.errors import AlignPropError, ConfigError, error_text
from alignprop_core.eval_metrics import metric_key

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "alignprop_config.yaml"
#: Files whose presence means a folder holds a run's work (a full fine-tuning export is unet/ + the config file).
RUN_FILES = (METRICS_NAME, "pytorch_lora_weights.safetensors", CONFIG_NAME)


class TrainerState:
    """What resume needs besides accelerate's state (weights, optimizer), saved as JSON (no pickle).

    No RNG state is stored: every random draw is seeded from ``(seed, step, micro-batch, sample index)`` (see
    ``seeding.derive_seed``), so the step counter alone reproduces the prompts, noise and truncation of any step.
    ``run`` describes what was trained (base model, its fingerprint, LoRA settings) so that a resume with other
    settings is refused with a message naming the field instead of failing inside the weight loader.
    """

    def __init__(self, run: Optional[dict[str, Any]] = None) -> None:
        self.global_step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.run: dict[str, Any] = dict(run or {})
        self.early_stopping: dict[str, Any] = {}  # monitoring.EarlyStopping.state(): the best eval so far
        self.reward_normalizers: dict[str, Any] = {}  # RewardSet.normalizer_state(): normalize: running

    def save(self, directory: Path) -> None:
        (directory / TRAINER_STATE_NAME).write_text(json.dumps(vars(self), sort_keys=True))

    def load(self, directory: Path) -> None:
        """Read and check ``trainer_state.json``; a one-line :class:`ConfigError` when it is damaged."""
        path = directory / TRAINER_STATE_NAME
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"resume_from: '{path}' is damaged ({type(exc).__name__}); pick another checkpoint "
                              f"under {CHECKPOINTS_DIR}/") from None
        if not isinstance(state, dict):
            raise ConfigError(f"resume_from: '{path}' is damaged (not a JSON object); pick another checkpoint")
        for name in ("global_step", "nonfinite_total", "nonfinite_in_a_row"):
            value = state.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"resume_from: '{path}' is damaged ({name} is {value!r}, expected an integer "
                                  ">= 0); pick another checkpoint")
        self.global_step = state.get("global_step", 0)
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.run = state.get("run") if isinstance(state.get("run"), dict) else {}
        self.early_stopping = state.get("early_stopping") if isinstance(state.get("early_stopping"), dict) else {}
        normalizers = state.get("reward_normalizers")
        self.reward_normalizers = normalizers if isinstance(normalizers, dict) else {}


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder name, or None."""
    prefix, _, number = path.name.rpartition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None
             and (p / TRAINER_STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def holds_a_run(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds an earlier run's work (checkpoints, metrics or an exported model)."""
    folder = Path(output_dir)
    return bool(list_checkpoints(folder)) or any((folder / name).exists() for name in RUN_FILES)


def find_resume_dir(resume_from: str, output_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint folder to resume from (``resume_from`` is a folder or ``latest``), checked so that resuming
    can never overwrite work: it must be the newest checkpoint of ``output_dir``'s own run, or ``output_dir`` must
    hold no run yet (a branch). Raises a one-line :class:`ConfigError` otherwise."""
    from alignprop_core.lora import LORA_WEIGHTS_NAME

    if not resume_from:
        return None
    output_dir = Path(output_dir)
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"resume_from: no checkpoint in {output_dir / CHECKPOINTS_DIR}; drop resume_from to "
                              "start a new run")
        return found[-1]
    path = Path(resume_from).expanduser()
    if not path.exists():
        raise ConfigError(f"resume_from: '{resume_from}' does not exist; give a checkpoint folder or 'latest'")
    if not path.is_dir():
        raise ConfigError(f"resume_from: '{resume_from}' is a file, not a folder; give a checkpoint folder or "
                          "'latest'")
    weights = (LORA_WEIGHTS_NAME, "unet", "transformer")  # a LoRA, or a fully fine-tuned denoiser
    missing = [n for n in (TRAINER_STATE_NAME,) if not (path / n).is_file()]
    if not any((path / n).exists() for n in weights):
        missing.append(LORA_WEIGHTS_NAME)
    if missing:
        raise ConfigError(f"resume_from: '{resume_from}' is not a complete alignprop checkpoint (missing "
                          f"{', '.join(missing)}); pick another folder under {CHECKPOINTS_DIR}/")
    own_root = (output_dir / CHECKPOINTS_DIR).resolve()
    if path.resolve().parent == own_root:
        newer = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > (checkpoint_step(path) or 0)]
        if newer:
            raise ConfigError(f"resume_from: '{path.name}' is not the newest checkpoint of '{output_dir}' "
                              f"({newer[-1].name} exists, and continuing from {path.name} would overwrite it); "
                              "resume from latest, or branch off with a new output_dir")
    elif holds_a_run(output_dir):
        owner = path.resolve().parent.parent
        raise ConfigError(f"resume_from: checkpoint '{path}' belongs to the run in '{owner}', but output_dir "
                          f"'{output_dir}' holds another run's work; set output_dir to '{owner}' to continue that "
                          "run, or to a new folder to branch off from the checkpoint")
    return path


def check_output_dir(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """Refuse a new run in a folder that holds an earlier run's work (unless ``overwrite``), and check the folder
    can be written, without creating anything (it is created when training starts)."""
    output_dir = Path(output_dir)
    if (output_dir / "model_index.json").is_file():
        raise ConfigError(f"output_dir: '{output_dir}' is a diffusers pipeline folder; choose another folder for the "
                          "run")
    if not resuming and not overwrite and holds_a_run(output_dir):
        what = "checkpoints" if list_checkpoints(output_dir) else "files"
        raise ConfigError(f"output_dir: '{output_dir}' already has {what} from an earlier run; pass "
                          "resume_from=latest to continue it, overwrite_output_dir=true to replace it, or choose a "
                          "new output_dir")
    problem = writable_problem(output_dir)
    if problem:
        raise ConfigError(f"output_dir: cannot write to '{output_dir}' ({problem}); choose a writable folder")


def writable_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` (existing or not) cannot be created and written, or None; creates nothing that stays."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"'{existing}' is a file"
    if existing == folder.absolute():
        try:
            probe = existing / ".alignprop-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            return exc.strerror or str(exc)
        return None
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"'{existing}' is not writable"
    return None


def clear_run(output_dir: Path) -> None:
    """``overwrite_output_dir``: remove an earlier run's checkpoints and metrics (the user asked to replace it)."""
    shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
    (output_dir / METRICS_NAME).unlink(missing_ok=True)


def prepare_run_folder(output_dir: Path, *, replace: bool, step: int, config_yaml: str) -> None:
    """Before a run's first step: remove an earlier run only when asked to (``replace``), create the folder, drop
    half-written saves and the metrics rows past ``step`` (a resumed run), and write the run's config."""
    if replace:
        clear_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    truncate_metrics(output_dir, step)
    (output_dir / CONFIG_NAME).write_text(config_yaml)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Delete half-written saves left by a process killed while saving or pruning."""
    for stale in (output_dir / CHECKPOINTS_DIR).glob(".*-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainerState, limit: int) -> Path:
    """Save accelerate state + trained weights + trainer state to ``checkpoints/checkpoint-<step>`` atomically, then
    prune beyond ``limit``. A save that fails (a full disk, say) removes its partial folder and raises a one-line
    :class:`AlignPropError`; earlier checkpoints are untouched."""
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"checkpoint-{state.global_step}"
    tmp = root / f".tmp-checkpoint-{state.global_step}"
    try:
        if accelerator.is_main_process:
            if final.exists():  # never replace a checkpoint: find_resume_dir makes this unreachable for real runs
                raise AlignPropError(f"checkpoint '{final}' already exists; alignprop never overwrites a checkpoint")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            state.save(tmp)
            fsync_tree(tmp)
            os.replace(tmp, final)
            for old in list_checkpoints(output_dir)[:-limit]:
                trash = old.with_name(f".trash-{old.name}")
                os.replace(old, trash)  # atomic: a kill mid-delete never leaves a half checkpoint that looks whole
                shutil.rmtree(trash, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlignPropError(f"could not save checkpoint-{state.global_step} in '{root}' ({describe_os_error(exc)}); "
                             f"{_newest(output_dir)}; free space or fix the folder, then resume with "
                             "resume_from=latest") from None
    accelerator.wait_for_everyone()
    return final


def describe_os_error(exc: OSError) -> str:
    """``"no space left on device"`` style text for an OSError (the disk-full case named plainly)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device: the disk is full"
    return (exc.strerror or str(exc)).lower() if exc.strerror else str(exc)


def _newest(output_dir: Path) -> str:
    found = list_checkpoints(output_dir)
    return f"the newest complete checkpoint is {found[-1]}" if found else "no checkpoint was saved before"


def fsync_tree(directory: Path) -> None:
    """Flush every file of a finished save to disk before it is renamed into place."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# ---------------------------------------------------------------------- metrics.jsonl


def strict_json_row(row: dict[str, Any]) -> str:
    """One JSON line with NaN/inf written as null (strict JSON, which every parser reads)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps({key: clean(value) for key, value in row.items()}, allow_nan=False)


def eval_row(step: int, when: str, means: dict[str, float]) -> dict[str, Any]:
    """A metrics.jsonl eval row: ``{"step", "eval": "before"|"step"|"after", "eval/reward_mean",
    "eval/<reward>_mean", "eval/<diversity or image statistic>"}`` (``eval_metrics.metric_key``)."""
    return {"step": step, "eval": when, **{metric_key(name): value for name, value in means.items()}}


def append_metrics(output_dir: Path, row: dict[str, Any]) -> None:
    with open(output_dir / METRICS_NAME, "a", encoding="utf-8") as log:
        log.write(strict_json_row(row) + "\n")


def truncate_metrics(output_dir: Path, step: int) -> None:
    """On resume: drop the rows of steps after ``step`` (logged by a run that died before checkpointing them), so
    the continued run does not log those steps twice. Rewritten atomically."""
    path = output_dir / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue  # a line cut short by a kill
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line)
    tmp = path.with_name(f".{METRICS_NAME}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def finite(value: Any) -> Optional[float]:
    """A metrics value as a finite float, else None (null, NaN, inf, strings, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, one per line; lines cut short (an interrupted run) and non-objects are
    skipped, a missing file gives []."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)  # also takes the NaN that older runs wrote
        except ValueError:  # a line cut short by an interrupted run
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """The training rows of a ``metrics.jsonl`` sorted by step (one per step: a resumed run redoes the steps after
    its checkpoint, and the row written last wins) and its eval rows (``"eval": "before" | "after"``), in file
    order. Rows without a numeric ``step`` are dropped; a missing file gives ``([], [])``."""
    train: dict[int, dict] = {}
    evals: list[dict] = []
    for row in read_jsonl(path):
        if finite(row.get("step")) is None:
            continue
        if "eval" in row:
            evals.append(row)
        else:
            train[int(row["step"])] = row
    return [train[step] for step in sorted(train)], evals


# ---------------------------------------------------------------------- resuming


def check_same_run(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """One line naming the first setting in which the checkpoint's run and this run differ."""
    if not saved:
        return  # a checkpoint from before alignprop recorded its run: the weight loader checks the shapes
    if saved.get("base_fingerprint") != current.get("base_fingerprint"):
        raise ConfigError(f"resume_from: checkpoint '{checkpoint}' was trained on base model "
                          f"'{saved.get('base_model')}' (fingerprint {saved.get('base_fingerprint')}), but this run "
                          f"loads '{current.get('base_model')}' (fingerprint {current.get('base_fingerprint')}); "
                          f"resume with pretrained_model={saved.get('base_model')!r}, or start a new run")
    for name in ("use_lora", "lora_rank", "lora_alpha", "lora_target_modules"):
        if name in saved and saved.get(name) != current.get(name):
            raise ConfigError(f"resume_from: checkpoint '{checkpoint}' was trained with {name}={saved.get(name)!r}, "
                              f"this run has {name}={current.get(name)!r}; resume with {name}={saved.get(name)!r}, "
                              "or start a new run in a new output_dir")


def load_failure(exc: BaseException) -> str:
    """What went wrong loading a checkpoint, in one line, without torch's advice to unpickle untrusted files."""
    text = str(exc)
    if "weights_only" in text or "Unpickl" in text:
        detail = next((line.strip() for line in text.splitlines() if "Unpickl" in line), "")
        return ("it holds pickled objects other than tensors, which alignprop never loads (torch.load with "
                f"weights_only=True){': ' + detail[:160] if detail else ''}")
    return error_text(exc, 200)


def newest_checkpoint_text(output_dir: Path) -> str:
    found = list_checkpoints(output_dir)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"


def run_description(config: Any, use_lora: bool, base_model: str, base_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint records about its run, so that a resume with other settings is refused by name."""
    lora = {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
            "lora_target_modules": sorted(config.lora_target_modules)} if use_lora else {}
    return {"base_model": base_model, "base_fingerprint": base_fingerprint, "use_lora": use_lora, **lora}


def export_into(directory: Path, write: Any) -> None:
    """Write an export (``write(folder)`` fills a staging folder) into ``directory`` so that each file appears
    complete or not at all; a failure (a full disk) removes the staging folder and is one line."""
    staging = directory / ".tmp-export"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        for item in staging.iterdir():
            target = directory / item.name
            if item.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        staging.rmdir()
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AlignPropError(f"could not export the trained weights to '{directory}' ({describe_os_error(exc)}); the "
                             "checkpoints are intact: free space and resume with resume_from=latest") from None


def resume(accelerator: Any, directory: Path, state: TrainerState) -> None:
    """Load checkpoint ``directory`` into ``accelerator`` (weights, optimizer, RNG) and its counters into ``state``,
    after checking it was trained with the same base model and settings as ``state.run``."""
    saved = TrainerState()
    saved.load(directory)
    check_same_run(saved.run, state.run, directory)
    try:
        accelerator.load_state(str(directory))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"resume_from: checkpoint '{directory}' is damaged and cannot be loaded "
                          f"({load_failure(exc)}); pick an older folder under checkpoints/") from None
    state.global_step = saved.global_step
    state.nonfinite_total = saved.nonfinite_total
    state.nonfinite_in_a_row = saved.nonfinite_in_a_row
    state.early_stopping = saved.early_stopping
    state.reward_normalizers = saved.reward_normalizers
