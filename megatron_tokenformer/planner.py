"""Memory and step-time estimates for every (tensor, pipeline, data) layout of a config.

Memory per GPU, for the most loaded pipeline stage:
- weights: 2 bytes a parameter in bf16/fp16 (4 in fp32), this rank's tensor shard;
- gradients: the same width (bf16 gradients; fp32 in fp32 training);
- optimizer: Adam moments (8 bytes) plus an fp32 master copy (4) under mixed precision;
- ZeRO over the D data-parallel ranks divides the optimizer state (stage >= 1) and the gradients
  (2); the config offers stages 0-2, so the planner does too (tensor parallelism already shards
  the parameter tokens);
- activations: the bytes a block keeps for backward per token, measured once on the CPU with a
  real block (`block_activation_bytes`), times the tokens in flight (1F1B keeps up to P micro-batches
  on the first stage); with activation checkpointing, each block keeps only its input plus one
  block's full activations during its recompute; plus the logits on the last stage. Under
  sequence parallelism everything a block keeps is split by the tensor size (measured with
  tools/activation_memory.py, docs/TENSOR_PARALLEL.md), for the backward re-gathers' traffic.
Step time: model FLOPs / (GPUs x achieved FLOP/s) stretched by the pipeline bubble, plus the
tensor-parallel collectives (bytes counted in `docs/TENSOR_PARALLEL.md`), the pipeline sends and
the data-parallel gradient reduction, each over the link its group spans; no overlap assumed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import TOKEN_KEYS, Config, ModelConfig
from .model import Block, layers, model_flops_per_token
from .pipeline import partition

GB = 2**30


def saved_tensor_bytes(module: torch.nn.Module, *inputs) -> tuple[torch.Tensor, int]:
    """Run module(*inputs); return its output and the bytes autograd keeps for backward
    (distinct storages, parameters excluded)."""
    params = {p.data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs)
    return out, sum(seen.values())


def block_activation_bytes(cfg: ModelConfig, dtype: torch.dtype, seq: int = 128) -> dict[str, float]:
    """Bytes one block keeps for backward per token (measured), split into the parameter-token
    scores (sharded by tensor parallelism) and the rest."""
    small = dataclasses.replace(cfg, seq_length=seq, activation_checkpointing=False)
    torch.manual_seed(0)
    block = Block(small).to(dtype)
    x = torch.randn(1, seq, cfg.hidden_size, dtype=dtype, requires_grad=True)
    total = saved_tensor_bytes(block, x)[1] / seq
    n = 3 * cfg.qkv_tokens + cfg.proj_tokens + cfg.ffn_tokens
    # the fused Pattention keeps the scores once, in the compute dtype (the reference: three, fp32)
    per_score = torch.finfo(dtype).bits // 8 if cfg.pattention_impl != "reference" else 12
    scores = min(total, n * per_score)
    return {"scores": scores, "rest": total - scores}


@dataclass
class Plan:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    activation_checkpointing: bool
    micro_batches: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    step_s: float
    tokens_per_sec: float
    bubble: float
    sequence_parallel: bool = False

    def row(self) -> str:
        ck = "yes" if self.activation_checkpointing else "no"
        sp = "yes" if self.sequence_parallel else "no"
        return (f"| {self.tensor} | {sp} | {self.pipeline} | {self.data} | {self.zero_stage} | {ck} | "
                f"{self.micro_batches} | "
                f"{self.weights_gb:.1f} | {self.grads_gb:.1f} | {self.optimizer_gb:.1f} | {self.activations_gb:.1f} | "
                f"{self.total_gb:.1f} | {self.step_s:.2f} | {self.tokens_per_sec:,.0f} | {self.bubble:.0%} |")


HEADER = ("| TP | seq. par. | PP | DP | ZeRO | act. ckpt | micro-batches | weights GB | grads GB | optimizer GB | "
          "activations GB | total GB | step s | tokens/s | bubble |\n|" + "---|" * 15)


def tp_bytes_per_token(cfg: ModelConfig, tensor: int, wbytes: int, layers: int | None = None,
                       ends: bool = True, sequence_parallel: bool = False) -> float:
    """Bytes each tensor-parallel rank sends per token, forward + backward (mappings.py's counter):
    per block 16·d activations (Q/K/V reduce-scatter 3d, proj all-gather d, two all-reduces of d, and
    their conjugates) plus 5 fp32 row statistics each way (softmax: 5 more, the row maxima, forward);
    the embedding's all-reduce, the head's input-gradient all-reduce and the loss's 3 row statistics.
    Sequence parallelism: per block 19·d (each all-reduce becomes a reduce-scatter and an all-gather,
    8·d forward as before, and backward gathers the three sharded Pattention inputs again: 11·d);
    ends 5·d (embedding reduce-scatter and its gather, the head's gather, re-gather and
    reduce-scatter), plus the final norm's gradient all-reduce once per micro-batch (not per token:
    `norm_grad_bytes`)."""
    if tensor == 1:
        return 0.0
    layers = cfg.num_layers if layers is None else layers
    d = cfg.hidden_size
    stats = 5 + 5 + (5 if cfg.norm == "softmax" else 0)  # all-reduced fp32 scalars per token, fwd + bwd
    per_block = (19 if sequence_parallel else 16) * d * wbytes + 2 * stats * 4
    end_bytes = (5 if sequence_parallel else 4) * d * wbytes + 2 * 3 * 4
    return (tensor - 1) / tensor * (layers * per_block + (end_bytes if ends else 0))


def norm_grad_bytes(cfg: ModelConfig, tensor: int, wbytes: int) -> float:
    """Bytes a rank sends per micro-batch, under sequence parallelism, to sum the final norm's
    gradients (gain and bias) over its tensor group: one all-reduce of 2·d."""
    return 2 * (tensor - 1) / tensor * 2 * cfg.hidden_size * wbytes


def stage_params(cfg: ModelConfig, vocab: int, pipeline: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(sharded, replicated) parameter counts of each pipeline stage at tensor size 1, and the cut."""
    table = layers(cfg, vocab)
    layer = [(x.sharded, x.replicated) for x in table]
    if pipeline == 1:
        layer = layer[:-1]  # the tied head is the embedding itself
    parts = partition([x.flops for x in table], pipeline) if pipeline > 1 else [0, len(layer)]
    return [(sum(s for s, _ in layer[a:b]), sum(r for _, r in layer[a:b])) for a, b in zip(parts, parts[1:])], parts


def estimate(cfg: Config, vocab: int, tensor: int, pipeline: int, data: int, zero_stage: int, ckpt: bool,
             act: dict[str, float], flops_per_gpu: float, gpus_per_node: int, intra_gbps: float,
             inter_gbps: float, sequence_parallel: bool = False) -> Plan:
    m, t = cfg.model, cfg.train
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"ZeRO stage {zero_stage}: the config accepts 0, 1 or 2")
    wbytes = 4 if t.precision == "fp32" else 2
    mixed = t.precision != "fp32"
    stages, parts = stage_params(m, vocab, pipeline)
    # the most loaded stage in memory (first or last: the embedding)
    params = max(s / tensor + r for s, r in stages)
    weights = params * wbytes
    grads = params * wbytes / (data if zero_stage >= 2 else 1)
    optimizer = params * (12 if mixed else 8) / (data if zero_stage >= 1 else 1)

    micro = t.micro_batch_size * m.seq_length
    m_count = t.global_batch_size // (t.micro_batch_size * data)
    blocks_per_stage = max(min(b, m.num_layers + 1) - max(a, 1) for a, b in zip(parts, parts[1:]))
    sp = sequence_parallel and tensor > 1
    # sequence parallelism shards the rest too (what the norms, residuals and Pattention inputs keep)
    per_block = (act["scores"] + act["rest"]) / tensor if sp else act["scores"] / tensor + act["rest"]
    in_flight = min(pipeline, m_count)
    if ckpt:  # each block's input kept: the sequence shard under sequence parallelism
        block_tokens = (micro * in_flight * blocks_per_stage * m.hidden_size * wbytes / (tensor if sp else 1)
                        + micro * per_block)
    else:
        block_tokens = micro * in_flight * blocks_per_stage * per_block
    logits = micro * vocab / tensor * (wbytes + 4)  # logits and the fp32 copy the loss keeps
    activations = block_tokens + logits

    tokens = t.global_batch_size * m.seq_length
    gpus = tensor * pipeline * data
    flops = model_flops_per_token(m, vocab) * tokens * (4 / 3 if ckpt else 1)
    bubble = (pipeline - 1) / (m_count + pipeline - 1)
    compute = flops / (gpus * flops_per_gpu) / (1 - bubble)

    def link(span: int) -> float:  # a group within `span` consecutive ranks: inside one node when they fit in it
        return intra_gbps if span <= gpus_per_node else inter_gbps

    tp_bytes = tp_bytes_per_token(m, tensor, wbytes, layers=blocks_per_stage, sequence_parallel=sp) * tokens / data
    if sp:
        tp_bytes += norm_grad_bytes(m, tensor, wbytes) * m_count
    tp_time = tp_bytes / (link(tensor) * 1e9) if tensor > 1 else 0.0
    pp_time = (2 * m_count * micro * m.hidden_size * wbytes / tensor / (link(tensor * pipeline) * 1e9)
               if pipeline > 1 else 0.0)
    # gradient reduce-scatter + all-gather (ZeRO 0-2)
    dp_time = (2 * (data - 1) / data * params * wbytes / (link(gpus) * 1e9)) if data > 1 else 0.0
    step = compute + tp_time + pp_time + dp_time
    return Plan(tensor, pipeline, data, zero_stage, ckpt, m_count, weights / GB, grads / GB, optimizer / GB,
                activations / GB, (weights + grads + optimizer + activations) / GB, step, tokens / step, bubble,
                sp)


def plans(cfg: Config, vocab: int, gpus: int, gpu_memory_gb: float, flops_per_gpu: float, gpus_per_node: int = 8,
          intra_gbps: float = 300.0, inter_gbps: float = 25.0, headroom: float = 0.9) -> tuple[list[Plan], list[Plan]]:
    """(feasible plans best first, all plans) for every layout of `gpus` GPUs."""
    m, t = cfg.model, cfg.train
    dtype = torch.float32 if t.precision == "fp32" else torch.bfloat16
    act = block_activation_bytes(m, dtype)
    out = []
    for tensor in [x for x in range(1, gpus + 1) if gpus % x == 0]:
        if m.num_heads % tensor or any(getattr(m, k) % tensor for k in TOKEN_KEYS):
            continue
        for pipeline in [x for x in range(1, gpus // tensor + 1) if (gpus // tensor) % x == 0]:
            data = gpus // (tensor * pipeline)
            if pipeline > m.num_layers or t.global_batch_size % (t.micro_batch_size * data):
                continue
            for zero in ((1,) if pipeline > 1 else (1, 2)):  # what validate() accepts
                for ckpt in (False, True):
                    for sp in ((False, True) if tensor > 1 and m.seq_length % tensor == 0 else (False,)):
                        out.append(estimate(cfg, vocab, tensor, pipeline, data, zero, ckpt, act, flops_per_gpu,
                                            gpus_per_node, intra_gbps, inter_gbps, sequence_parallel=sp))
    fit = sorted((p for p in out if p.total_gb <= headroom * gpu_memory_gb), key=lambda p: (p.step_s, p.total_gb))
    return fit, out


def parse_memory(text: str) -> float:
    text = text.strip().upper().removesuffix("B")
    scale = {"G": 1, "T": 1024, "M": 1 / 1024}
    if text and text[-1] in scale:
        return float(text[:-1]) * scale[text[-1]]
    return float(text)

