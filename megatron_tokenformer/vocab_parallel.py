"""Vocab-parallel embedding and cross-entropy: rank r of the tensor group holds vocab rows r.

The input embedding and the (tied) output head share one weight of (vocab/p, d) per rank. The
loss never materialises full-vocab logits on one rank: max, sum of exp and the target logit are
reduced over the group (Megatron's vocab-parallel cross-entropy).

With sequence parallelism the embedding hands on this rank's sequence shard (a reduce-scatter
where the all-reduce was), and the head gathers the sequence but keeps its input sharded for
backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import mappings as M
from .seeding import seeded


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """The vocab rows [start, end) that tensor rank `rank` of `size` holds."""
    local = vocab_size // size
    return rank * local, (rank + 1) * local


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, std: float, tp_group=None, seed: int | None = None,
                 sequence_parallel: bool = False):
        super().__init__()
        tp = M.group_size(tp_group)
        if vocab_size % tp:
            raise ValueError(f"vocab size {vocab_size} does not split over {tp} tensor-parallel ranks")
        self.tp_group, self.vocab_size = tp_group, vocab_size
        self.sequence_parallel = sequence_parallel and tp > 1
        self.start, self.end = vocab_range(vocab_size, M.group_rank(tp_group), tp)
        with seeded(seed):
            full = torch.empty(vocab_size, hidden_size).normal_(std=std)  # master tensor, sliced
        self.weight = nn.Parameter(full[self.start:self.end].clone())
        self.weight.partition_dim, self.weight.global_shape = 0, (vocab_size, hidden_size)
        self.weight.model_parallel = tp > 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if M.group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = torch.where(outside, 0, ids - self.start)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return M.scatter_seq(x, self.tp_group) if self.sequence_parallel else M.reduce_from(x, self.tp_group)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output head: this rank's slice of the vocab logits (of the whole sequence)."""
        if self.sequence_parallel:
            return _SeqGatheredHead.apply(h, self.weight, self.tp_group)
        return M.copy_to(h, self.tp_group) @ self.weight.t()


class _SeqGatheredHead(torch.autograd.Function):
    """gather_seq(h) @ W.T that keeps h sharded for backward and gathers it again there."""

    @staticmethod
    def forward(ctx, h, weight, group):
        ctx.group = group
        ctx.save_for_backward(h, weight)
        return M.gather(h, group, -2, "fwd", "head_input") @ weight.t()

    @staticmethod
    def backward(ctx, g):
        h, weight = ctx.saved_tensors
        full = M.gather(h, ctx.group, -2, "bwd", "head_input")
        d_h = M.reduce_scatter_into(g @ weight, ctx.group, -2, "bwd", "head_input")
        d_w = g.reshape(-1, g.shape[-1]).t() @ full.reshape(-1, full.shape[-1])
        return d_h, d_w, None


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, group):
        logits = logits.float()
        m = M.max_stat(logits.amax(-1), group)
        shifted = logits - m.unsqueeze(-1)
        inside = (target >= start) & (target < start + logits.shape[-1])
        local = torch.where(inside, target - start, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        exp = shifted.exp()
        sumexp = exp.sum(-1)
        both = torch.stack((picked, sumexp))  # one all-reduce for the two statistics
        picked, sumexp = M.all_reduce_sum(both, group, "fwd", "cross_entropy")
        ctx.save_for_backward(exp.div_(sumexp.unsqueeze(-1)), local, inside)
        return sumexp.log() - picked

    @staticmethod
    def backward(ctx, g):
        softmax, local, inside = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= inside.to(grad.dtype)
        return grad * g.unsqueeze(-1), None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None, vocab_start: int = 0) -> torch.Tensor:
    """Mean token loss of vocab-sharded logits (N, V/p), this rank's shard starting at
    `vocab_start`, against global targets (N,)."""
    if M.group_size(tp_group) == 1:
        return F.cross_entropy(logits.float(), target)
    return _VocabParallelCE.apply(logits, target, vocab_start, tp_group).mean()
