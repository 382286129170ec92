"""The GPT baseline for benchmarks: ordinary linear layers, same width, depth and FLOPs per token.

A TokenFormer block's Pattentions cost 4·d·(3·n_qkv + n_proj + n_ffn) forward FLOPs per token;
a GPT block's linears cost 2·(3d² + d² + 2·d·f). The baseline's MLP width f is chosen so the two
match (f = 6d for the released token ratios); attention, rotary, norms, tied head are the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .model import Rotary, model_flops_per_token, pattention_flops_per_token


def gpt_mlp_width(cfg: ModelConfig) -> int:
    d = cfg.hidden_size
    per_block = pattention_flops_per_token(cfg) // cfg.num_layers
    return max(1, round((per_block / 2 - 4 * d * d) / (2 * d)))


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp_width: int):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=cfg.norm_eps), nn.LayerNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, mlp_width, bias=False), nn.Linear(mlp_width, d, bias=False)
        self.rotary = Rotary(int(self.head_dim * cfg.rotary_pct), cfg.rotary_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q, k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(o.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.mlp_width = gpt_mlp_width(cfg)
        self.embed = nn.Embedding(vocab_size, cfg.hidden_size)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(GPTBlock(cfg, self.mlp_width) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.final_norm(x) @ self.embed.weight.t()
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def gpt_flops_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    d, f = cfg.hidden_size, gpt_mlp_width(cfg)
    linears = cfg.num_layers * 2 * (4 * d * d + 2 * d * f)
    return model_flops_per_token(cfg, vocab_size) - 3 * pattention_flops_per_token(cfg) + 3 * linears
