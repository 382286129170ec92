"""Checkpoints: DeepSpeed's engine state (weights, ZeRO optimizer shards, LR schedule) plus ours.

Layout of `checkpoint.dir`:
    step_00000100/        one checkpoint (DeepSpeed's files, rng_<rank>.pt, meta.json)
    latest                name of the newest complete checkpoint, replaced atomically
`latest` moves only after every rank has finished writing, so a run killed mid-save still
resumes from the previous checkpoint. meta.json holds the step, the data position, the
resolved config and the git revision: what a resumed or grown run needs to continue.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import distributed as D
from .config import Config, ConfigError

FORMAT_VERSION = 1
# Model fields that fix parameter shapes: a resume must match them (growth goes through expand_params).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "qkv_tokens", "proj_tokens", "ffn_tokens", "norm")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (Path(ckpt_dir) / tag / "meta.json").is_file():
        raise CheckpointError(f"{f} points to {tag}, which has no meta.json; remove {f} to start over or "
                              f"point it at an intact checkpoint directory in {ckpt_dir}")
    return tag


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / "meta.json").read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, cfg: Config, grid: D.Grid, step: int, consumed_samples: int, run_info: dict,
         vocab_size: int) -> Path:
    ckpt_dir = cfg.checkpoint_dir
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_{grid.rank}.pt")
    D.barrier()
    if grid.rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
                "vocab_size": vocab_size, "world_size": grid.world_size,
                "layout": {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data,
                           "zero_stage": cfg.parallel.zero_stage},
                "config": cfg.to_dict(), "run_info": run_info}
        _atomic_write(ckpt_dir / tag / "meta.json", json.dumps(meta, indent=1))
        _atomic_write(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, cfg.checkpoint.keep_last, keep=tag)
    D.barrier()
    return ckpt_dir / tag


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def check_compatible(meta: dict, cfg: Config, where: Path) -> None:
    saved = meta["config"]["model"]
    diff = [f"model.{k}: checkpoint {saved[k]} vs config {getattr(cfg.model, k)}"
            for k in SHAPE_FIELDS if saved[k] != getattr(cfg.model, k)]
    if not diff:
        return
    grown = all(k.split(":")[0].split(".")[1] in ("qkv_tokens", "proj_tokens", "ffn_tokens") for k in diff)
    hint = (" Only token counts differ: grow the checkpoint with tools/expand_params.py and load the result."
            if grown else " Use the config the checkpoint was trained with, or a new checkpoint.dir.")
    raise CheckpointError(f"checkpoint {where} does not match the model config: " + "; ".join(diff) + "." + hint)


def load(engine, cfg: Config, grid: D.Grid, ckpt_dir: Path, tag: str) -> dict:
    """Restore engine state and RNG; returns meta.json (step, consumed_samples, ...)."""
    meta = read_meta(ckpt_dir, tag)
    check_compatible(meta, cfg, ckpt_dir / tag)
    now = {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data, "zero_stage": cfg.parallel.zero_stage}
    if meta["layout"] != now:
        raise CheckpointError(
            f"checkpoint {ckpt_dir / tag} was written with layout {meta['layout']} but this run has {now}; "
            "resume it with the same parallel.tensor, parallel.pipeline, parallel.zero_stage and number of "
            "processes (resharding on resume is not built yet)")
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    rng = ckpt_dir / tag / f"rng_{grid.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_resume(cfg: Config) -> tuple[Path, str] | None:
    """The checkpoint to start from: the newest in checkpoint.dir, else checkpoint.load, else none."""
    own = cfg.checkpoint_dir
    tag = latest_tag(own) if own.is_dir() else None
    if tag:
        return own, tag
    if cfg.checkpoint.load:
        src = Path(cfg.checkpoint.load)
        tag = latest_tag(src) if src.is_dir() else None
        if not tag:
            raise ConfigError(f"checkpoint.load={src} holds no checkpoint (no 'latest' file)")
        return src, tag
    return None
