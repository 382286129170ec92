"""Long runs on clusters: a stop signal or a time limit ends the run cleanly (step finished,
checkpoint saved, exit 0) on every rank at the same step, under plain python, torchrun and the
DeepSpeed launcher; the resumed run logs the losses of a run never stopped, bit for bit. One run
per directory. Two torchrun "nodes" on one machine train the model of one process."""
import os
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


def _stop_midway(launcher, nproc, args, run, send, timeout=300):
    """Start a run of STEPS steps, call send(proc) once it has logged 2 steps, wait for the end."""
    proc = subprocess.Popen(_cmd(launcher, nproc, args + [f"log.dir={run}"]), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    end = time.time() + timeout
    while _logged(run) < 2 and proc.poll() is None and time.time() < end:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped:\n" + proc.stdout.read()[-3000:]
    send(proc)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _workers(proc) -> list[psutil.Process]:
    """The training processes a launcher started (python processes running launch/pretrain.py)."""
    def is_worker(p):
        cmd = " ".join(p.cmdline())
        return "pretrain.py" in cmd and "deepspeed.launcher" not in cmd and "torch.distributed.run" not in cmd

    return [p for p in psutil.Process(proc.pid).children(recursive=True) if is_worker(p)]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    launch(RUN + [f"data.path={corpus}", f"log.dir={run}", f"train.steps={STEPS}"], nproc=2)
    return losses(run)


def _check_stopped_and_resumed(corpus, run, straight, out, nproc, launcher="torchrun"):
    rows = metrics(run)
    stopped = rows[-1]["step"]
    assert 2 <= stopped < STEPS, out[-3000:]
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts[-1].name == f"step_{stopped:08d}", (ckpts, out[-3000:])  # saved where it stopped
    launch(RUN + [f"data.path={corpus}", f"log.dir={run}", f"train.steps={STEPS}"], nproc=nproc, launcher=launcher)
    assert losses(run) == straight  # bit for bit, dropout included


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


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step(corpus, tmp_path, straight):
    """SLURM's --signal=USR1@90 may reach one process: the ranks agree after the step in flight."""
    run = tmp_path / "run"
    args = RUN + [f"data.path={corpus}", f"train.steps={STEPS}", "checkpoint.interval=0"]

    def to_rank_1(proc):
        (w,) = [w for w in _workers(proc) if w.environ().get("RANK") == "1"]
        w.send_signal(signal.SIGUSR1)

    code, out = _stop_midway("torchrun", 2, args, run, to_rank_1)
    assert code == 0, out[-3000:]
    assert "another rank received a stop signal; saved the checkpoint" in out  # rank 0 logs
    _check_stopped_and_resumed(corpus, run, straight, out, nproc=2)


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launch_group(corpus, tmp_path, straight):
    """A scheduler signals the whole process group: the launcher passes SIGTERM on too (and exits
    1 itself, its own choice); the ranks finish the step, save and exit 0."""
    run = tmp_path / "run"
    args = RUN + [f"data.path={corpus}", f"train.steps={STEPS}", "checkpoint.interval=0"]
    workers = []

    def to_group(proc):
        workers.extend(_workers(proc))
        os.killpg(proc.pid, signal.SIGTERM)

    _, out = _stop_midway("deepspeed", 2, args, run, to_group)
    assert len(workers) == 2
    assert "received SIGTERM; saved the checkpoint and stopping" in out, out[-3000:]
    assert "exits with return code" not in out  # no rank failed
    _check_stopped_and_resumed(corpus, run, straight, out, nproc=2, launcher="deepspeed")


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
