"""Background checkpoint saves (checkpoint.async_save) on 2 data-parallel ranks: what they write is
identical to a direct save of the same run; SIGKILLed while a background write is in flight (made
slow by a test hook: the writer sleeps before each file), the run keeps its previous checkpoint
whole and resumes to the losses of a run never killed, bit for bit."""
import json
import signal
import subprocess
import sys
import time

import psutil
import torch
from safetensors import safe_open

from helpers import ROOT, SMALL, env, launch, losses, metrics
from megatron_tokenformer.checkpoint import newest_good, verify
from megatron_tokenformer.distributed import free_port

RUN = SMALL + ["train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=0", "model.dropout=0.1"]


def _same_checkpoint(a, b):
    """The same files holding the same tensors and metadata, and the same meta.json but for the key
    that differs and the run's identity."""
    files = sorted(f.name for f in a.iterdir())
    assert files == sorted(f.name for f in b.iterdir()), (a, b)
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(a / name), framework="pt") as x, safe_open(str(b / name), framework="pt") as y:
                assert x.metadata() == y.metadata() and sorted(x.keys()) == sorted(y.keys()), name
                for k in x.keys():
                    assert torch.equal(x.get_tensor(k), y.get_tensor(k)), (name, k)
    ma, mb = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("run_info")
        m["config"].pop("checkpoint")
        m["config"].pop("log")
    assert ma == mb


def test_killed_during_a_background_write_keeps_the_previous_checkpoint(corpus, tmp_path):
    args = RUN + [f"data.path={corpus}"]
    straight = tmp_path / "straight"
    launch(args + [f"log.dir={straight}"], nproc=2)  # direct saves

    run = tmp_path / "async"
    ckpt = run / "checkpoints"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yml"), *args,
           f"log.dir={run}", "checkpoint.async_save=true"]
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), "MEGATRON_TOKENFORMER_TEST_WRITE_DELAY": "1.0"},
                                stdout=log, stderr=subprocess.STDOUT)

        # Kill while step 4's files are being written (1 s per file) and training has gone on to step 5.
        def in_flight():
            steps = [r["step"] for r in metrics(run)] if (run / "metrics.jsonl").is_file() else []
            return (ckpt / "step_00000004.partial").is_dir() and max(steps, default=0) >= 5

        end = time.time() + 300
        while not in_flight() and proc.poll() is None and time.time() < end:
            time.sleep(0.005)
        assert in_flight(), log_path.read_text()[-3000:]
        ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts them in sessions of their own
        for p in [*ranks, psutil.Process(proc.pid)]:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(ranks, timeout=60)
        proc.wait()
    assert "step 4: saving" in log_path.read_text()
    assert newest_good(ckpt) == "step_00000002" and verify(ckpt / "step_00000002") is None
    assert not (ckpt / "step_00000004").exists()
    _same_checkpoint(ckpt / "step_00000002", straight / "checkpoints" / "step_00000002")

    out = launch(args + [f"log.dir={run}", "checkpoint.async_save=true"], nproc=2)
    assert "step_00000002 at step 2" in out.stdout, out.stdout[-3000:]
    assert losses(run) == losses(straight)  # bit for bit, dropout included
    _same_checkpoint(ckpt / "step_00000004", straight / "checkpoints" / "step_00000004")
