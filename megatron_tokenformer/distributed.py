"""Process start-up and the rank grid. Collectives used by the training loop live here too.

Ranks are laid out tensor-fastest, then pipeline, then data (Megatron's order), so a tensor
group sits on one node. Only the data-parallel axis is built so far; the grid already
carries the other two so config, checkpoints and logging do not change when they arrive.
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the process group set up by deepspeed/torchrun, or make a group of one for plain `python`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
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


def all_reduce_mean(values: list[float], dev: torch.device) -> list[float]:
    """Mean of per-rank scalars over all ranks (in fp64 so that logging never rounds them)."""
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
