"""Every collective the model uses, as conjugate autograd pairs (Megatron's mappings.py pattern).

Each takes its process group explicitly and is the identity on a group of one (or None), so
the model reads as single-device code. Pairs (forward / backward):

    copy_to        identity        / all-reduce      input of a token-sharded layer
    reduce_from    all-reduce      / identity        partial outputs of token shards -> full
    reduce_scatter reduce-scatter  / all-gather      partial outputs -> a feature shard (heads)
    all_gather     all-gather      / reduce-scatter  a feature shard -> full input of a token-sharded layer
    sum_stat       all-reduce      / all-reduce      row statistics every rank uses (DESIGN.md section 3)
    max_stat       all-reduce max  (no gradient: used only to stabilise softmax)

Sequence parallelism (parallel.sequence_parallel) adds the pair along the sequence (dim -2 of
(..., T, d) activations), Megatron's conjugates of copy_to / reduce_from:

    gather_seq     all-gather      / reduce-scatter  a sequence shard -> the whole sequence
    scatter_seq    reduce-scatter  / all-gather      partial outputs of token shards -> a sequence shard

`gather` and `reduce_scatter_into` are the same collectives without autograd, for hand-written
backward passes that keep their input sharded and gather it again in backward.

`count_comm()` records the bytes each rank sends, with the usual ring-algorithm factors
(all-reduce 2(p-1)/p, all-gather and reduce-scatter (p-1)/p of the full tensor).
Code elsewhere never calls torch.distributed's collectives on the tensor group directly: it uses
these (and `group_size`, `group_rank`, `all_reduce_sum`), so every byte is counted here.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist

# The active byte counter, process-wide like torch's autocast state: the collectives run deep
# inside autograd functions that cannot take an extra argument. It is None (counting nothing)
# except inside `count_comm()`, which restores the previous one on exit.
_counter: dict | None = None


@contextlib.contextmanager
def count_comm():
    """Collect {(op, 'fwd'|'bwd'): bytes sent per rank} for the collectives run inside."""
    global _counter
    prev, _counter = _counter, defaultdict(float)
    try:
        yield _counter
    finally:
        _counter = prev


def group_size(group) -> int:
    """Ranks in a process group (None: a group of one)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank within a group (0 in a group of one)."""
    return 0 if group_size(group) == 1 else dist.get_rank(group)


def _record(op: str, phase: str, full: torch.Tensor, group, factor: float) -> None:
    if _counter is not None:
        p = group_size(group)
        _counter[(op, phase)] += full.numel() * full.element_size() * factor * (p - 1) / p


# torch 2.10+ names them *_single and deprecates the older names, which torch 2.4-2.9 need.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group, phase: str, op: str) -> torch.Tensor:
    _record(op, phase, x, group, 2.0)
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _gather_dim(x: torch.Tensor, group, phase: str, op: str, dim: int = -1) -> torch.Tensor:
    p = group_size(group)
    src = x.movedim(dim, 0).contiguous()
    out = torch.empty((p * src.shape[0], *src.shape[1:]), dtype=x.dtype, device=x.device)
    _record(op, phase, out, group, 1.0)
    _all_gather_into(out, src, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: torch.Tensor, group, phase: str, op: str, dim: int = -1) -> torch.Tensor:
    p = group_size(group)
    if x.shape[dim] % p:
        raise ValueError(f"cannot split a dimension of {x.shape[dim]} over {p} tensor-parallel ranks "
                         "(sequence parallelism needs model.seq_length divisible by parallel.tensor)")
    src = x.movedim(dim, 0).contiguous()
    out = torch.empty((src.shape[0] // p, *src.shape[1:]), dtype=x.dtype, device=x.device)
    _record(op, phase, src, group, 1.0)
    _reduce_scatter_into(out, src, group=group)
    # contiguous: attention's fast kernels need unit stride in the last dim (else a math fallback
    # keeps the T x T probabilities), and a pipeline stage sends the residual shard as it is
    return out.movedim(0, dim).contiguous()


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group, "bwd", "copy_to"), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group, "fwd", "reduce_from")

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Scatter(torch.autograd.Function):
    """Reduce-scatter along `dim` / all-gather back: reduce_scatter (features) and scatter_seq (sequence)."""
    @staticmethod
    def forward(ctx, x, group, op, dim):
        ctx.group, ctx.op, ctx.dim = group, op, dim
        return _reduce_scatter_dim(x, group, "fwd", op, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim(g, ctx.group, "bwd", ctx.op, ctx.dim), None, None, None


class _Gather(torch.autograd.Function):
    """All-gather along `dim` / reduce-scatter back: all_gather (features) and gather_seq (sequence)."""
    @staticmethod
    def forward(ctx, x, group, op, dim):
        ctx.group, ctx.op, ctx.dim = group, op, dim
        return _gather_dim(x, group, "fwd", op, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim(g, ctx.group, "bwd", ctx.op, ctx.dim), None, None, None


class _SumStat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x.clone(), group, "fwd", "sum_stat")

    @staticmethod
    def backward(ctx, g):
        # Every rank uses the global statistic, so its gradient is the sum of all ranks' gradients.
        return _all_reduce(g.clone(), ctx.group, "bwd", "sum_stat"), None


def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyTo.apply(x, group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFrom.apply(x, group)


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _Scatter.apply(x, group, "reduce_scatter", -1)


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _Gather.apply(x, group, "all_gather", -1)


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's sequence shard (..., T/p, d) -> the whole sequence (..., T, d), ranks in order."""
    return x if group_size(group) == 1 else _Gather.apply(x, group, "gather_seq", -2)


def scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums (..., T, d) of every rank -> this rank's shard (..., T/p, d) of their sum."""
    return x if group_size(group) == 1 else _Scatter.apply(x, group, "scatter_seq", -2)


def seq_shard(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice along the sequence of a tensor every rank holds whole (no communication)."""
    p = group_size(group)
    return x if p == 1 else x.chunk(p, dim=-2)[group_rank(group)]


def sum_stat(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _SumStat.apply(x, group)


def max_stat(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.detach().clone()
    _record("max_stat", "fwd", x, group, 2.0)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_sum(x: torch.Tensor, group, phase: str, op: str) -> torch.Tensor:
    """A plain (no autograd) sum over the group, counted; for hand-written backward passes."""
    return x if group_size(group) == 1 else _all_reduce(x, group, phase, op)


def gather(x: torch.Tensor, group, dim: int, phase: str, op: str) -> torch.Tensor:
    """A plain (no autograd) all-gather along `dim`, counted; for hand-written backward passes."""
    return x if group_size(group) == 1 else _gather_dim(x, group, phase, op, dim)


def reduce_scatter_into(x: torch.Tensor, group, dim: int, phase: str, op: str) -> torch.Tensor:
    """A plain (no autograd) reduce-scatter along `dim`, counted; for hand-written backward passes."""
    return x if group_size(group) == 1 else _reduce_scatter_dim(x, group, phase, op, dim)


def gather_param(p: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The full tensor of a sharded parameter (or gradient) on every rank of the group (tests
    compare sharded models with unsharded ones through it)."""
    if group_size(group) == 1:
        return p.detach()
    parts = [torch.empty_like(p) for _ in range(group_size(group))]
    dist.all_gather(parts, p.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)
