"""Pattention: input tokens attend to learnable key/value parameter tokens (DESIGN.md section 1).

    S = X @ K.T          (T, n) scores, no 1/sqrt(d)
    A = theta(S)         normalised over the n parameter tokens of each row
    O = A @ V            (T, d_out)

`tau` is a per-layer constant stored with the model (not recomputed from n), so that appending
tokens with zero keys leaves the function unchanged (DESIGN.md section 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
EPS = 1e-6  # inside the row norm: an all-zero score row gives 0, not NaN


def default_tau(norm: str, num_tokens: int) -> float:
    """The reference scale: sqrt(n) for the L2 variants, n for softmax (which sums to 1)."""
    return float(num_tokens) if norm == "softmax" else math.sqrt(num_tokens)


def theta(scores: torch.Tensor, norm: str, tau: float, eps: float = EPS) -> torch.Tensor:
    """Normalise scores over the last dim. Statistics are taken in fp32 whatever the input dtype."""
    s = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    if norm == "l2_norm_gelu":
        a = F.gelu(s * (tau * torch.rsqrt(s.square().sum(-1, keepdim=True) + eps)))
    elif norm == "gelu_l2_norm":
        g = F.gelu(s)
        a = g * (tau * torch.rsqrt(g.square().sum(-1, keepdim=True) + eps))
    elif norm == "softmax":
        # torch.softmax subtracts the row max before exp (the reference does not and overflows in fp16).
        a = tau * torch.softmax(s, dim=-1)
    else:
        raise ValueError(f"unknown Pattention norm {norm!r}; choose one of {', '.join(NORMS)}")
    return a.to(scores.dtype)


class Pattention(nn.Module):
    """Token-parameter attention replacing a linear layer `in_features -> out_features`.

    groups > 1 fuses several Pattentions of the same input (Q, K and V): one score matmul for
    all groups, each group normalised over its own tokens, one batched value matmul. Then the
    parameters are (groups, n, in) / (groups, n, out) and the output is (groups, *x.shape[:-1], out).
    """

    def __init__(self, in_features: int, out_features: int, num_tokens: int, norm: str = "l2_norm_gelu",
                 tau: float | None = None, groups: int = 1, key_std: float = 0.02, value_std: float = 0.02):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown Pattention norm {norm!r}; choose one of {', '.join(NORMS)}")
        self.in_features, self.out_features, self.num_tokens = in_features, out_features, num_tokens
        self.norm, self.groups = norm, groups
        self.tau = float(tau) if tau is not None else default_tau(norm, num_tokens)
        lead = (groups,) if groups > 1 else ()
        self.key_tokens = nn.Parameter(torch.empty(*lead, num_tokens, in_features))
        self.value_tokens = nn.Parameter(torch.empty(*lead, num_tokens, out_features))
        # Tensor parallelism shards the token dim; checkpoints and growth read these tags.
        for p in (self.key_tokens, self.value_tokens):
            p.partition_dim = len(lead)
        self.key_std, self.value_std = key_std, value_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_tokens, std=self.key_std)
        nn.init.normal_(self.value_tokens, std=self.value_std)

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
        if self.groups == 1:
            return theta(x @ self.key_tokens.t(), self.norm, self.tau) @ self.value_tokens
        g, n = self.groups, self.num_tokens
        lead = x.shape[:-1]
        scores = x.reshape(-1, self.in_features) @ self.key_tokens.reshape(g * n, self.in_features).t()
        a = theta(scores.view(-1, g, n), self.norm, self.tau)          # (N, g, n)
        out = torch.bmm(a.transpose(0, 1), self.value_tokens)           # (g, N, out)
        return out.view(g, *lead, self.out_features)
