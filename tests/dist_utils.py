"""Run a test body on N real gloo processes (torch.multiprocessing), failing if any rank fails."""
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_tokenformer.distributed import free_port


def _worker(rank, world, port, fn, args, errors):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed's engine asks for it (CPU: one device for all ranks)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()
    # Done: leave without the interpreter's teardown, where a C++ thread left by DeepSpeed's engine
    # (on gloo) can abort a finished process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(world: int, fn, *args) -> None:
    """fn(rank, world, *args) on `world` processes; fn must be a module-level function."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, free_port(), fn, args, errors), nprocs=world, start_method="spawn")
    except Exception:
        msgs = []
        while not errors.empty():
            r, tb = errors.get()
            msgs.append(f"--- rank {r} ---\n{tb}")
        raise AssertionError("\n".join(msgs) or "a rank failed") from None
