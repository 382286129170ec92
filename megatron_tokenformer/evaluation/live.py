"""Zero-shot tasks during training (`eval.tasks`), on the live model at any parallel layout.

Each `eval.tasks_interval` steps (and at the end of the run) every rank builds a single-process
copy of the full model from the live engine's weights, then lm-eval's evaluator splits the
documents over ALL ranks (world size; data-parallel ranks and the tensor and pipeline ranks of a
replica alike), each scores its share on its copy, and rank 0 computes the metrics from everyone's
per-document results; they are broadcast so the logging rank reports them as `eval/<task>/<metric>`.

The copy: each parameter is gathered over the tensor-parallel group (`mappings.gather_param`),
then broadcast over the pipeline group from the stage that holds it. The trade-off is memory and
simplicity for speed: every rank holds the whole model in fp32 while the tasks run (4 bytes per
parameter on top of training memory: 0.6 GB at 150M, 6.3 GB at 1.5B; freed afterwards), and runs
the whole forward itself instead of its tensor/pipeline share. In exchange the scoring code is the
single-process code of tools/evaluate.py, so scores equal an offline evaluation of a checkpoint of
the same weights. The weights are the ones the model computes with (bf16/fp16 copies under those
precisions, upcast exactly to fp32), not the fp32 master weights.
"""
from __future__ import annotations

import dataclasses
import gc
import time

import torch

from .. import distributed as D
from .. import mappings as M
from ..pattention import Pattention
from ..pipeline import global_name
from . import offline


def _local_items(engine, cfg, pipelined: bool):
    """(global name, parameter) and (global name, Pattention) this rank holds."""
    L = cfg.model.num_layers
    name = (lambda n: global_name(n, L)) if pipelined else (lambda n: n)
    params = [(name(n), p) for n, p in engine.module.named_parameters()]
    patts = [(name(n), m) for n, m in engine.module.named_modules() if isinstance(m, Pattention)]
    return params, patts


@torch.no_grad()
def full_model(engine, cfg, ps: D.ParallelState, vocab: int, device: torch.device):
    """A TokenFormerModel on this process holding the live engine's weights (fp32, eval mode).

    A collective: every rank calls it at the same step."""
    from ..model import TokenFormerModel

    g = ps.grid
    pipelined = g.pipeline > 1
    params, patts = _local_items(engine, cfg, pipelined)
    mine = dict(params)
    # Which pipeline stage holds each parameter (the first one: the tied head's embedding copy is
    # the last stage's), and every Pattention's tau (a per-layer constant outside the parameters).
    held = D.all_gather_object(sorted(mine), ps.pp_group)
    owner = {}
    for stage, names in enumerate(held):
        for n in names:
            owner.setdefault(n, stage)
    extra = {}
    for part in D.all_gather_object({n: m.get_extra_state() for n, m in patts}, ps.pp_group):
        extra.update(part)
    model_cfg = dataclasses.replace(cfg.model, pattention_impl="fused", activation_checkpointing=False)
    with torch.device(device):  # random init here is overwritten below; built in place, no CPU copy
        model = TokenFormerModel(model_cfg, vocab)
    state = {}
    for n, p in model.named_parameters():  # the same order on every rank: the collectives pair up
        stage = owner[n]
        if stage == g.pp_rank:
            src = mine[n]
            dim = getattr(src, "partition_dim", None)
            full = M.gather_param(src, ps.tp_group, dim) if dim is not None else src.detach()
            buf = full.to(device=device, dtype=torch.float32).contiguous()
        else:
            buf = torch.empty(p.shape, dtype=torch.float32, device=device)
        if pipelined:
            D.broadcast_tensor(buf, g.dp_rank * g.tensor * g.pipeline + stage * g.tensor + g.tp_rank, ps.pp_group)
        state[n] = buf
    state.update({f"{n}._extra_state": s for n, s in extra.items()})
    model.load_state_dict(state)
    return model.eval()


def evaluate_tasks(engine, cfg, ps: D.ParallelState, vocab: int, tokenizer, device: torch.device) -> dict:
    """Run `cfg.eval.tasks` on the live model; returns {"eval/<task>/<metric>": value, ...,
    "eval/tasks_seconds": s} on every rank. A collective."""
    from .harness import run_tasks, scores
    from .lm_backend import TokenFormerLM

    started = time.perf_counter()
    model = full_model(engine, cfg, ps, vocab, device)
    lm = TokenFormerLM(model=model, tokenizer=tokenizer, batch_size=cfg.train.micro_batch_size, device=str(device),
                       rank=ps.grid.rank, world_size=ps.grid.world_size, progress=False)
    results = run_tasks(lm, list(cfg.eval.tasks), cfg.eval.tasks_limit, cfg.eval.tasks_data)
    flat = None
    if ps.grid.rank == 0:
        flat = {f"eval/{t}/{m}": v for t, ms in scores(results).items() for m, v in ms.items()}
    flat = D.broadcast_object(flat)
    del lm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**flat, "eval/tasks_seconds": time.perf_counter() - started}


class TaskEvaluator:
    """The training loop's hook: checks at start-up that the tasks' files are prepared (so a run
    does not stop at its first evaluation), then runs them when due."""

    def __init__(self, cfg, tokenizer_path):
        from ..tokenizer import load_tokenizer

        self.cfg = cfg
        self.tasks = list(cfg.eval.tasks)
        self.tokenizer = None
        if self.tasks:
            offline.check_prepared(self.tasks, cfg.eval.tasks_data)
            self.tokenizer = load_tokenizer(tokenizer_path)

    def due(self, step: int) -> bool:
        every = self.cfg.eval.tasks_interval
        return bool(self.tasks) and ((every and step % every == 0) or step == self.cfg.train.steps)

    def run(self, step: int, engine, run_cfg, ps, vocab: int, device, say) -> dict:
        """The metrics to log at this step; says one line with the scores and the time taken."""
        out = evaluate_tasks(engine, run_cfg, ps, vocab, self.tokenizer, device)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in out.items() if k != "eval/tasks_seconds")
        say(f"step {step}: tasks {shown} ({out['eval/tasks_seconds']:.1f} s, not counted in tokens/s)")
        return out
