"""Whether the launcher processes above this rank are still there (see preemption.py for why).

Standard library and psutil only (a dependency of DeepSpeed): cheap to import.
"""
from __future__ import annotations

import os

import psutil

# How a launcher process shows in its command line: `deepspeed` / `torchrun` (console scripts, run
# by python) or their modules under `python -m`. Only these count: a rank started by hand, or a
# `deepspeed` runner whose own parent (the user's shell) exits under nohup, must keep training.
_LAUNCHERS = {"deepspeed", "ds", "torchrun", "deepspeed.launcher.runner", "deepspeed.launcher.launch",
              "torch.distributed.run", "torch.distributed.launch"}


def _launcher_name(pid: int) -> str | None:
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    names = [os.path.basename(a) for a in argv[:4]]  # [python, (-u,) (-m,) module or script]
    return next((n for n in names if n in _LAUNCHERS), None)


def _parent(pid: int) -> int | None:
    """pid's parent now, or None once pid is gone."""
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.ppid()
    except psutil.Error:
        return None


class LauncherWatch:
    """The chain from this rank up through the launcher processes that started it (torchrun; or
    deepspeed.launcher.launch and the `deepspeed` runner above it). A link breaks when its parent
    dies: the child is handed to PID 1 (or a subreaper), so its parent pid changes for good.

    Polled after each step (a few /proc reads), which is as soon as a stop could act anyway.
    PR_SET_PDEATHSIG would not do: it covers only the rank's own parent, and the runner's death
    leaves that parent (deepspeed.launcher.launch) alive."""

    def __init__(self) -> None:
        self.links: list[tuple[int, int, str]] = []  # (child pid, its launcher's pid, the launcher's name)
        child, parent = os.getpid(), os.getppid()
        while parent and parent > 1 and (name := _launcher_name(parent)):
            self.links.append((child, parent, name))
            child, parent = parent, _parent(parent) or 0

    def lost(self) -> str | None:
        """Why this rank's launcher chain is broken, or None while it is whole."""
        for child, parent, name in self.links:
            if (os.getppid() if child == os.getpid() else _parent(child)) != parent:
                return f"the launcher {name} (pid {parent}) is gone"
        return None
