"""PID 1 of the Docker image: `python launch/init.py COMMAND...` (the image's ENTRYPOINT).

It runs COMMAND in a process group of its own, passes every stop signal it gets (`docker stop`,
Kubernetes, a scheduler: SIGTERM; also SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) on to that whole
group, reaps every process handed to it, and exits only when no process of the run is left, with
COMMAND's exit status (128 + N when COMMAND died of signal N, as a shell reports it).

Why not tini (`docker run --init`) or dumb-init: they exit as soon as COMMAND does, and the
kernel kills every process left in the container when its PID 1 exits. `deepspeed`'s runner dies at
once of SIGTERM while the ranks below it still finish their step and save: under tini they would be
killed half way through the checkpoint. Standard library only (it runs before anything else).
Outside a container it makes itself a child subreaper (Linux), so it behaves the same when
it is not PID 1 (the tests run it that way).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def _own_group() -> None:
    """In the child before exec: a process group of its own (so that a signal to it reaches the run
    and not this init), holding the terminal if there is one (an interactive `docker run -it`)."""
    os.setpgid(0, 0)
    if os.isatty(0):
        # A background group that sets the terminal's foreground group gets SIGTTOU: block it meanwhile.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            os.tcsetpgrp(0, os.getpgrp())
        except OSError:  # a terminal that is not ours (no controlling terminal): nothing to hand over
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTTOU})


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python launch/init.py COMMAND [ARG ...]", file=sys.stderr)
        return 2
    if os.getpid() != 1 and sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        child = subprocess.Popen(argv, preexec_fn=_own_group)
    except OSError as e:
        print(f"error: cannot run {argv[0]!r}: {e}", file=sys.stderr)
        return 127

    def forward(signum, frame) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # the group is gone already (only orphans in other groups are left)
            pass

    for s in FORWARD:
        signal.signal(s, forward)
    code = None
    while True:  # reap everything, COMMAND and whatever it left behind, until nothing is left
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            child.returncode = code  # reaped here: keep Popen from waiting for it again
    return 128 - code if code is not None and code < 0 else code or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
