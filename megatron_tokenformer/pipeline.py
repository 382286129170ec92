"""Pipeline parallelism: the TokenFormer layers cut into stages, run by DeepSpeed's 1F1B engine.

The stage list is `model.layers()` ([embedding, block x L, final norm, tied head]) built from the
same layer classes and per-layer seeds as `TokenFormerModel`, so a PP=P model holds the PP=1
model's numbers. Stages are balanced by estimated compute (a block's cost follows its Pattention
token counts; the head's its vocab), not by layer count.
"""
from __future__ import annotations

import torch

from .config import Config, ModelConfig
from .deepspeed_adapter import pipeline_module_class
from .distributed import ParallelState
from .model import Block, FinalNorm, layer_names, layers
from .seeding import layer_seeds
from .vocab_parallel import VocabParallelEmbedding, cross_entropy, vocab_range

TIED_PREFIX = "tied_modules.embed."  # where DeepSpeed keeps the tied embedding of a pipeline module


def layer_costs(cfg: ModelConfig, vocab_size: int) -> list[int]:
    """Forward FLOPs per token of each pipeline layer: embedding, blocks, final norm, head."""
    return [layer.flops for layer in layers(cfg, vocab_size)]


def global_name(local: str, num_layers: int) -> str:
    """TokenFormerModel's name for a parameter of a pipeline module (which names its layers by
    their index in `model.layers()` and keeps the tied embedding under tied_modules)."""
    if local.startswith(TIED_PREFIX):
        return "embed." + local.removeprefix(TIED_PREFIX)
    idx, rest = local.split(".", 1)
    return f"{layer_names(num_layers)[int(idx)]}.{rest}"


def partition(costs: list[int], stages: int) -> list[int]:
    """Contiguous split of `costs` into `stages` parts minimising the largest part (exact DP).

    Returns DeepSpeed's `parts`: stage s owns layers parts[s] .. parts[s+1]-1."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest possible max stage cost for the first i layers in k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    parts, i = [n], n
    for k in range(stages, 0, -1):
        i = cut[k][i]
        parts.append(i)
    return parts[::-1]


def describe_partition(parts: list[int], costs: list[int], num_layers: int) -> str:
    names = layer_names(num_layers)
    total = sum(costs)
    lines = []
    for s in range(len(parts) - 1):
        a, b = parts[s], parts[s + 1]
        share = sum(costs[a:b]) / total
        lines.append(f"  stage {s}: {names[a]}..{names[b - 1]} ({b - a} layers, {share:.1%} of compute)")
    return "pipeline partition by estimated compute:\n" + "\n".join(lines)


def _head(embedding: VocabParallelEmbedding, x: torch.Tensor) -> torch.Tensor:
    return embedding.logits(x)


class _Loss:
    """The vocab-parallel loss on the last stage."""

    def __init__(self, vocab_size: int, ps: ParallelState):
        self.tp_group, (self.start, _) = ps.tp_group, vocab_range(vocab_size, ps.grid.tp_rank, ps.grid.tensor)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), self.tp_group, self.start)


def build_pipeline(cfg: Config, vocab_size: int, ps: ParallelState):
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import ProcessTopology

    m = cfg.model
    seeds = layer_seeds(cfg.train.seed, m.num_layers)
    sp = cfg.parallel.sequence_parallel  # the tensor between stages is then this rank's sequence shard
    embed_args = (vocab_size, m.hidden_size, m.init_std, ps.tp_group)
    specs = [TiedLayerSpec("embed", VocabParallelEmbedding, *embed_args, seed=seeds[0], sequence_parallel=sp,
                           tied_weight_attr=["weight"]),
             *[LayerSpec(Block, m, ps.tp_group, seed=seeds[1 + i], sequence_parallel=sp)
               for i in range(m.num_layers)],
             LayerSpec(FinalNorm, m.hidden_size, m.norm_eps, ps.tp_group if sp else None),
             TiedLayerSpec("embed", VocabParallelEmbedding, *embed_args, seed=seeds[0], sequence_parallel=sp,
                           forward_fn=_head, tied_weight_attr=["weight"])]
    table = layers(m, vocab_size)
    costs = [layer.flops for layer in table]
    parts = partition(costs, cfg.parallel.pipeline)
    g = ps.grid
    # Our rank order (tensor fastest, then pipeline, then data) as a DeepSpeed topology.
    topo = ProcessTopology(axes=["data", "pipe", "model"], dims=[g.data, g.pipeline, g.tensor])
    module = pipeline_module_class(parts)(specs, topology=topo, loss_fn=_Loss(vocab_size, ps),
                             activation_checkpoint_interval=1 if m.activation_checkpointing else 0,
                             checkpointable_layers=["Block"])
    return module, describe_partition(parts, costs, m.num_layers)
