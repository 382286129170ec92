"""Long runs on clusters: a stop signal or a time limit ends the run cleanly (step finished,
checkpoint saved, exit 0) on every rank at the same step, whichever one process gets the signal
(plain python, one rank, the deepspeed runner, deepspeed.launcher.launch, torchrun, the image's
init), with no process of the run left behind; the resumed run logs the losses of a run never
stopped, bit for bit. One run per directory. Two torchrun "nodes" on one machine train the model of
one process."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, SMALL, env, launch, losses, metrics
from megatron_tokenformer.distributed import free_port

STEPS = 12
RUN = SMALL + ["model.dropout=0.1", f"train.decay_steps={STEPS}", "train.warmup_steps=2"]


def _cmd(launcher: str, nproc: int, args: list[str]) -> list[str]:
    script = str(ROOT / "launch" / "pretrain.py")
    args = ["--config", str(ROOT / "configs" / "tiny.yml"), *args]
    if launcher == "python":
        return [sys.executable, script, *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port()), script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), script, *args]


def _logged(run: Path) -> int:
    f = run / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def _tree(pid: int) -> list[psutil.Process]:
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def _left(procs: list[psutil.Process]) -> list[str]:
    """The processes of procs that still run. A zombie has exited: it waits for its parent, or for
    an init that reaps orphans (this test machine's PID 1 may not)."""
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:150]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _stop_midway(launcher, nproc, args, run, send, timeout=300, cmd=None, steps=2):
    """Start a run, call send(proc) once its metrics reach `steps` rows, wait until its command
    has exited and its output is closed (orphaned ranks hold it too), then until every process of the
    run has exited. Returns (the command's exit status as a shell shows it, the output)."""
    cmd = cmd or _cmd(launcher, nproc, args + [f"log.dir={run}"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    end = time.time() + timeout
    while _logged(run) < steps and proc.poll() is None and time.time() < end:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped:\n" + proc.stdout.read()[-3000:]
    procs = _tree(proc.pid)
    assert len([p for p in procs if _is_worker(p)]) == nproc, procs
    send(proc)
    out, _ = proc.communicate(timeout=timeout)
    while _left(procs) and time.time() < end:
        time.sleep(0.1)
    assert not _left(procs), ("processes of the run are left behind", _left(procs), out[-3000:])
    code = proc.returncode
    return 128 - code if code < 0 else code, out


def _is_worker(p: psutil.Process) -> bool:
    """A training process (python running launch/pretrain.py, not a launcher passing it on)."""
    cmd = " ".join(p.cmdline()[:4])
    return "pretrain.py" in cmd and not any(n in cmd for n in ("deepspeed", "torch.distributed.run", "init.py"))


def _workers(proc) -> list[psutil.Process]:
    return [p for p in _tree(proc.pid)[1:] if _is_worker(p)]


def _launcher(proc, module: str) -> psutil.Process:
    (p,) = [p for p in _tree(proc.pid) if module in p.cmdline()[:4]]
    return p


@pytest.mark.slow
def test_sigterm_under_python_saves_exits_0_and_resumes(corpus, tmp_path):
    run = tmp_path / "run"
    args = RUN + [f"data.path={corpus}", f"train.steps={STEPS}", "checkpoint.interval=0"]
    code, out = _stop_midway("python", 1, args, run, lambda p: p.send_signal(signal.SIGTERM))
    assert code == 0, out[-3000:]
    assert "received SIGTERM; saved the checkpoint and stopping" in out
    stopped = metrics(run)[-1]["step"]
    assert 2 <= stopped < STEPS and (run / "checkpoints" / f"step_{stopped:08d}").is_dir()
    launch(args + [f"log.dir={run}"], launcher="python")
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))  # continued, nothing twice


# The runs stopped through each entry point below continue one another in one run directory: each
# resumes the checkpoint the one before saved (or starts the run, when a test runs alone), trains a
# few steps, is stopped, and must log the losses of a run never stopped, bit for bit. So every run
# checks a stop and the previous stop's resume, with one launch per entry point.
CHAIN_STEPS = 40
CHAIN = SMALL + ["model.dropout=0.1", f"train.decay_steps={CHAIN_STEPS}", "train.warmup_steps=2",
                 f"train.steps={CHAIN_STEPS}", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def chain(corpus, tmp_path_factory):
    """(the run directory the stop tests continue, the losses of the same run never stopped)."""
    straight = tmp_path_factory.mktemp("straight")
    launch(CHAIN + [f"data.path={corpus}", f"log.dir={straight}"], nproc=2)
    return tmp_path_factory.mktemp("chain") / "run", losses(straight)


def _stop_in_chain(chain, corpus, launcher, send, wrap=()):
    """One run of the chain under `launcher` (deepspeed or torchrun, 2 ranks; `wrap`: a command in
    front, e.g. the image's init), stopped by send(proc) once it has trained 2 steps. Checks what
    every stop must give: the previous checkpoint resumed, every rank stopped after the same step
    and saved it in one checkpoint, no rank failed, no process of the run left, the losses of a run
    never stopped. Returns (the exit status of the command, its output)."""
    run, straight = chain
    before = metrics(run)[-1]["step"] if (run / "metrics.jsonl").is_file() else 0
    args = CHAIN + [f"data.path={corpus}", f"log.dir={run}"]
    code, out = _stop_midway(launcher, 2, args, run, send, cmd=[*wrap, *_cmd(launcher, 2, args)], steps=before + 2)
    steps = [r["step"] for r in metrics(run)]
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1)) and before + 2 <= stopped < CHAIN_STEPS, (steps, out[-3000:])
    if before:
        assert f"resumed from {run / 'checkpoints' / f'step_{before:08d}'} at step {before}" in out, out[-3000:]
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert newest.name == f"step_{stopped:08d}", (newest, out[-3000:])  # saved where it stopped
    assert sorted(p.name for p in newest.glob("rng-*")) == [f"rng-{r:05d}.safetensors" for r in range(2)]
    assert "exits with return code" not in out and "ChildFailedError" not in out, out[-3000:]  # no rank failed
    got = losses(run)
    assert got == {s: straight[s] for s in got}  # bit for bit, dropout included, across every stop so far
    return code, out


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step(chain, corpus):
    """SLURM's --signal=USR1@90 may reach one process: the ranks agree after the step in flight;
    torchrun sees its ranks end well and exits 0."""
    def to_rank_1(proc):
        (w,) = [w for w in _workers(proc) if w.environ().get("RANK") == "1"]
        w.send_signal(signal.SIGUSR1)

    code, out = _stop_in_chain(chain, corpus, "torchrun", to_rank_1)
    assert code == 0, out[-3000:]
    assert "another rank received a stop signal or lost its launcher; saved the checkpoint" in out  # rank 0 logs
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_runner_alone(chain, corpus):
    """The user's `kill -TERM <pid of deepspeed>`: DeepSpeed's runner has no handler on one node and
    dies at once (143), before the ranks finish; they see their launcher's parent gone, save and exit
    0, and deepspeed.launcher.launch, left without a parent, exits after them."""
    code, out = _stop_in_chain(chain, corpus, "deepspeed", lambda p: p.send_signal(signal.SIGTERM))
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "the launcher deepspeed.launcher.runner (pid" in out and "is gone; saved the checkpoint" in out
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_sigusr1_to_deepspeed_launcher_launch(chain, corpus):
    """deepspeed.launcher.launch handles SIGTERM and SIGINT only: SIGUSR1 kills it at once, and the
    runner, seeing its child killed by a signal, exits 0 at once. The ranks see their parent gone."""
    code, out = _stop_in_chain(chain, corpus, "deepspeed",
                               lambda p: _launcher(p, "deepspeed.launcher.launch").send_signal(signal.SIGUSR1))
    assert code == 0, out[-3000:]
    assert "the launcher deepspeed.launcher.launch (pid" in out and "is gone; saved the checkpoint" in out
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_to_torchrun(chain, corpus):
    """torchrun runs each rank in a session of its own (a signal to torchrun's group misses them) and
    passes the SIGTERM it receives on to them, waiting up to 30 s; then it raises its SignalException
    (a traceback of torchrun's own) and exits 1."""
    code, out = _stop_in_chain(chain, corpus, "torchrun", lambda p: p.send_signal(signal.SIGTERM))
    assert code == 1, out[-3000:]
    assert "received SIGTERM; saved the checkpoint and stopping" in out
    assert out.count("Traceback") == 1 and "SignalException: Process" in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_docker_init_under_deepspeed(chain, corpus):
    """PID 1 of the image (launch/init.py, run here as a subreaper) passes SIGTERM to the whole
    process group, as a scheduler signalling a group does: the runner dies at once, launch passes it
    on and exits 1, the ranks save and exit 0. The init exits with the command's status only once
    every process of the run has exited (it reaped them all: not even a zombie is left)."""
    procs = []

    def to_init(proc):
        procs.extend(_tree(proc.pid))
        proc.send_signal(signal.SIGTERM)

    code, out = _stop_in_chain(chain, corpus, "deepspeed", to_init,
                               wrap=[sys.executable, str(ROOT / "launch" / "init.py")])
    assert code == 128 + signal.SIGTERM, out[-3000:]  # the runner's own status
    assert len(procs) == 5 and not [p for p in procs[1:] if p.is_running()], procs  # reaped, not zombies
    assert "received SIGTERM; saved the checkpoint and stopping" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_exit_after_minutes(corpus, tmp_path):
    run = tmp_path / "run"
    proc = launch(SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=100000",
                           "train.exit_after_minutes=0.05"], launcher="python")
    assert "train.exit_after_minutes is reached; saved the checkpoint and stopping" in proc.stdout
    stopped = metrics(run)[-1]["step"]
    assert stopped < 100000 and (run / "checkpoints" / f"step_{stopped:08d}").is_dir()


@pytest.mark.slow
def test_one_run_per_directory(corpus, tmp_path):
    run = tmp_path / "run"
    args = SMALL + [f"data.path={corpus}", "train.steps=100000"]
    first = subprocess.Popen(_cmd("python", 1, args + [f"log.dir={run}"]), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 300
        while _logged(run) < 1 and first.poll() is None and time.time() < end:
            time.sleep(0.05)
        second = launch(args + [f"log.dir={run}"], launcher="python", check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"is in use by a live run (pid {first.pid} on host" in second.stderr
    finally:
        first.kill()
        first.wait()
    # killed: its lock went with it; the next run takes the directory over, saying whose it was
    third = launch(args[:-1] + [f"log.dir={run}", "train.steps=2"], launcher="python")
    assert f"taking over the lock of {run} from a run that is gone (pid {first.pid}" in third.stderr
    assert (run / ".lock").read_text() == ""  # a finished run leaves nothing to take over


def test_a_filesystem_without_locks_is_named(tmp_path, monkeypatch):
    import errno
    import fcntl

    from megatron_tokenformer.fileio import LockError, RunLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockError, match="does not support file locks.*set log.lock=false"):
        RunLock(tmp_path)


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_the_single_process_model(corpus, tmp_path):
    """Two torchrun "nodes" of 2 ranks each meet at a localhost rendezvous: TP=2 inside a node,
    DP=2 across. Their losses equal one process's; global ranks name the files (never local ones)."""
    single = tmp_path / "single"
    common = SMALL + [f"data.path={corpus}", "train.steps=4", "checkpoint.interval=0"]
    launch(common + [f"log.dir={single}"], launcher="python")
    run, port = tmp_path / "two_nodes", free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(i), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                               str(port), str(ROOT / "launch" / "pretrain.py"), "--config",
                               str(ROOT / "configs" / "tiny.yml"), *common, "parallel.tensor=2", f"log.dir={run}"],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "tensor 2 x pipeline 1 x data 2" in outs[0] and "TokenFormer:" not in outs[1]  # global rank 0 logs
    want, got = losses(single), losses(run)
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), (step, got, want)
    ckpt = run / "checkpoints" / f"step_{4:08d}"
    assert sorted(p.name for p in ckpt.glob("rng-*")) == [f"rng-{r:05d}.safetensors" for r in range(4)]
    # one piece per (tensor rank, data-parallel rank): data-parallel rank 1 lives on the second node
    assert sorted(p.name for p in ckpt.glob("layer_001-*")) == [f"layer_001-tp{t:02d}-dp{d:02d}.safetensors"
                                                                 for t in range(2) for d in range(2)]


def test_init_waits_for_every_process_of_the_run(tmp_path):
    """launch/init.py (the image's PID 1) passes SIGTERM to the command's group and exits only when
    the last process of it has, even one the command left behind: tini exits with its child, and
    the container's end would kill the rest half way through their checkpoint. Its status is the
    command's, as a shell shows it."""
    ready, done = tmp_path / "ready", tmp_path / "done"
    rank = (f"import signal, time\nsignal.signal(signal.SIGTERM, lambda *a: None)\nopen({str(ready)!r}, 'w')\n"
            f"time.sleep(3)\nopen({str(done)!r}, 'w')")
    runner = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {rank!r}])\ntime.sleep(60)"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "init.py"), sys.executable, "-c", runner])
    end = time.time() + 60
    while not ready.exists() and time.time() < end:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the runner dies of it at once; its child outlives it by 3 s
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert done.is_file()  # the init was still there when the orphan finished


def test_a_rank_stops_when_its_launcher_is_gone_and_only_then(tmp_path):
    """LauncherWatch: a launcher that dies breaks the link (its rank is handed to another parent);
    a parent that is no launcher (the user's shell, under nohup) is not watched at all."""
    ready = tmp_path / "ready"
    probe = ("import os, sys, time\nfrom megatron_tokenformer.launcher_watch import LauncherWatch\nw = LauncherWatch()\n"
             f"parent = os.getppid()\nprint(len(w.links), w.lost(), flush=True)\nopen({str(ready)!r}, 'w')\n"
             "while os.getppid() == parent: time.sleep(0.05)\nprint(w.lost(), flush=True)")
    launcher = tmp_path / "torchrun"  # a launcher by its name, as in `python .../bin/torchrun`
    launcher.write_text(f"import os, subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {probe!r}])\n"
                        f"while not os.path.exists({str(ready)!r}): time.sleep(0.05)\n")  # then exit: gone
    shell = tmp_path / "shell"
    shell.write_text(launcher.read_text())
    for parent, want in ((launcher, "1 None\nthe launcher torchrun (pid "), (shell, "0 None\nNone\n")):
        ready.unlink(missing_ok=True)
        out = subprocess.run([sys.executable, str(parent)], env=env(), stdout=subprocess.PIPE, text=True,
                             timeout=120).stdout  # ends when the probe does: it holds the pipe
        assert out.startswith(want), (parent.name, out)
