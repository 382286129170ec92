"""TokenFormer language model (DESIGN.md section 1), written as single-device code.

Pre-norm blocks: x + Attn(LN(x)), then + FFN(LN(.)). Every projection is a Pattention: fused
Q/K/V, the attention output, and one d->d FFN whose theta is its only nonlinearity. Block
LayerNorms have no affine parameters; the final one is affine; embeddings are tied.
The model is a flat sequence of layers (embedding, blocks, head) so a pipeline can cut it.

Tensor parallelism (a `tp_group` of size p) is swapped in, not sprinkled: each Pattention holds
1/p of its tokens, Q/K/V come out split by heads (reduce-scatter), attention runs on this rank's
heads, the output projection gathers them back, and embedding and loss are vocab-parallel.
Sequence parallelism (`sequence_parallel`) keeps the residual stream, the norms and dropout on
this rank's shard of the sequence: the Pattentions gather it and scatter their outputs back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import mappings as M
from .pattention import Pattention
from .seeding import layer_seeds, seeded
from .vocab_parallel import VocabParallelEmbedding, cross_entropy

if TYPE_CHECKING:
    # Annotations only. This file also ships, without the config package, inside Hugging Face exports
    # (modeling_tokenformer.py), whose loader copies what `from .x import` lines name; `from . import` it skips.
    from . import config


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding on the first `dim` dims of each head."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2).float() / dim), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k, whose first position is `offset` (non-zero when decoding with a cache)."""
        if self.dim == 0:
            return q, k
        t = torch.arange(offset, offset + q.shape[-2], device=q.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(q.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

        def rot(x: torch.Tensor) -> torch.Tensor:
            xr, xp = x[..., :self.dim], x[..., self.dim:]
            x1, x2 = xr.chunk(2, dim=-1)
            return torch.cat((xr * cos + torch.cat((-x2, x1), dim=-1) * sin, xp), dim=-1)

        return rot(q), rot(k)


class KVCache:
    """Keys and values of the positions seen so far, per block, for incremental decoding.

    The interface is that of transformers' `DynamicCache` (`update`, `get_seq_length`), so the
    Hugging Face export passes its own cache straight through the same model code."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, heads, T, head_dim) keys and values of block `layer_idx`; return all so far."""
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], k), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], v), dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


class SequenceShardDropout(nn.Dropout):
    """nn.Dropout of a sequence shard (dim -2) with the mask the whole sequence gets: every tensor
    rank draws the same full mask from the shared stream and keeps its slice, so results do not
    depend on the tensor size (Megatron instead draws a per-rank stream here)."""

    def __init__(self, p: float, tp_group=None):
        super().__init__(p)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0) or M.group_size(self.tp_group) == 1:
            return super().forward(x)
        whole = (*x.shape[:-2], x.shape[-2] * M.group_size(self.tp_group), x.shape[-1])
        keep = F.dropout(x.new_ones(whole), self.p)  # 0 or 1/(1-p), as F.dropout(x) scales
        return x * M.seq_shard(keep, self.tp_group).contiguous()


class Block(nn.Module):
    def __init__(self, cfg: config.ModelConfig, tp_group=None, seed: int | None = None,
                 sequence_parallel: bool = False):
        super().__init__()
        with seeded(seed):
            self._build(cfg, tp_group, sequence_parallel)

    def _build(self, cfg: config.ModelConfig, tp_group, sequence_parallel: bool) -> None:
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads // M.group_size(tp_group), d // cfg.num_heads  # local heads
        value_std = 2.0 / (cfg.num_layers * math.sqrt(d))  # "wang" init
        kw = dict(norm=cfg.norm, key_std=cfg.init_std, value_std=value_std, tp_group=tp_group,
                  impl=cfg.pattention_impl, sequence_parallel=sequence_parallel)
        self.ln1 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.qkv = Pattention(d, d, cfg.qkv_tokens, groups=3, output="scatter", **kw)
        self.proj = Pattention(d, d, cfg.proj_tokens, input="sharded", **kw)
        self.ln2 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.ffn = Pattention(d, d, cfg.ffn_tokens, **kw)
        self.rotary = Rotary(int(self.head_dim * cfg.rotary_pct), cfg.rotary_base)
        self.dropout = SequenceShardDropout(cfg.dropout, tp_group if sequence_parallel else None)

    def attention(self, x: torch.Tensor, cache=None, layer_idx: int = 0, offset: int = 0) -> torch.Tensor:
        qkv = self.qkv(x)  # (3, B, T, local heads x head_dim): the whole sequence, this rank's heads
        _, b, t, _ = qkv.shape
        q, k, v = qkv.view(3, b, t, self.num_heads, self.head_dim).transpose(2, 3).unbind(0)
        q, k = self.rotary(q, k, offset)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.update(k, v, layer_idx)
            # Query i sits at position offset + i and sees keys 0 .. offset + i.
            mask = torch.ones(t, k.shape[-2], dtype=torch.bool, device=x.device).tril(k.shape[-2] - t)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cache=None, layer_idx: int = 0, offset: int = 0) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.ln1(x), cache, layer_idx, offset))
        return x + self.dropout(self.ffn(self.ln2(x)))


class FinalNorm(nn.Module):
    """Affine LayerNorm with a zero-centred gain (out = LN(x) * (1 + g) + b, g initialised to 0),
    so that weight decay, applied to every parameter, pulls it towards identity, not towards zero."""

    def __init__(self, hidden_size: int, eps: float, seq_group=None):
        super().__init__()
        self.eps, self.seq_group = eps, seq_group
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On a sequence shard (seq_group) each rank's gradient covers its tokens only: copy_to sums them.
        weight, bias = M.copy_to(self.weight, self.seq_group), M.copy_to(self.bias, self.seq_group)
        return F.layer_norm(x, x.shape[-1:], 1 + weight, bias, self.eps)


class TokenFormerModel(nn.Module):
    """`forward(input_ids)` gives logits (B, T, vocab/p); with `labels` it gives the mean token loss.
    With a `cache` (KVCache, or transformers' DynamicCache) input_ids continue the cached positions.
    `sequence_parallel` (with a tp_group) shards the sequence between the Pattentions (training)."""

    def __init__(self, cfg: config.ModelConfig, vocab_size: int, tp_group=None, seed: int | None = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        seeds = layer_seeds(seed, cfg.num_layers)
        sp = sequence_parallel
        self.embed = VocabParallelEmbedding(vocab_size, cfg.hidden_size, cfg.init_std, tp_group, seed=seeds[0],
                                            sequence_parallel=sp)
        self.blocks = nn.ModuleList(Block(cfg, tp_group, seed=seeds[1 + i], sequence_parallel=sp)
                                    for i in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg.hidden_size, cfg.norm_eps, tp_group if sp else None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        x = self.embed(input_ids)
        offset = cache.get_seq_length() if cache is not None else 0  # before layer 0 appends to it
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i, offset)
        logits = self.embed.logits(self.final_norm(x))  # tied output embedding
        if labels is None:
            return logits
        return cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), self.embed.tp_group,
                             self.embed.start)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the whole model, whatever share of the tensor-sharded ones this rank holds."""
    return sum(math.prod(getattr(p, "global_shape", p.shape)) for p in model.parameters())


def pattention_flops_per_token(cfg: config.ModelConfig) -> int:
    """Forward FLOPs per token of all Pattentions: 2*n*(d_in+d_out) each (DESIGN.md section 1)."""
    d = cfg.hidden_size
    per_block = 2 * (3 * cfg.qkv_tokens + cfg.proj_tokens + cfg.ffn_tokens) * 2 * d
    return cfg.num_layers * per_block


def attention_flops_per_token(cfg: config.ModelConfig) -> int:
    """Forward FLOPs per token of one block's attention core: QK^T and AV, 2*t*d each. The causal
    mask is not discounted (the convention of MFU figures, PaLM's and Megatron's)."""
    return 2 * 2 * cfg.seq_length * cfg.hidden_size


def model_flops_per_token(cfg: config.ModelConfig, vocab_size: int) -> int:
    """Training FLOPs per token (forward + backward = 3x forward): Pattentions, attention, head."""
    head = 2 * cfg.hidden_size * vocab_size
    return 3 * (pattention_flops_per_token(cfg) + cfg.num_layers * attention_flops_per_token(cfg) + head)


# ---- the layer order ------------------------------------------------------------------------
# [embedding, block 0 .. block L-1, final norm, head] in one place: pipeline stages cut this
# list, checkpoints file parameters by it, the planner and the pipeline balance walk it.

@dataclass(frozen=True)
class Layer:
    name: str
    flops: int
    """Forward FLOPs per token."""
    sharded: int
    """Parameters split over the tensor-parallel ranks (at tensor size 1)."""
    replicated: int
    """Parameters every tensor rank holds."""


def layer_names(num_layers: int) -> list[str]:
    """The layers by their TokenFormerModel module names ("head" is the tied embedding again)."""
    return ["embed", *[f"blocks.{i}" for i in range(num_layers)], "final_norm", "head"]


def layers(cfg: config.ModelConfig, vocab_size: int) -> list[Layer]:
    """The model as its flat sequence of layers. The head's weight is the embedding's (a
    pipeline's last stage holds a copy)."""
    d = cfg.hidden_size
    block_params = 2 * d * (3 * cfg.qkv_tokens + cfg.proj_tokens + cfg.ffn_tokens)
    block_flops = pattention_flops_per_token(cfg) // cfg.num_layers + attention_flops_per_token(cfg)
    embed, *blocks, norm, head = layer_names(cfg.num_layers)
    return [Layer(embed, d, vocab_size * d, 0),
            *[Layer(name, block_flops, block_params, 0) for name in blocks],
            Layer(norm, 5 * d, 0, 2 * d),
            Layer(head, 2 * d * vocab_size, vocab_size * d, 0)]


def layer_index(param_name: str, num_layers: int) -> int:
    """Position in `layers()` of the layer holding a TokenFormerModel parameter (or module):
    0 embedding (and so the tied head), 1..L blocks, L+1 final norm."""
    parts = param_name.split(".")
    name = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
    names = layer_names(num_layers)[:-1]  # the head holds no parameter of its own
    if name not in names:
        raise ValueError(f"parameter {param_name!r} belongs to no TokenFormer layer")
    return names.index(name)
