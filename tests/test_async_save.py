"""Background checkpoint saves (checkpoint.async_save) on 2 data-parallel ranks: the loop waits only for
the copy to host memory, and what they write is identical to a direct save of the same state;
SIGKILLed while a background write is in flight (made slow by a test hook, tests/hooked_pretrain.py:
the writer sleeps before each file), the run keeps its previous checkpoint whole and resumes to the
losses of a run never killed, bit for bit."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

import psutil
import torch
from safetensors import safe_open

from dist_utils import run_on_ranks
from helpers import ROOT, SMALL, env, launch, losses, metrics
from hooked_pretrain import HOOKS_ENV
from megatron_tokenformer.checkpoint import newest_good, verify
from megatron_tokenformer.distributed import free_port

pytestmark = pytest.mark.slow  # every test here starts training processes or several ranks

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


def _save_blocks_only_for_the_copy(rank, world, root):
    import deepspeed

    from megatron_tokenformer.checkpoint import save_load
    from megatron_tokenformer.config import load_config
    from megatron_tokenformer.distributed import Grid, ParallelState
    from megatron_tokenformer.engine import build_engine

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # adopts the test's process group
    cfg = load_config("configs/tiny.yml", SMALL + [f"log.dir={root}", "parallel.zero_stage=1"])
    grid = Grid(rank, world, 1, 1)
    engine = build_engine(cfg, 512, ParallelState.build(grid), (0, 10))[0]
    gen = torch.Generator().manual_seed(rank)

    def train_step():
        for i in range(cfg.grad_accum_steps(world)):
            ids = torch.randint(0, 512, (cfg.train.micro_batch_size, cfg.model.seq_length + 1), generator=gen)
            engine.backward(engine(ids[:, :-1], ids[:, 1:]))
            engine.step()

    train_step()
    args = (grid, 1, 8, {}, 512, "sha")
    direct = load_config("configs/tiny.yml", SMALL + [f"log.dir={root / 'direct'}", "parallel.zero_stage=1"])
    save_load.save(engine, direct, *args)

    # Every file write of the background save is held until released: the save must return anyway,
    # with nothing written, after copying this rank's part to host memory.
    release, writing = threading.Event(), threading.Event()
    write_piece = save_load.write_piece

    def held(*a, **kw):
        writing.set()
        assert release.wait(120), "never released"
        return write_piece(*a, **kw)

    save_load.write_piece = held
    pending = save_load.AsyncSave(engine, cfg, *args)
    assert writing.wait(120)  # the background thread is at its first file, held
    assert not any(pending.tmp.glob("*.safetensors")) and not pending.path.exists()
    train_step()  # the loop goes on (its collectives beside the writer) and changes the weights
    release.set()
    assert pending.wait() == cfg.checkpoint_dir / "step_00000001"
    if rank == 0:  # what was copied before the step, not the weights after it
        _same_checkpoint(cfg.checkpoint_dir / "step_00000001", direct.checkpoint_dir / "step_00000001")


def test_a_background_save_blocks_only_for_the_copy_to_host_memory(tmp_path):
    """The README's promise for checkpoint.async_save, as structure rather than speed: with every file
    write held, the save returns; training steps on; released, the checkpoint is the state at the save,
    identical to a direct save of it."""
    run_on_ranks(2, _save_blocks_only_for_the_copy, tmp_path)


def test_killed_during_a_background_write_keeps_the_previous_checkpoint(corpus, tmp_path, reap):
    args = RUN + [f"data.path={corpus}"]
    straight = tmp_path / "straight"
    launch(args + [f"log.dir={straight}"], nproc=2)  # direct saves

    run = tmp_path / "async"
    ckpt = run / "checkpoints"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "hooked_pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yml"), *args,
           f"log.dir={run}", "checkpoint.async_save=true"]
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), HOOKS_ENV: json.dumps({"write_delay": 1.0})},
                                stdout=log, stderr=subprocess.STDOUT)
        reap(proc)

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
