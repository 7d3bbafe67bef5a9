"""Stopping a run from outside: SIGINT (Ctrl-C), SIGTERM (``kill``, ``docker stop``, SLURM preemption) and SIGUSR1
(SLURM's advance warning) ask the trainer to stop at the next safe point, after the current optimizer step, where it
saves a checkpoint and the export and raises :class:`TrainingInterrupted`."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch

from alignprop_core.errors import AlignPropError

#: Signals that stop a run gracefully: Ctrl-C, ``kill``/``docker stop``/SLURM preemption, SLURM's advance warning.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ())


class TrainingInterrupted(AlignPropError):
    """A stop signal ended the run at a safe point after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Within the block, SIGINT/SIGTERM/SIGUSR1 ask the run to stop at the next safe point (after a step); a second
    signal stops at once (KeyboardInterrupt). Handlers are installed only in the main thread and restored after."""

    def __init__(self) -> None:
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number
        print(f"\n{signal.Signals(number).name}: stopping after this step (send it again to stop at once)",
              file=sys.stderr)

    def requested(self, accelerator: Any) -> bool:
        """True once any process got a stop signal (all processes agree, so they stop at the same step)."""
        flag = float(bool(self.signal_number))
        if accelerator.num_processes > 1:
            flag = float(accelerator.reduce(torch.tensor(flag, device=accelerator.device), reduction="sum"))
        return flag > 0

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
