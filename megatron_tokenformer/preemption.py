"""Stopping cleanly before the cluster stops us: signals and a wall-clock limit, agreed by every rank.

SIGTERM (a scheduler's preemption, `scancel`, the DeepSpeed launcher or torchrun passing theirs
on) and SIGUSR1 (SLURM's `--signal=USR1@90`, sent ahead of the time limit) only set a flag: the
step in flight finishes. After each step every rank takes the maximum of the flags over the whole
world (one small all-reduce), so all ranks stop after the same step, save one checkpoint and
exit 0, even when the signal reached only some of them. `train.exit_after_minutes` does the same
before a wall-clock limit.

A signal to one launcher process often never reaches the ranks: DeepSpeed's runner (`deepspeed`,
single node) installs no handler and dies at once, leaving its `deepspeed.launcher.launch` and the
ranks running under PID 1; `deepspeed.launcher.launch` and torchrun die at once of SIGUSR1 (they
pass SIGTERM on, not SIGUSR1). So a rank also stops when a launcher above it is gone
(`LauncherWatch`): the same agreement, the same checkpoint and exit 0, and the launcher left below
then exits by itself once its ranks have.
"""
from __future__ import annotations

import signal
import threading
import time

import torch

from . import distributed as D
from .launcher_watch import LauncherWatch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_NONE, _TIME, _STOP = 0, 1, 2  # a stop request (signal, launcher gone) outranks the time limit in the message


class StopRequests:
    def __init__(self, exit_after_minutes: float | None, dev: torch.device):
        self.dev = dev
        self.signal_name: str | None = None
        self.launcher = LauncherWatch()
        self.deadline = time.monotonic() + 60 * exit_after_minutes if exit_after_minutes else None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self) -> str | None:
        """Why the run must stop after this step (the same answer on every rank), or None. Every
        rank calls it after every step: it is a collective."""
        mine = f"received {self.signal_name}" if self.signal_name else self.launcher.lost()
        code = _STOP if mine else _TIME if self.deadline and time.monotonic() > self.deadline else _NONE
        code = D.all_reduce_max(code, self.dev)
        if code == _STOP:
            return mine or "another rank received a stop signal or lost its launcher"
        if code == _TIME:
            return "train.exit_after_minutes is reached"
        return None

    def restore(self) -> None:
        """Put back the handlers that were there before (tests run several trainings in one process)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
