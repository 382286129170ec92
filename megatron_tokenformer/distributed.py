"""Process start-up and the rank grid; the few collectives the training loop itself runs (loss
means, broadcasts of host objects, barriers). The model's collectives live in mappings.py.

Ranks are laid out tensor-fastest, then pipeline, then data (Megatron's order), so a tensor
group sits on one node. Groups are created once here and passed explicitly (no hidden globals).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Grid:
    rank: int
    world_size: int
    tensor: int
    pipeline: int

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tensor) % self.pipeline

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tensor * self.pipeline)

    @property
    def is_logger(self) -> bool:
        """The rank that logs: first data/tensor rank of the last pipeline stage (it has the loss)."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.pp_rank == self.pipeline - 1


@dataclass
class ParallelState:
    """The rank grid and its process groups (groups of one included: every axis has a real group)."""

    grid: Grid
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    mp_group: object = None  # tensor x pipeline: the ranks that together hold one model replica

    @classmethod
    def build(cls, grid: Grid) -> "ParallelState":
        t, p, d = grid.tensor, grid.pipeline, grid.data

        def rank(dp: int, pp: int, tp: int) -> int:
            return dp * t * p + pp * t + tp

        def mine(groups: list[list[int]]):
            """Create every group (all ranks must, in the same order); return this rank's."""
            found = None
            for ranks in groups:
                g = dist.new_group(ranks)
                if grid.rank in ranks:
                    found = g
            return found

        return cls(
            grid,
            tp_group=mine([[rank(a, b, c) for c in range(t)] for a in range(d) for b in range(p)]),
            pp_group=mine([[rank(a, b, c) for b in range(p)] for a in range(d) for c in range(t)]),
            dp_group=mine([[rank(a, b, c) for a in range(d)] for b in range(p) for c in range(t)]),
            mp_group=mine([[rank(a, b, c) for b in range(p) for c in range(t)] for a in range(d)]),
        )

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The `mpu` DeepSpeed asks for: ZeRO partitions over the data-parallel group only, and
    gradient clipping counts tensor-sharded parameters (tagged `model_parallel`) on every
    tensor rank and replicated ones once."""

    def __init__(self, state: ParallelState):
        self.s = state

    def get_model_parallel_rank(self) -> int:
        return self.s.grid.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.s.grid.tensor

    def get_model_parallel_group(self):
        return self.s.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.s.grid.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.s.grid.data

    def get_data_parallel_group(self):
        return self.s.dp_group


def free_port() -> int:
    """A TCP port free on this machine now, for a rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the process group set up by deepspeed/torchrun, or make a group of one for plain `python`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    from .deepspeed_adapter import quiet_start

    quiet_start()  # before DeepSpeed's backend starts (here, or in deepspeed.initialize)
    if not dist.is_initialized():
        import deepspeed

        # DeepSpeed picks nccl on GPUs and gloo on the CPU accelerator.
        deepspeed.init_distributed(verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce_mean(values: list[float], dev: torch.device, group=None) -> list[float]:
    """Mean of per-rank scalars over a group (in fp64 so that logging never rounds them)."""
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t.tolist()


def all_reduce_max(value: int, dev: torch.device) -> int:
    """The largest of every rank's integer (over the whole world)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_dicts(entries: dict) -> dict:
    """Every rank's dict merged on rank 0 (empty elsewhere); a collective, so a barrier too."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return entries
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(entries, out, dst=0)
    return {k: v for d in out for k, v in d.items()} if out else {}


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank of `group`'s object, in rank order, on every rank of it."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_tensor(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """`t` from global rank `src` of `group`, in place, on every rank of it."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.broadcast(t, src=src, group=group)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together at the end of a run: every rank has finished before any
    tears it down (the launch script then exits without the interpreter's teardown)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
