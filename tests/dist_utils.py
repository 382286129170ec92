"""Run a test body on N real gloo processes (torch.multiprocessing), failing if any rank fails."""
import os
import sys
import time
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


def run_on_ranks(world: int, fn, *args, timeout: float = 300.0) -> None:
    """fn(rank, world, *args) on `world` processes; fn must be a module-level function. A rank still
    running after `timeout` seconds (a deadlock: a collective the others never join) fails the test,
    named, and every rank is killed."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(world, free_port(), fn, args, errors), nprocs=world,
                               start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                hung = [r for r, p in enumerate(procs.processes) if p.is_alive()]
                raise AssertionError(f"rank{'s' * (len(hung) > 1)} {', '.join(map(str, hung))} of {world} still "
                                     f"running after {timeout:g} s: hung, killed")
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        msgs = []
        while not errors.empty():
            r, tb = errors.get()
            msgs.append(f"--- rank {r} ---\n{tb}")
        raise AssertionError("\n".join(msgs) or "a rank failed") from None
    finally:  # a timeout, a failure, pytest-timeout's interrupt: no rank outlives the test
        for p in procs.processes:
            if p.is_alive():
                p.kill()
                p.join(30)
