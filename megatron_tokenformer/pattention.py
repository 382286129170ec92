"""Pattention: input tokens attend to learnable key/value parameter tokens (DESIGN.md section 1).

    S = X @ K.T          (T, n) scores, no 1/sqrt(d)
    A = theta(S)         normalised over the n parameter tokens of each row
    O = A @ V            (T, d_out)

`tau` is a per-layer constant stored with the model (not recomputed from n), so that appending
tokens with zero keys leaves the function unchanged (DESIGN.md section 2).

Tensor parallelism shards the parameter tokens (DESIGN.md section 3): rank r holds rows r of K
and V, computes its local scores, normalises them with row statistics summed over the group
(the global n is kept in tau), and its partial output A_r @ V_r is summed over the group.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import mappings as M

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
IMPLS = ("fused", "compiled", "reference")
EPS = 1e-6  # inside the row norm: an all-zero score row gives 0, not NaN


def resolve_impl(impl: str) -> str:
    """`auto`: the fastest implementation measured for the device (docs/PERFORMANCE.md): the
    compiled kernels on CUDA, `fused` elsewhere (on CPU torch.compile's start-up outweighs its gain)."""
    if impl == "auto":
        return "compiled" if torch.cuda.is_available() else "fused"
    return impl


def default_tau(norm: str, num_tokens: int) -> float:
    """The reference scale: sqrt(n) for the L2 variants, n for softmax (which sums to 1)."""
    return float(num_tokens) if norm == "softmax" else math.sqrt(num_tokens)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: statistics are never taken in bf16/fp16."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def theta(scores: torch.Tensor, norm: str, tau: float, eps: float = EPS, group=None) -> torch.Tensor:
    """Normalise scores over the last dim, whose tokens may be sharded over `group`.

    Statistics are taken in fp32 whatever the input dtype."""
    s = _wide(scores)
    if norm == "l2_norm_gelu":
        a = F.gelu(s * (tau * torch.rsqrt(M.sum_stat(s.square().sum(-1, keepdim=True), group) + eps)))
    elif norm == "gelu_l2_norm":
        g = F.gelu(s)
        a = g * (tau * torch.rsqrt(M.sum_stat(g.square().sum(-1, keepdim=True), group) + eps))
    elif norm == "softmax":
        if M.group_size(group) == 1:
            a = tau * torch.softmax(s, dim=-1)  # subtracts the row max (the reference does not: fp16 overflow)
        else:
            e = torch.exp(s - M.max_stat(s.amax(-1, keepdim=True), group))
            a = e * (tau / M.sum_stat(e.sum(-1, keepdim=True), group))
    else:
        raise ValueError(f"unknown Pattention norm {norm!r}; choose one of {', '.join(NORMS)}")
    return a.to(scores.dtype)


SQRT_HALF, INV_SQRT_2PI = math.sqrt(0.5), 1.0 / math.sqrt(2 * math.pi)


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the exact (erf) gelu: Phi(z) + z * phi(z)."""
    return 0.5 * (1.0 + torch.erf(z * SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * INV_SQRT_2PI


def _theta_fwd(s_c, norm: str, tau: float, eps: float, group):
    """theta of compute-dtype scores: (A in the compute dtype, fp32 row statistics to keep)."""
    s = _wide(s_c)
    if norm == "l2_norm_gelu":
        r = torch.rsqrt(M.all_reduce_sum(s.square().sum(-1, keepdim=True), group, "fwd", "sum_stat") + eps)
        return F.gelu(s * (tau * r)).to(s_c.dtype), (r,)
    if norm == "gelu_l2_norm":
        gl = F.gelu(s)
        r = torch.rsqrt(M.all_reduce_sum(gl.square().sum(-1, keepdim=True), group, "fwd", "sum_stat") + eps)
        return (gl * (tau * r)).to(s_c.dtype), (r,)
    m = M.max_stat(s.amax(-1, keepdim=True), group)
    e = torch.exp(s - m)
    z = M.all_reduce_sum(e.sum(-1, keepdim=True), group, "fwd", "sum_stat")
    return (e * (tau / z)).to(s_c.dtype), (m, z)


def _theta_bwd(s_c, stats, d_a_c, norm: str, tau: float, group):
    """Recompute A from the kept scores and statistics; the score gradient from A's gradient."""
    s, d_a = _wide(s_c), _wide(d_a_c)

    def row_sum(t):  # a statistic every rank used, so its gradient sums over the group
        return M.all_reduce_sum(t.sum(-1, keepdim=True), group, "bwd", "sum_stat")

    if norm == "l2_norm_gelu":
        (r,) = stats
        z = s * (tau * r)
        a = F.gelu(z)
        d_z = d_a * _gelu_grad(z)
        d_s = (tau * r) * (d_z - (r * r) * s * row_sum(d_z * s))
    elif norm == "gelu_l2_norm":
        (r,) = stats
        gl = F.gelu(s)
        a = gl * (tau * r)
        d_s = (tau * r) * (d_a - (r * r) * gl * row_sum(d_a * gl)) * _gelu_grad(s)
    else:
        m, zsum = stats
        p = torch.exp(s - m) / zsum
        a = tau * p
        d_s = a * (d_a - row_sum(d_a * p))
    return a.to(s_c.dtype), d_s.to(s_c.dtype)


@functools.cache
def _compiled_kernels():
    """torch.compile'd theta passes, built once per process (torch.compile's caches are
    process-wide anyway). Each Pattention's (norm, tau, shape, dtype) is one specialisation, and a
    model has a dozen or so (more after growth), above dynamo's default recompile limit of 8, so
    that process-wide limit is raised here, where the only code that needs it is compiled."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_theta_fwd), torch.compile(_theta_bwd)


def _kernels(compiled: bool, group):
    """The elementwise passes, eager or torch.compile'd into fused kernels (tensor group of one:
    collectives stay outside compiled code)."""
    if not compiled or M.group_size(group) > 1 or torch.compiler.is_compiling():
        return _theta_fwd, _theta_bwd  # (inside a compiled model, the outer compile fuses them)
    return _compiled_kernels()


class _FusedPattention(torch.autograd.Function):
    """S = x K^T, A = theta(S), O = A V with a hand-written backward.

    Autograd through `theta` keeps three (T, n) tensors per layer (S, the pre-activation and A);
    this keeps only S, in the compute dtype, plus one fp32 statistic per row, and recomputes the
    elementwise rest in backward. Row statistics are summed over the tensor group in both
    directions (the only collectives inside). With `compiled`, the elementwise passes run as
    torch.compile'd kernels: one or two passes over the scores each way.
    With `gather_dim` (sequence parallelism), x is this rank's shard along that dim: it is
    all-gathered here, kept sharded for backward and gathered again there (Megatron's trade of
    one more all-gather for 1/p of the memory), and its gradient is reduce-scattered back.
    Shapes: x (..., in), K (g, n, in), V (g, n, out) -> O (g, ..., out); theta over each group's n.
    """

    @staticmethod
    def forward(ctx, x, K, V, norm, tau, eps, group, compiled=False, gather_dim=None):
        g, n, d_in = K.shape
        x_kept = x
        if gather_dim is not None:
            x = M.gather(x, group, gather_dim, "fwd", "pattention_input")
        lead = x.shape[:-1]
        s = (x.reshape(-1, d_in) @ K.reshape(g * n, d_in).t()).view(-1, g, n)
        fwd, _ = _kernels(compiled, group)
        a, stats = fwd(s, norm, tau, eps, group)
        out = torch.bmm(a.to(V.dtype).transpose(0, 1), V)
        ctx.save_for_backward(x_kept, K, V, s, *stats)
        ctx.norm, ctx.tau, ctx.group, ctx.compiled, ctx.gather_dim = norm, tau, group, compiled, gather_dim
        return out.view(g, *lead, V.shape[-1])

    @staticmethod
    def backward(ctx, d_out):
        x, K, V, s, *stats = ctx.saved_tensors
        if ctx.gather_dim is not None:
            x = M.gather(x, ctx.group, ctx.gather_dim, "bwd", "pattention_input")
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        g, n, d_in = K.shape
        d_out = d_out.reshape(g, -1, d_out.shape[-1])
        d_a = torch.bmm(d_out, V.transpose(1, 2)).transpose(0, 1)                   # (N, g, n)
        _, bwd = _kernels(ctx.compiled, ctx.group)
        a, d_s = bwd(s, tuple(stats), d_a, ctx.norm, ctx.tau, ctx.group)
        d_v = torch.bmm(a.to(V.dtype).transpose(0, 1).transpose(1, 2), d_out)       # (g, n, out)
        d_s = d_s.to(x.dtype).reshape(-1, g * n)
        d_x = (d_s @ K.reshape(g * n, d_in)).view(*lead, d_in)
        if ctx.gather_dim is not None:  # this rank's token shard gave a partial input gradient
            d_x = M.reduce_scatter_into(d_x, ctx.group, ctx.gather_dim, "bwd", "pattention_input")
        d_k = (d_s.t() @ x).view(g, n, d_in)
        return d_x, d_k, d_v, None, None, None, None, None, None


class Pattention(nn.Module):
    """Token-parameter attention replacing a linear layer `in_features -> out_features`.

    groups > 1 fuses several Pattentions of the same input (Q, K and V): one score matmul for
    all groups, each group normalised over its own tokens, one batched value matmul. Then the
    parameters are (groups, n, in) / (groups, n, out) and the output is (groups, *x.shape[:-1], out).

    With a tensor-parallel `tp_group` of size p, this rank holds num_tokens/p tokens. `input`:
    "replicated" (every rank has x) or "sharded" (x split on its last dim, gathered first).
    `output`: "reduce" (full output on every rank) or "scatter" (this rank's slice of the last dim).
    `impl`: "fused" (hand-written backward keeping only the scores), "compiled" (the same with its
    elementwise passes compiled into fused kernels) or "reference" (autograd through the formulas).
    `sequence_parallel`: x and the output are this rank's shard of the sequence (dim -2) where
    they would be whole: replicated input is all-gathered, reduced output reduce-scattered.
    """

    def __init__(self, in_features: int, out_features: int, num_tokens: int, norm: str = "l2_norm_gelu",
                 tau: float | None = None, groups: int = 1, key_std: float = 0.02, value_std: float = 0.02,
                 tp_group=None, input: str = "replicated", output: str = "reduce", impl: str = "fused",
                 sequence_parallel: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown Pattention norm {norm!r}; choose one of {', '.join(NORMS)}")
        tp = M.group_size(tp_group)
        if num_tokens % tp:
            raise ValueError(f"{num_tokens} parameter tokens do not split over {tp} tensor-parallel ranks")
        self.in_features, self.out_features, self.num_tokens = in_features, out_features, num_tokens
        self.norm, self.groups = norm, groups
        impl = resolve_impl(impl)
        if impl not in IMPLS:
            raise ValueError(f"unknown Pattention impl {impl!r}; choose one of auto, {', '.join(IMPLS)}")
        self.tp_group, self.input, self.output, self.impl = tp_group, input, output, impl
        self.sequence_parallel = sequence_parallel and tp > 1
        self.tau = float(tau) if tau is not None else default_tau(norm, num_tokens)  # global n
        lead = (groups,) if groups > 1 else ()
        local = num_tokens // tp
        self.key_tokens = nn.Parameter(torch.empty(*lead, local, in_features))
        self.value_tokens = nn.Parameter(torch.empty(*lead, local, out_features))
        # Checkpoints, growth and DeepSpeed's clipping read these tags.
        for p, width in ((self.key_tokens, in_features), (self.value_tokens, out_features)):
            p.partition_dim = len(lead)
            p.global_shape = (*lead, num_tokens, width)
            p.model_parallel = tp > 1
        self.key_std, self.value_std = key_std, value_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # One master tensor from the shared seed, sliced: a TP=p model holds the TP=1 model's numbers.
        for p, std in ((self.key_tokens, self.key_std), (self.value_tokens, self.value_std)):
            full = torch.empty(p.global_shape, dtype=p.dtype, device=p.device).normal_(std=std)
            rank = M.group_rank(self.tp_group)
            with torch.no_grad():
                p.copy_(full.narrow(p.partition_dim, rank * p.shape[p.partition_dim], p.shape[p.partition_dim]))

    # tau is a float that must not be cast to bf16 with the module, so it travels as extra state.
    def get_extra_state(self) -> dict:
        return {"tau": self.tau}

    def set_extra_state(self, state: dict) -> None:
        self.tau = float(state["tau"])

    def extra_repr(self) -> str:
        g = f", groups={self.groups}" if self.groups > 1 else ""
        return (f"in={self.in_features}, out={self.out_features}, tokens={self.num_tokens}{g}, "
                f"norm={self.norm}, tau={self.tau:.4g}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grp, sp = self.tp_group, self.sequence_parallel
        # With sequence parallelism the fused function gathers x itself, keeping it sharded for backward.
        inner_gather = (-1 if self.input == "sharded" else -2) if sp and self.impl != "reference" else None
        if inner_gather is None:
            if self.input == "sharded":
                x = M.all_gather(x, grp)
            else:
                x = M.gather_seq(x, grp) if sp else M.copy_to(x, grp)
        if self.impl != "reference":
            k, v = self.key_tokens, self.value_tokens
            if self.groups == 1:
                k, v = k.unsqueeze(0), v.unsqueeze(0)
            out = _FusedPattention.apply(x, k, v, self.norm, self.tau, EPS, grp, self.impl == "compiled",
                                         inner_gather)
            if self.groups == 1:
                out = out[0]
        elif self.groups == 1:
            out = theta(x @ self.key_tokens.t(), self.norm, self.tau, group=grp) @ self.value_tokens
        else:
            g, n = self.groups, self.key_tokens.shape[1]
            lead = x.shape[:-1]
            scores = x.reshape(-1, self.in_features) @ self.key_tokens.reshape(g * n, self.in_features).t()
            a = theta(scores.view(-1, g, n), self.norm, self.tau, group=grp)    # (N, g, n)
            out = torch.bmm(a.transpose(0, 1), self.value_tokens)                # (g, N, out)
            out = out.view(g, *lead, self.out_features)
        if self.output == "scatter":
            return M.reduce_scatter(out, grp)
        return M.scatter_seq(out, grp) if sp else M.reduce_from(out, grp)
