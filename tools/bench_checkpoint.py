"""Time checkpoint save and load of one DeepSpeed engine: this package's format and DeepSpeed's own
`engine.save_checkpoint` / `load_checkpoint`, on the same engine, at the launch's data-parallel size.

    torchrun --nproc_per_node 2 tools/bench_checkpoint.py --config configs/150M.yml --dir /tmp/bench \\
        data.path=data/shakespeare train.precision=fp32 model.seq_length=128 train.micro_batch_size=1 \\
        train.global_batch_size=2

It builds the engine (ZeRO stage, precision and shape from the config), takes one training step on
random tokens (so the Adam moments exist), then for --reps rounds saves and loads each way and
prints one JSON line: per operation the median wall time over rounds (seconds, the slowest rank,
barriers included) and the peak growth of resident memory during it (MB, the largest over ranks,
sampled every 5 ms: a lower bound). To time another version of the package (e.g. the code before a
change), put its checkout first on PYTHONPATH: the script uses only `checkpoint.save_load.save`
and `load`, whose signatures have not changed (and `AsyncSave` with --async-save).

With --async-save it also times a background save (checkpoint.async_save): `async_blocked`, how
long the training loop waits for it (the copy to host memory), `async_total` until it is committed
when waited for at once, and --steps training steps run quietly (`steps_quiet`) and right after a
background save starts (`steps_during_write`, the write competing with them; then the rest of the
write is waited for, `async_wait_after_steps`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


class PeakRSS:
    """Resident memory of this process, sampled in a thread while the block runs: peak minus start."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.grew_mb = (max(self.peak, self._rss()) - self.start) / 2**20

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)


def timed(fn) -> tuple[float, float]:
    """(seconds on the slowest rank, MB of resident growth on the largest rank) of fn() on every rank."""
    dist.barrier()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        seconds = time.perf_counter() - t0
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (seconds, mem.grew_mb))
    return max(s for s, _ in out), max(m for _, m in out)


def max_over_ranks(seconds: float) -> float:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, seconds)
    return max(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dir", required=True, help="scratch directory for the checkpoints (emptied)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=True,
                    help="also time DeepSpeed's own save_checkpoint / load_checkpoint")
    ap.add_argument("--async-save", action=argparse.BooleanOptionalAction, default=False,
                    help="also time a background save (what blocks the loop, and steps during the write)")
    ap.add_argument("--steps", type=int, default=3, help="training steps timed with --async-save")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from megatron_tokenformer import distributed as D
    from megatron_tokenformer.checkpoint import read_meta, save_load
    from megatron_tokenformer.config import load_config
    from megatron_tokenformer.config.validation import padded_vocab_size
    from megatron_tokenformer.engine import build_engine

    rank, world = D.init_distributed()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    scratch = Path(args.dir)
    cfg = load_config(args.config, [*args.overrides, f"log.dir={scratch / 'run'}", "checkpoint.keep_last=1"])
    data = json.loads((Path(cfg.data.path) / "metadata.json").read_text())
    vocab = padded_vocab_size(cfg, data["vocab_size"])
    grid = D.Grid(rank, world, cfg.parallel.tensor, cfg.parallel.pipeline)
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier()
    engine = build_engine(cfg, vocab, D.ParallelState.build(grid), (0, 10))[0]
    n_params = sum(p.numel() for p in engine.module.parameters())

    gen = torch.Generator().manual_seed(rank)

    def train_step():
        for _ in range(cfg.train.global_batch_size // (cfg.train.micro_batch_size * grid.data)):
            shape = (cfg.train.micro_batch_size, cfg.model.seq_length + 1)
            ids = torch.randint(0, data["vocab_size"], shape, generator=gen)
            engine.backward(engine(ids[:, :-1], ids[:, 1:]))
            engine.step()

    train_step()
    results: dict[str, list] = {}
    ds_dir = str(scratch / "deepspeed")
    for rep in range(args.reps):
        step = rep + 1
        results.setdefault("save", []).append(timed(
            lambda: save_load.save(engine, cfg, grid, step, 0, {}, vocab, data["tokenizer_sha256"])))
        results.setdefault("load", []).append(timed(
            lambda: save_load.load(engine, cfg, grid, cfg.checkpoint_dir, f"step_{step:08d}",
                                   read_meta(cfg.checkpoint_dir, f"step_{step:08d}"))))
    size = sum(f.stat().st_size for f in (cfg.checkpoint_dir / f"step_{args.reps:08d}").iterdir())

    def start_async(step):
        return save_load.AsyncSave(engine, cfg, grid, step, 0, {}, vocab, data["tokenizer_sha256"])

    for rep in range(args.reps if args.async_save else 0):
        pending = []
        t0 = time.perf_counter()
        results.setdefault("async_blocked", []).append(timed(lambda: pending.append(start_async(100 + rep))))
        _, mem = timed(pending[0].wait)
        results.setdefault("async_total", []).append((max_over_ranks(time.perf_counter() - t0), mem))
        results.setdefault("steps_quiet", []).append(timed(lambda: [train_step() for _ in range(args.steps)]))
        pending = [start_async(200 + rep)]
        results.setdefault("steps_during_write", []).append(timed(lambda: [train_step() for _ in range(args.steps)]))
        results.setdefault("async_wait_after_steps", []).append(timed(pending[0].wait))
    # DeepSpeed's last: its load_checkpoint re-links the ZeRO fragments without their Adam state
    # (DeepSpeed 0.19.8), which per-parameter reads (ours and safe_get_full_optimizer_state) need.
    for rep in range(args.reps if args.deepspeed else 0):
        results.setdefault("deepspeed_save", []).append(timed(lambda: engine.save_checkpoint(ds_dir, tag=f"r{rep}")))
        results.setdefault("deepspeed_load", []).append(timed(lambda: engine.load_checkpoint(ds_dir, tag=f"r{rep}")))
        if rank == 0:
            shutil.rmtree(Path(ds_dir) / f"r{rep}", ignore_errors=True)  # keep the disk small
    if rank == 0:
        print(json.dumps({
            "params": n_params, "data_parallel": grid.data, "zero_stage": cfg.parallel.zero_stage,
            "precision": cfg.train.precision, "reps": args.reps, "checkpoint_bytes": size,
            **{name: {"seconds": round(statistics.median(s for s, _ in r), 2),
                      "rss_growth_mb": round(max(m for _, m in r))} for name, r in results.items()}}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
