"""Saving from and loading into a running DeepSpeed engine, at any parallel layout.

Saving: every rank writes its own part of the fp32 master weights and Adam moments, one piece per
layer (`deepspeed_adapter.OptimizerState.local`: its ZeRO partition, or with every rank holding
everything a 1/D range of each parameter), with no collective but the barriers around it, so save
time and memory per rank do not grow with the data-parallel size; rank 0 writes meta.json and
commits. Loading: each rank reads its tensor shard of every parameter it holds and sets it through
DeepSpeed's per-parameter accessors, which keep only this rank's partition.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed as D
from ..config import TOKEN_KEYS, Config
from ..deepspeed_adapter import (OptimizerState, engine_counters, loss_scaler_state, set_engine_counters,
                                 set_loss_scaler_state)
from ..pattention import Pattention
from ..pipeline import global_name
from ..seeding import rng_state, seed_dropout, set_rng_state
from ..tokenizer import store_tokenizer
from .files import (FORMAT_VERSION, MOMENTS, PARTIAL, SHAPE_FIELDS, CheckpointError, ShardReader, check_format,
                    layer_of, save_safetensors, tag_for, write_meta, write_piece)
from .integrity import commit, file_entry, mark_latest, newest_good, prune, resolve, staging


def _global_names(module: torch.nn.Module, num_layers: int, pipelined: bool, modules: bool = False):
    """(global name, parameter) for each parameter this rank holds; with `modules`, (global name,
    Pattention) for each Pattention instead."""
    items = ([(n, m) for n, m in module.named_modules() if isinstance(m, Pattention)] if modules
             else list(module.named_parameters()))
    return [(global_name(n, num_layers) if pipelined else n, x) for n, x in items]


def _layout(grid: D.Grid, cfg: Config) -> dict:
    return {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data, "zero_stage": cfg.parallel.zero_stage}


def save(engine, cfg: Config, grid: D.Grid, step: int, consumed_samples: int, run_info: dict,
         vocab_size: int, tokenizer_sha256: str, extra_meta: dict | None = None,
         tokenizer_file: Path | None = None) -> Path:
    """Write a checkpoint of the running engine as `step_NNNNNNN` in checkpoint.dir. With
    `tokenizer_file` (the data's), the checkpoint carries a copy, so it alone suffices to evaluate
    or generate."""
    ckpt_dir = cfg.checkpoint_dir
    tag = tag_for(step)
    L, pipelined = cfg.model.num_layers, grid.pipeline > 1
    try:
        tmp = staging(ckpt_dir / tag) if grid.rank == 0 else ckpt_dir / (tag + PARTIAL)
        D.barrier()
        opt = OptimizerState(engine)
        written: list[Path] = []
        by_layer: dict[int, list] = {}
        for name, p in _global_names(engine.module, L, pipelined):
            if pipelined and name.startswith("embed.") and grid.pp_rank > 0:
                continue  # the tied head's copy of the embedding: the first stage writes it
            by_layer.setdefault(layer_of(name, L), []).append((name, p))
        taus = {name: m.get_extra_state() for name, m in _global_names(engine.module, L, pipelined, modules=True)}
        for layer, params in by_layer.items():  # one layer at a time: bounded host memory
            tensors, offsets, shapes, dims = {}, {}, {}, {}
            for name, p in params:
                shapes[name], dims[name] = list(p.shape), getattr(p, "partition_dim", None)
                part = opt.local(p, grid.dp_rank, grid.data)
                if part is not None:
                    offsets[name] = part[0]
                    for k, v in part[1].items():
                        tensors[f"{k}/{name}" if k else name] = v
            # every rank writes its piece, even an empty one: any piece describes the layer
            written.append(write_piece(tmp, layer, grid.tp_rank, grid.dp_rank, tensors, offsets, shapes, dims,
                                       {m: s for m, s in taus.items() if layer_of(m, L) == layer}))
        written.append(tmp / f"rng-{grid.rank:05d}.safetensors")
        save_safetensors(rng_state(), written[-1], {})
        # each rank fsyncs and hashes what it wrote: the manifest's cost is shared like the writing
        known = D.gather_dicts({f.name: file_entry(f) for f in written})
        if grid.rank == 0:
            sched = engine.lr_scheduler.state_dict()
            meta = {"format_version": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
                    "optimizer_step": opt.step(), "vocab_size": vocab_size, "tokenizer_sha256": tokenizer_sha256,
                    "scheduler": {k: v for k, v in sched.items() if k != "lr_lambdas"},
                    "engine": engine_counters(engine), "loss_scaler": loss_scaler_state(engine),
                    "world_size": grid.world_size, "layout": _layout(grid, cfg),
                    "config": cfg.to_dict(), "run_info": run_info, **(extra_meta or {})}
            if tokenizer_file is not None:
                meta["tokenizer"] = store_tokenizer(tokenizer_file, tmp)
            write_meta(tmp, meta)
            commit(tmp, ckpt_dir / tag, replace=True, known=known)  # the same step saved again (a resumed run)
            mark_latest(ckpt_dir, tag)
            prune(ckpt_dir, cfg.checkpoint.keep_last, keep=tag)
    except (OSError, RuntimeError) as e:  # torch's and safetensors' writers report a full disk as RuntimeError
        raise CheckpointError(f"could not write checkpoint {ckpt_dir / tag}: {e}. The previous checkpoint in "
                              f"{ckpt_dir} is untouched; free space or fix permissions (checkpoint.dir) and "
                              "rerun to resume from it") from None
    D.barrier()
    return ckpt_dir / tag


def check_compatible(meta: dict, model_cfg, where: Path) -> None:
    saved = meta["config"]["model"]
    diff = [f"model.{k}: checkpoint {saved[k]} vs config {getattr(model_cfg, k)}"
            for k in SHAPE_FIELDS if saved[k] != getattr(model_cfg, k)]
    if not diff:
        return
    grown = all(k.split(":")[0].split(".")[1] in TOKEN_KEYS for k in diff)
    hint = (" Only token counts differ: grow the checkpoint with tools/expand_params.py and load the result."
            if grown else " Use the config the checkpoint was trained with, or a new checkpoint.dir.")
    raise CheckpointError(f"checkpoint {where} does not match the model config: " + "; ".join(diff) + "." + hint)


def check_loadable(meta: dict, cfg: Config, model_cfg, where: Path, tokenizer_sha256: str) -> None:
    """Everything that can be checked before building the model: tokenizer, shapes, vocab split."""
    check_format(meta, where)
    if meta.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise CheckpointError(
            f"checkpoint {where} was trained with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}) "
            f"than the data in data.path={cfg.data.path} (sha256 {tokenizer_sha256[:12]}); point data.path at "
            "the data the run was trained on, or start a new checkpoint.dir")
    check_compatible(meta, model_cfg, where)
    if meta["vocab_size"] % cfg.parallel.tensor:
        raise CheckpointError(f"checkpoint {where} has a vocab of {meta['vocab_size']} rows, which does not split "
                              f"over parallel.tensor={cfg.parallel.tensor}; choose a tensor size that divides it")


def find_resume(cfg: Config) -> tuple[Path, str] | None:
    """The checkpoint to start from: the newest good one in checkpoint.dir, else checkpoint.load."""
    tag = newest_good(cfg.checkpoint_dir)
    if tag:
        return cfg.checkpoint_dir, tag
    if cfg.checkpoint.load:
        return resolve(cfg.checkpoint.load, "checkpoint.load")
    return None


def load(engine, cfg: Config, grid: D.Grid, ckpt_dir: Path, tag: str, meta: dict) -> None:
    """Restore weights, Adam moments, LR schedule, engine counters and (same layout) RNG into `engine`,
    whatever layout wrote the checkpoint. `meta` is the checkpoint's meta.json (checked with
    `check_loadable` before the model was built)."""
    where = ckpt_dir / tag
    L, pipelined = cfg.model.num_layers, grid.pipeline > 1
    shards = ShardReader(where, meta)
    opt = OptimizerState(engine)
    opt.prepare(meta["optimizer_step"])
    for name, p in _global_names(engine.module, L, pipelined):
        dim = getattr(p, "partition_dim", None)
        rank, size = (grid.tp_rank, grid.tensor) if dim is not None else (0, 1)
        values = {"": shards.read(name, name, rank, size)}
        for k in MOMENTS:
            values[k] = shards.read(name, f"{k}/{name}", rank, size)
        if values[""].shape != p.shape:
            raise CheckpointError(f"{name} in {where} gives a shard of {tuple(values[''].shape)}, this rank "
                                  f"holds {tuple(p.shape)}")
        opt.set(p, values)
    for name, m in _global_names(engine.module, L, pipelined, modules=True):
        m.set_extra_state(shards.metadata(layer_of(name, L), "extra_state")[name])
    if meta.get("scheduler"):
        sched = engine.lr_scheduler
        sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(sched.lr_lambdas)})
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr  # LambdaLR's load_state_dict leaves the optimizer's lr as it was
    set_engine_counters(engine, meta["engine"])
    set_loss_scaler_state(engine, meta.get("loss_scaler"))
    rng = where / f"rng-{grid.rank:05d}.safetensors"
    if meta["layout"] == _layout(grid, cfg) and rng.is_file():
        from safetensors.torch import load_file

        set_rng_state(load_file(str(rng)))
    else:  # another layout: dropout streams cannot match anyway; a fresh, deterministic one per rank
        seed_dropout(cfg.train.seed, grid.dp_rank, meta["step"])

