"""What a run reports beyond its loss (README "Monitoring", docs/DESIGN.md "Observability"): the step-time
breakdown, memory, MFU, optimizer health, and how the Pattention layers use their parameter tokens."""
from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import mappings as M
from .pattention import Pattention, theta

# ---- MFU ---------------------------------------------------------------------------------------
# Dense peak TFLOP/s (no structured sparsity) of the tensor cores for each precision; fp32 is the
# plain fp32 rate (torch leaves TF32 matmuls off by default). Matched as a substring of the CUDA
# device name, longest key first ("A100" before "A10", "GH200" before "H200"). Sources: NVIDIA's
# datasheets (H100 / H100 NVL / H200 / GH200 / A100 / L40S / A10 / L4); their sparse figures halved.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},  # SXM5 ("NVIDIA H100 80GB HBM3")
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
}


def peak_flops(device_name: str, precision: str, override_tflops: float | None = None) -> float | None:
    """The device's peak FLOP/s for `precision` (bf16/fp16/fp32): log.peak_tflops if set, else the
    table's entry for a CUDA device name; None when unknown (a CPU, a GPU not in the table)."""
    if override_tflops:
        return override_tflops * 1e12
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key][precision] * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float) -> float:
    """Model FLOPs utilisation: the model's training FLOPs per token (model.model_flops_per_token)
    times tokens/s over the device's peak; the run and tools/benchmark.py both use this."""
    return flops_per_token * tokens_per_sec / peak


# ---- memory ------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc); elsewhere its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(dev: torch.device) -> dict[str, float]:
    """This rank's memory in GiB: host RSS always; on CUDA the peak allocated since the last call
    (the peak is reset: each logged row holds its window's peak) and what the caching allocator holds."""
    out = {"mem/rss_gb": rss_bytes() / 2**30}
    if dev.type == "cuda":
        out["mem/max_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        out["mem/reserved_gb"] = torch.cuda.memory_reserved(dev) / 2**30
        torch.cuda.reset_peak_memory_stats(dev)
    return out


def max_over_ranks(values: dict[str, float], dev: torch.device) -> dict[str, float]:
    """Each value's maximum over all ranks (one small all-reduce; every rank must call)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


# ---- step-time breakdown -----------------------------------------------------------------------
class StepTimer:
    """Wall time of each training step and its parts, summed over the logging window.

    begin() .. lap("data") .. lap("forward_backward") .. end(); the optimizer's time is measured
    inside the step (`optimizer()`, wrapped around DeepSpeed's model step by `hook_optimizer`) and
    taken out of the lap it falls in. `other` is the rest of the step, so the parts sum to the step.
    With `sync` (CUDA), each mark first waits for the device, so a part holds the kernels it launched,
    not just their launch; the cost (docs/PERFORMANCE.md) is that the host cannot queue work ahead
    across a mark."""

    PARTS = ("data", "forward_backward", "optimizer")

    def __init__(self, sync: bool):
        self.sync = sync
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys((*self.PARTS, "step"), 0.0)
        self.steps = 0
        self.last = self.start = 0.0
        self.opt_in_lap = 0.0

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.start = self.last = self._now()
        self.opt_in_lap = 0.0

    def lap(self, part: str) -> None:
        t = self._now()
        self.sums[part] += t - self.last - self.opt_in_lap
        self.last, self.opt_in_lap = t, 0.0

    def end(self) -> None:
        self.sums["step"] += self._now() - self.start
        self.steps += 1

    @contextlib.contextmanager
    def optimizer(self):
        t0 = self._now()
        try:
            yield
        finally:
            dt = self._now() - t0
            self.sums["optimizer"] += dt
            self.opt_in_lap += dt

    def values(self) -> dict[str, float]:
        """Per-step means in ms over the window (then starts a new window); empty if no step ran."""
        if not self.steps:
            return {}
        ms = {k: 1e3 * v / self.steps for k, v in self.sums.items()}
        out = {"step_ms": ms["step"], **{f"step_ms/{p}": ms[p] for p in self.PARTS}}
        out["step_ms/other"] = ms["step"] - sum(ms[p] for p in self.PARTS)
        self.reset()
        return out


class OptimizerHook:
    """Wraps DeepSpeed's model step (`_take_model_step`: clipping, the update, zeroing gradients,
    the LR step; the same in the pipeline engine) to time it and, when asked, count the zero
    gradients just before it. Installed on each engine the run builds (again after a growth)."""

    def __init__(self, timer: StepTimer | None, ps, pipelined: bool):
        self.timer, self.ps, self.pipelined = timer, ps, pipelined
        self.count_zeros = False  # set by the trainer for steps that are logged
        self.zero_grads: int | None = None

    def install(self, engine) -> None:
        inner = engine._take_model_step

        def take_model_step(*args, **kwargs):
            if self.count_zeros:
                self.zero_grads = count_zero_grads(engine.module, self.ps, self.pipelined)
            with self.timer.optimizer() if self.timer else contextlib.nullcontext():
                return inner(*args, **kwargs)

        engine._take_model_step = take_model_step


def merge_over_ranks(values: dict) -> dict:
    """Every rank's dict merged, on every rank (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return {k: v for d in out for k, v in d.items()}


# ---- optimizer health --------------------------------------------------------------------------
def loss_scale(engine) -> float | None:
    """fp16's current loss scale, as DeepSpeed's scaler holds it (dynamic or static)."""
    scale = getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def _owned_parameters(module: nn.Module, ps, pipelined: bool):
    """The parameters whose values this rank adds to a model-wide sum, so that each global element
    is counted once over tensor x pipeline: sharded ones on every tensor rank, replicated ones on
    tensor rank 0, the pipeline's tied embedding on its first stage only."""
    from .pipeline import TIED_PREFIX

    for name, p in module.named_parameters():
        if pipelined and name.startswith(TIED_PREFIX) and ps.grid.pp_rank != 0:
            continue
        if getattr(p, "model_parallel", False) or ps.grid.tp_rank == 0:
            yield p


def _model_sum(value: float, ps, dev: torch.device) -> float:
    """Sum over the ranks of one model replica (tensor x pipeline)."""
    if ps.mp_group is None or dist.get_world_size(ps.mp_group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, group=ps.mp_group)
    return t.item()


@torch.no_grad()
def params_norm(module: nn.Module, ps, pipelined: bool) -> float:
    """L2 norm of all the model's parameters (as the forward uses them), each counted once."""
    # in fp64: an fp32 reduction over millions of elements is off by 1e-5 relative
    norms = [torch.linalg.vector_norm(p, dtype=torch.float64) for p in _owned_parameters(module, ps, pipelined)]
    dev = next(module.parameters()).device
    sq = torch.stack(norms).square().sum().item() if norms else 0.0  # one device sync
    return math.sqrt(_model_sum(sq, ps, dev))


@torch.no_grad()
def count_zero_grads(module: nn.Module, ps, pipelined: bool) -> int:
    """Gradient elements exactly zero, model-wide, after the last backward of a step (DeepSpeed's
    safe_get_full_grad: the full gradient of each parameter whatever the ZeRO stage)."""
    from deepspeed.utils import safe_get_full_grad

    dev = next(module.parameters()).device
    counts = []
    for p in _owned_parameters(module, ps, pipelined):
        g = safe_get_full_grad(p)
        counts.append((g == 0).sum() if g is not None else torch.tensor(p.numel(), device=dev))
    zeros = int(torch.stack(counts).sum().item()) if counts else 0  # one device sync
    return int(_model_sum(float(zeros), ps, dev))


# ---- parameter-token usage ---------------------------------------------------------------------
PROJECTIONS = {"qkv": ("q", "k", "v"), "proj": ("proj",), "ffn": ("ffn",)}
TOKEN_KEYS = {"qkv": "qkv_tokens", "proj": "proj_tokens", "ffn": "ffn_tokens"}


def _group_sum(t: torch.Tensor, group) -> torch.Tensor:
    return M.all_reduce_sum(t.clone(), group, "fwd", "token_stats")


@torch.no_grad()
def layer_usage(layer: Pattention, x: torch.Tensor, labels: torch.Tensor | None) -> list[dict[str, float]]:
    """For each group of `layer` (q, k, v, or the one), given its input `x`: the attention weights
    A = theta(x K^T) with the layer's own normalisation; each input token's distribution over the
    parameter tokens |A| / sum |A| (softmax: A / tau itself); p its mean over the input tokens.
    Returns {"effective": exp(entropy of p), "share_stage<k>": the mass of p on the tokens whose
    growth stage (`labels`, one per global token; None: no shares) is k}. The tokens may be sharded
    over the layer's tensor group: row sums, entropy and shares are summed over it, so every rank
    gets the TP=1 numbers."""
    grp = layer.tp_group
    # the whole input, as the layer itself gathers it: a head-sharded input along its features; with
    # sequence parallelism a replicated one arrives as this rank's shard of the sequence (dim -2)
    dim = -1 if layer.input == "sharded" else -2 if getattr(layer, "sequence_parallel", False) else None
    if dim is not None:
        x = M.gather(x, grp, dim, "fwd", "token_stats")
    x = x.reshape(-1, layer.in_features)
    k = layer.key_tokens if layer.groups > 1 else layer.key_tokens.unsqueeze(0)  # (g, n_local, in)
    g, n_local, _ = k.shape
    scores = (x @ k.reshape(g * n_local, -1).t()).view(-1, g, n_local)
    w = theta(scores, layer.norm, layer.tau, group=grp).double().abs()
    w = w / _group_sum(w.sum(-1, keepdim=True), grp).clamp_min(1e-300)  # each row sums to 1
    p = w.mean(0)  # (g, n_local)
    p = p / _group_sum(p.sum(-1, keepdim=True), grp).clamp_min(1e-300)  # (a row of zeros sums to 0)
    cols = [-(p * torch.log(p.clamp_min(1e-300))).sum(-1)]  # this rank's part of the entropy
    stages = []
    if labels is not None:
        first = M.group_rank(grp) * n_local  # rank r holds global tokens [r n_local, (r+1) n_local)
        mine = labels.to(p.device)[first:first + n_local]
        stages = [s for s in range(int(labels.max()) + 1) if bool((labels == s).any())]  # stages that added tokens
        cols += [(p * (mine == s)).sum(-1) for s in stages]
    stats = _group_sum(torch.stack(cols, -1), grp).tolist()  # (g, 1 + stages)
    return [{"effective": math.exp(row[0]), **{f"share_stage{s}": v for s, v in zip(stages, row[1:])}}
            for row in stats]


def stage_labels(lineage: list[dict], n: int, key: str) -> torch.Tensor | None:
    """The growth stage of each of the n global tokens of one Pattention kind (`key`: qkv_tokens,
    proj_tokens or ffn_tokens): 0 for the first ones, k for those the k-th growth of `lineage`
    appended. A growth over T tensor shards places its new tokens after each shard's old ones,
    [old_0; new_0; old_1; new_1; ...] (growth/expand.py), so the labels follow that order. None
    without growths, or where the lineage does not say (an entry without `shards`, other counts)."""
    labels = None
    for stage, e in enumerate(lineage, 1):
        before, after, shards = e["tokens_before"][key], e["tokens_after"][key], e.get("shards")
        labels = torch.zeros(before, dtype=torch.long) if labels is None else labels
        if shards is None or labels.numel() != before:
            return None
        add = (after - before) // shards
        labels = torch.cat([t for old in labels.chunk(shards) for t in (old, torch.full((add,), stage))])
    return labels if labels is not None and labels.numel() == n else None


def token_usage(module: nn.Module, forward: Callable[[], object], lineage: list[dict] | None = None,
                name_of: Callable[[str], str] = lambda n: n) -> dict[str, float]:
    """Run `forward` (one validation micro-batch through the model or this pipeline stage) and
    return `tokens/block<i>/<projection>/<stat>` for the Pattention layers of `module` (whose
    module names `name_of` maps to TokenFormerModel's "blocks.<i>.<kind>"); `lineage`: the growths
    (meta.json's), for the shares. Every tensor rank returns the same numbers. Compiled blocks run
    eager here (the hooks run collectives)."""
    found: dict[str, float] = {}

    def hook(name: str):
        def pre(layer: Pattention, args):
            _, block, kind = name_of(name).split(".")
            labels = stage_labels(lineage, layer.num_tokens, TOKEN_KEYS[kind]) if lineage else None
            for proj, stats in zip(PROJECTIONS[kind], layer_usage(layer, args[0], labels)):
                found.update({f"tokens/block{block}/{proj}/{k}": v for k, v in stats.items()})
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in module.named_modules() if isinstance(m, Pattention)]
    try:
        with torch.compiler.set_stance("force_eager"), torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return found


def with_means(stats: dict[str, float]) -> dict[str, float]:
    """`stats` plus `tokens/mean/<projection>/<stat>`: the mean over the layers."""
    groups: dict[str, list[float]] = {}
    for key, v in stats.items():
        _, _, proj, stat = key.split("/")
        groups.setdefault(f"tokens/mean/{proj}/{stat}", []).append(v)
    return {**stats, **{k: sum(v) / len(v) for k, v in sorted(groups.items())}}
