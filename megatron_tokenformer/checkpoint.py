"""Checkpoints: DeepSpeed's engine state (weights, ZeRO optimizer shards, LR schedule) plus ours.

Layout of `checkpoint.dir`:
    step_00000100/        one complete checkpoint: DeepSpeed's files, rng_<rank>.pt, meta.json,
                          manifest.json (size and sha256 of every file)
    step_00000200.partial/  one being written (never loaded)
    latest                name of the newest complete checkpoint (informational; resume scans)
A checkpoint is written into `<tag>.partial`, every file fsynced, then renamed to `<tag>` and
`latest` replaced, all after every rank has finished: a run killed at any moment leaves the
previous checkpoint whole. Resume takes the newest checkpoint whose manifest verifies and names
any broken one it skips. meta.json holds the step, the data position, the resolved config and
the git revision; `global_state_dict` reads the weights back by global name whatever layout
wrote them (for `load_model`, export and growth).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from . import distributed as D
from .config import Config, ConfigError, config_from_dict

FORMAT_VERSION = 1
# Model fields that fix parameter shapes: a resume must match them (growth goes through expand_params).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "qkv_tokens", "proj_tokens", "ffn_tokens", "norm")
PARTIAL = ".partial"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / "meta.json").read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(path: Path) -> str | None:
    """None if the checkpoint directory is complete and intact, else what is wrong with it."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (an incomplete or foreign checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
        if _sha256(f) != entry["sha256"]:
            return f"{name} does not match its checksum in manifest.json (corrupted)"
    return None


def save(engine, cfg: Config, grid: D.Grid, step: int, consumed_samples: int, run_info: dict,
         vocab_size: int, tokenizer_sha256: str) -> Path:
    ckpt_dir = cfg.checkpoint_dir
    tag = tag_for(step)
    tmp = ckpt_dir / (tag + PARTIAL)
    try:
        if grid.rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this step
        D.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)
        torch.save(_rng_state(), tmp / f"rng_{grid.rank}.pt")
        D.barrier()
        if grid.rank == 0:
            meta = {"format_version": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
                    "vocab_size": vocab_size, "tokenizer_sha256": tokenizer_sha256, "world_size": grid.world_size,
                    "layout": {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data,
                               "zero_stage": cfg.parallel.zero_stage},
                    "config": cfg.to_dict(), "run_info": run_info}
            _atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                _fsync(f)
                files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
            _atomic_write(tmp / "manifest.json", json.dumps({"files": files}, indent=1))
            _fsync(tmp)
            if (ckpt_dir / tag).exists():  # the same step saved again (a resumed run): replace it
                shutil.rmtree(ckpt_dir / tag)
            os.replace(tmp, ckpt_dir / tag)
            _fsync(ckpt_dir)
            _atomic_write(ckpt_dir / "latest", tag)
            _prune(ckpt_dir, cfg.checkpoint.keep_last, keep=tag)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as RuntimeError
        raise CheckpointError(f"could not write checkpoint {ckpt_dir / tag}: {e}. The previous checkpoint in "
                              f"{ckpt_dir} is untouched; free space or fix permissions (checkpoint.dir) and "
                              "rerun to resume from it") from None
    D.barrier()
    return ckpt_dir / tag


def _complete_tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(PARTIAL))


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Delete older checkpoints beyond keep_last (never `keep`, the one just written and verified)."""
    for p in ckpt_dir.iterdir():
        if p.name.endswith(PARTIAL):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return
    for old in _complete_tags(ckpt_dir)[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def newest_good(ckpt_dir: Path) -> str | None:
    """The newest checkpoint in ckpt_dir that verifies; warns naming each broken one it skips."""
    if not Path(ckpt_dir).is_dir():
        return None
    for tag in reversed(_complete_tags(Path(ckpt_dir))):
        problem = verify(Path(ckpt_dir) / tag)
        if problem is None:
            return tag
        warnings.warn(f"skipping checkpoint {Path(ckpt_dir) / tag}: {problem}", stacklevel=2)
    return None


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


def load(engine, cfg: Config, grid: D.Grid, ckpt_dir: Path, tag: str, tokenizer_sha256: str) -> dict:
    """Restore engine state and RNG; returns meta.json (step, consumed_samples, ...)."""
    meta = read_meta(ckpt_dir, tag)
    if meta.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise CheckpointError(
            f"checkpoint {ckpt_dir / tag} was trained with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}) "
            f"than the data in data.path={cfg.data.path} (sha256 {tokenizer_sha256[:12]}); point data.path at "
            "the data the run was trained on, or start a new checkpoint.dir")
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
    """The checkpoint to start from: the newest good one in checkpoint.dir, else checkpoint.load."""
    tag = newest_good(cfg.checkpoint_dir)
    if tag:
        return cfg.checkpoint_dir, tag
    if cfg.checkpoint.load:
        src = Path(cfg.checkpoint.load)
        tag = newest_good(src)
        if not tag:
            raise ConfigError(f"checkpoint.load={src} holds no intact checkpoint (step_*/ with a manifest)")
        return src, tag
    return None


# ---- layout-independent reading --------------------------------------------------------------

def resolve(path: str | Path) -> tuple[Path, str]:
    """A checkpoint directory (newest good one inside) or one step_* directory -> (dir, tag)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path.parent, path.name
    tag = newest_good(path)
    if tag is None:
        raise CheckpointError(f"{path} is not a checkpoint: no step_*/ directory with meta.json and an intact "
                              "manifest.json (point at checkpoint.dir or one step_* inside it)")
    return path, tag


def _shard_dim(name: str, t: torch.Tensor) -> int | None:
    """Which dim tensor parallelism splits: the token dim of Pattention tokens, the vocab of the embedding."""
    if name.endswith(("key_tokens", "value_tokens")):
        return t.dim() - 2
    if name == "embed.weight":
        return 0
    return None


def global_state_dict(path: str | Path) -> tuple[dict, dict]:
    """Full model weights by global name (TokenFormerModel's), from a checkpoint of any layout,
    read without unpickling arbitrary objects. Returns (state_dict incl. extra states, meta)."""
    ckpt_dir, tag = resolve(path)
    where = ckpt_dir / tag
    problem = verify(where)
    if problem:
        raise CheckpointError(f"checkpoint {where} is damaged: {problem}")
    meta = read_meta(ckpt_dir, tag)
    L, T, P = meta["config"]["model"]["num_layers"], meta["layout"]["tensor"], meta["layout"]["pipeline"]

    def load(f: Path) -> dict:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CheckpointError(f"cannot read {f}: {e}") from None

    shards: list[dict] = []
    for tp in range(T):
        if P == 1:
            shards.append(load(where / f"mp_rank_{tp:02d}_model_states.pt")["module"])
            continue
        sd = {}
        for idx in range(L + 2):  # embedding, blocks, final norm (the tied head is the embedding)
            prefix = "embed." if idx == 0 else f"blocks.{idx - 1}." if idx <= L else "final_norm."
            for k, v in load(where / f"layer_{idx:02d}-model_{tp:02d}-model_states.pt").items():
                sd[prefix + k] = v
        shards.append(sd)
    state = {}
    for name, first in shards[0].items():
        dim = _shard_dim(name, first) if isinstance(first, torch.Tensor) else None
        state[name] = torch.cat([s[name] for s in shards], dim=dim) if dim is not None and T > 1 else first
    return state, meta


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The trained model on one process (CPU or one GPU), whatever layout wrote the checkpoint.

    Returns (TokenFormerModel in eval mode, Config)."""
    from .model import TokenFormerModel

    state, meta = global_state_dict(path)
    cfg = config_from_dict(meta["config"])
    model = TokenFormerModel(cfg.model, meta["vocab_size"])
    model.load_state_dict({k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval(), cfg
