"""Faults: a training process SIGKILLed at seeded random points, during steps and during checkpoint
writes, always resumes from its newest good checkpoint and ends with the losses of a run never killed."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, env, launch, losses

pytestmark = pytest.mark.slow  # every test here starts training processes or several ranks

RUN = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.qkv_tokens=64",
       "model.proj_tokens=64", "model.ffn_tokens=128", "model.seq_length=64", "train.micro_batch_size=4",
       "train.global_batch_size=8", "log.interval=1", "log.progress=false", "eval.interval=0",
       "log.wandb_mode=disabled", "train.steps=40", "checkpoint.interval=1", "checkpoint.keep_last=2",
       "model.dropout=0.1"]


def _start(args, log_path):
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yml"), *args]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT), log


def _wait_for(pred, proc, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if pred():
            return True
        time.sleep(0.001)
    return False


def test_sigkill_anywhere_resumes_to_the_same_losses(corpus, tmp_path, reap):
    args = RUN + [f"data.path={corpus}"]
    launch(args + [f"log.dir={tmp_path / 'straight'}"], launcher="python")
    want = losses(tmp_path / "straight")

    run = tmp_path / "killed"
    ckpt = run / "checkpoints"
    rng = random.Random(20261127)
    kills = {"step": 0, "write": 0}
    metrics_file = run / "metrics.jsonl"

    def logged() -> int:
        return len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0

    def partials_since(ns: int) -> list[str]:
        """The staging directories made (or written into) since `ns`: a .partial left by an earlier
        killed attempt stays until the next good save, and must not count as a write under way."""
        found = []
        for p in (ckpt.iterdir() if ckpt.is_dir() else []):
            try:
                if p.name.endswith(".partial") and p.stat().st_mtime_ns >= ns:
                    found.append(p.name)
            except FileNotFoundError:  # committed (renamed) meanwhile
                pass
        return found

    # Kill until 5 of each kind have landed (bounded), whatever the machine's speed: a "step" kill
    # waits for the attempt's first new step, so every attempt makes progress.
    for attempt in range(40):
        if min(kills.values()) >= 5:
            break
        log_path = tmp_path / f"attempt{attempt}.log"
        before = logged()
        started_ns = time.time_ns()
        proc, log = _start(args + [f"log.dir={run}"], log_path)
        reap(proc)
        started = _wait_for(lambda: "TokenFormer:" in log_path.read_text(), proc, timeout=600.0)
        assert started or proc.returncode == 0, log_path.read_text()[-3000:]
        if kills["write"] < kills["step"]:  # during a checkpoint write: as soon as this attempt stages one
            hit = _wait_for(lambda: partials_since(started_ns), proc)
        else:  # at a random moment of the training steps
            _wait_for(lambda: logged() > before, proc)
            time.sleep(rng.uniform(0.0, 0.2))
            hit = proc.poll() is None
        if hit:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
        # A kill was during a write only if the write this attempt staged is still unfinished once the
        # process is dead (one that was renamed into place just before the kill landed is not).
        kills["write" if partials_since(started_ns) else "step"] += 1
    if proc.returncode != 0:
        launch(args + [f"log.dir={run}"], launcher="python")  # let the last attempt finish
    assert kills["write"] >= 5 and kills["step"] >= 5, kills  # 10 kills at least
    got = losses(run)
    assert sorted(got) == list(range(1, 41))
    assert got == want  # bit-exact: weights, optimizer, data position and dropout RNG all restored


def test_non_finite_steps_are_skipped_then_stop_the_run(corpus, tmp_path):
    """An absurd learning rate blows the weights up after step 1: steps 2.. have non-finite gradients,
    DeepSpeed skips their updates, the loop counts them and stops after train.max_skipped_steps with
    the checkpoint from before the trouble."""
    from helpers import metrics
    from megatron_tokenformer.checkpoint import newest_good

    run = tmp_path / "run"
    proc = launch(RUN + [f"data.path={corpus}", f"log.dir={run}", "train.lr=1e30", "train.min_lr=0",
                         "train.warmup_steps=0", "train.max_skipped_steps=3", "model.dropout=0"],
                  launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "3 consecutive steps (up to step 4) had a non-finite loss" in proc.stderr
    assert "step_00000001" in proc.stderr and "Traceback" not in proc.stderr
    assert "update skipped (1 in a row)" in proc.stdout + proc.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["skipped_steps"] == 3
    assert newest_good(run / "checkpoints") == "step_00000001"  # nothing saved from inside the trouble
