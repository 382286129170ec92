"""Checkpoints: layout-independent, atomic, verified, read without unpickling.

Layout of `checkpoint.dir`:
    step_00000100/            one complete checkpoint
        meta.json             step, data position, optimizer step, LR schedule, engine counters,
                              the resolved config, the tokenizer's sha256, the layout that wrote it
        layer_LLL-tpTT.safetensors   layer LLL (0 embedding, 1..L blocks, L+1 final norm) as held by
                              tensor rank TT: each parameter by its global name (fp32 master weight),
                              its Adam moments as `exp_avg/<name>` and `exp_avg_sq/<name>`, and in the
                              file metadata each Pattention's tau and each parameter's partition dim
        rng-RRRRR.safetensors the RNG state of global rank RRRRR (restored when the layout is the same)
        manifest.json         size and sha256 of every file
    step_00000200.partial/    one being written (never loaded)
    latest                    name of the newest complete checkpoint (informational; resume scans)

Nothing in a checkpoint depends on the data-parallel size, the ZeRO stage or the pipeline cut:
a parameter's shard is re-sliced from the tensor shards on load (DESIGN.md section 6), so a run
saved at (tensor a, pipeline b, data c, ZeRO z) resumes at any other layout with its weights,
Adam moments, step, LR schedule and data position. At the same layout it continues bit-exactly.

A checkpoint is written into `<tag>.partial`, every file fsynced, then renamed to `<tag>` and
`latest` replaced, all after every rank has finished: a kill at any moment leaves the previous
checkpoint whole. Resume takes the newest checkpoint whose manifest verifies and names any
broken one it skips.
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

FORMAT_VERSION = 2
# Model fields that fix parameter shapes: a resume must match them (growth goes through expand_params).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "qkv_tokens", "proj_tokens", "ffn_tokens", "norm")
TOKEN_FIELDS = ("qkv_tokens", "proj_tokens", "ffn_tokens")
MOMENTS = ("exp_avg", "exp_avg_sq")
PARTIAL = ".partial"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:03d}-tp{tp_rank:02d}.safetensors"


def layer_of(name: str, num_layers: int) -> int:
    """Pipeline layer index of a global parameter name: 0 embedding, 1..L blocks, L+1 final norm."""
    head, _, rest = name.partition(".")
    if head == "embed":
        return 0
    if head == "blocks":
        return int(rest.split(".")[0]) + 1
    if head == "final_norm":
        return num_layers + 1
    raise CheckpointError(f"parameter {name!r} belongs to no TokenFormer layer")


def global_name(local: str, num_layers: int, pipelined: bool) -> str:
    """TokenFormerModel's name for a parameter of this rank's module (a PipelineModule names its
    layers by index and keeps the tied embedding under tied_modules)."""
    if not pipelined:
        return local
    if local.startswith("tied_modules.embed."):
        return "embed." + local.removeprefix("tied_modules.embed.")
    idx, rest = local.split(".", 1)
    idx = int(idx)
    return ("embed." if idx == 0 else f"blocks.{idx - 1}." if idx <= num_layers else "final_norm.") + rest


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


# ---- the optimizer's view of each parameter ----------------------------------------------------

class OptimizerState:
    """Each parameter's fp32 master weight and Adam moments, whichever optimizer DeepSpeed built:
    torch's AdamW itself (ZeRO-0 in fp32), or ZeRO-1/2 / bf16 flat partitions over data parallel,
    read and written through DeepSpeed's per-parameter accessors (collectives over data parallel:
    every rank of a data-parallel group calls them in the same order)."""

    def __init__(self, engine):
        self.opt = engine.optimizer
        self.base = getattr(self.opt, "optimizer", self.opt)  # the torch optimizer holding the state
        self.have_state = any(self.base.state.values())  # torch creates it at the first step

    def step(self) -> int:
        for st in self.base.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def get(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(p, "_hp_mapping"):
            out = {"": safe_get_full_fp32_param(p)}
            for k in MOMENTS:
                out[k] = safe_get_full_optimizer_state(p, k) if self.have_state else torch.zeros_like(out[""])
        else:
            if p.dtype != torch.float32:  # never save a rounded copy as the master weights
                raise CheckpointError(f"{type(self.opt).__name__} keeps the fp32 master weights where checkpoints "
                                      "cannot read them per parameter; use parallel.zero_stage>=1")
            st = self.base.state.get(p, {})
            out = {"": p.detach().float(), **{k: st[k] if k in st else torch.zeros_like(p, dtype=torch.float32)
                                               for k in MOMENTS}}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def prepare(self, step: int) -> None:
        """Create the Adam state torch creates lazily at the first step, with `step` as its count."""
        for group in self.base.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for q in group["params"]:
                st = self.base.state[q]
                for k in MOMENTS:
                    st.setdefault(k, torch.zeros_like(q, memory_format=torch.preserve_format))
                st["step"] = torch.tensor(float(step), dtype=torch.float32, device=q.device if on_device else "cpu")
        link = getattr(self.opt, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 / bf16: point each parameter's fragments at the new state
            link()

    def set(self, p: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        with torch.no_grad():
            p.data.copy_(values[""].to(p.device, p.dtype))  # the working copy (bf16 = round(master))
            if hasattr(p, "_hp_mapping"):
                safe_set_full_fp32_param(p, values[""].to(p.device))
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, values[k].to(p.device), k)
            else:
                for k in MOMENTS:
                    self.base.state[p][k].copy_(values[k].to(p.device))


def _local_params(module: torch.nn.Module, num_layers: int, pipelined: bool):
    """(global name, parameter) for each parameter this rank holds."""
    return [(global_name(n, num_layers, pipelined), p) for n, p in module.named_parameters()]


def _extra_states(module: torch.nn.Module, num_layers: int, pipelined: bool) -> dict[str, dict]:
    """Each Pattention's tau by its global module name."""
    from .pattention import Pattention

    return {global_name(n, num_layers, pipelined): m.get_extra_state()
            for n, m in module.named_modules() if isinstance(m, Pattention)}


# ---- save ---------------------------------------------------------------------------------

def save(engine, cfg: Config, grid: D.Grid, step: int, consumed_samples: int, run_info: dict,
         vocab_size: int, tokenizer_sha256: str, extra_meta: dict | None = None) -> Path:
    ckpt_dir = cfg.checkpoint_dir
    tag = tag_for(step)
    tmp = ckpt_dir / (tag + PARTIAL)
    L, pipelined = cfg.model.num_layers, grid.pipeline > 1
    try:
        if grid.rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this step
            tmp.mkdir()
        D.barrier()
        opt = OptimizerState(engine)
        writer = grid.dp_rank == 0
        by_layer: dict[int, list] = {}
        for name, p in _local_params(engine.module, L, pipelined):
            if pipelined and name.startswith("embed.") and grid.pp_rank > 0:
                continue  # the tied head's copy of the embedding: the first stage writes it
            by_layer.setdefault(layer_of(name, L), []).append((name, p))
        extra = _extra_states(engine.module, L, pipelined)
        for layer, params in by_layer.items():  # one layer at a time: bounded host memory
            tensors, dims = {}, {}
            for name, p in params:
                for k, v in opt.get(p).items():  # a collective over data parallel
                    tensors[f"{k}/{name}" if k else name] = v
                dims[name] = getattr(p, "partition_dim", None)
            if writer:
                taus = {m: s for m, s in extra.items() if layer_of(m, L) == layer}
                write_layer(tmp, layer, grid.tp_rank, tensors, dims, taus)
        _save_safetensors(_rng_state(), tmp / f"rng-{grid.rank:05d}.safetensors", {})
        D.barrier()
        if grid.rank == 0:
            sched = engine.lr_scheduler.state_dict()
            meta = {"format_version": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
                    "optimizer_step": opt.step(), "vocab_size": vocab_size, "tokenizer_sha256": tokenizer_sha256,
                    "scheduler": {k: v for k, v in sched.items() if k != "lr_lambdas"},
                    "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                               "skipped_steps": engine.skipped_steps},
                    "loss_scaler": _loss_scaler_state(engine),
                    "world_size": grid.world_size,
                    "layout": {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data,
                               "zero_stage": cfg.parallel.zero_stage},
                    "config": cfg.to_dict(), "run_info": run_info, **(extra_meta or {})}
            write_meta(tmp, meta)
            write_manifest(tmp)
            if (ckpt_dir / tag).exists():  # the same step saved again (a resumed run): replace it
                shutil.rmtree(ckpt_dir / tag)
            os.replace(tmp, ckpt_dir / tag)
            _fsync(ckpt_dir)
            _atomic_write(ckpt_dir / "latest", tag)
            _prune(ckpt_dir, cfg.checkpoint.keep_last, keep=tag)
    except (OSError, RuntimeError) as e:  # torch's and safetensors' writers report a full disk as RuntimeError
        raise CheckpointError(f"could not write checkpoint {ckpt_dir / tag}: {e}. The previous checkpoint in "
                              f"{ckpt_dir} is untouched; free space or fix permissions (checkpoint.dir) and "
                              "rerun to resume from it") from None
    D.barrier()
    return ckpt_dir / tag


def _save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    except SafetensorError as e:  # a full disk or a file-size limit, reported by the Rust writer
        raise OSError(str(e)) from None


def write_layer(directory: Path, layer: int, tp_rank: int, tensors: dict, dims: dict, taus: dict) -> None:
    """One layer file: tensors by key (weights by global name, moments as `<moment>/<name>`), and in
    its metadata each parameter's partition dim and each Pattention's extra state (tau)."""
    _save_safetensors(tensors, directory / layer_file(layer, tp_rank),
                      {"partition_dim": json.dumps(dims), "extra_state": json.dumps(taus)})


def write_meta(directory: Path, meta: dict) -> None:
    _atomic_write(directory / "meta.json", json.dumps(meta, indent=1))


def write_manifest(path: Path) -> None:
    """fsync every file of a checkpoint directory and list its size and sha256 in manifest.json."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"):
        _fsync(f)
        files[str(f.relative_to(path))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    _atomic_write(path / "manifest.json", json.dumps({"files": files}, indent=1))
    _fsync(path)


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


def check_compatible(meta: dict, model_cfg, where: Path) -> None:
    saved = meta["config"]["model"]
    diff = [f"model.{k}: checkpoint {saved[k]} vs config {getattr(model_cfg, k)}"
            for k in SHAPE_FIELDS if saved[k] != getattr(model_cfg, k)]
    if not diff:
        return
    grown = all(k.split(":")[0].split(".")[1] in TOKEN_FIELDS for k in diff)
    hint = (" Only token counts differ: grow the checkpoint with tools/expand_params.py and load the result."
            if grown else " Use the config the checkpoint was trained with, or a new checkpoint.dir.")
    raise CheckpointError(f"checkpoint {where} does not match the model config: " + "; ".join(diff) + "." + hint)


def _check_format(meta: dict, where: Path) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where} has format version {meta.get('format_version')}; this version "
                              f"reads {FORMAT_VERSION}. Train into a new checkpoint.dir (or log.dir), or resume it "
                              "with the release that wrote it")


def check_loadable(meta: dict, cfg: Config, model_cfg, where: Path, tokenizer_sha256: str) -> None:
    """Everything that can be checked before building the model: tokenizer, shapes, vocab split."""
    _check_format(meta, where)
    if meta.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise CheckpointError(
            f"checkpoint {where} was trained with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}) "
            f"than the data in data.path={cfg.data.path} (sha256 {tokenizer_sha256[:12]}); point data.path at "
            "the data the run was trained on, or start a new checkpoint.dir")
    check_compatible(meta, model_cfg, where)
    if meta["vocab_size"] % cfg.parallel.tensor:
        raise CheckpointError(f"checkpoint {where} has a vocab of {meta['vocab_size']} rows, which does not split "
                              f"over parallel.tensor={cfg.parallel.tensor}; choose a tensor size that divides it")


# ---- load ---------------------------------------------------------------------------------

class _Shards:
    """Reads any slice of a parameter's global tensor from the tensor shards that wrote it."""

    def __init__(self, where: Path, meta: dict):
        self.where, self.tensor, self.L = where, meta["layout"]["tensor"], meta["config"]["model"]["num_layers"]
        self._files: dict = {}
        self._keys: dict = {}
        self._meta: dict = {}

    def file(self, layer: int, tp: int):
        from safetensors import safe_open

        key = (layer, tp)
        if key not in self._files:
            path = self.where / layer_file(layer, tp)
            if not path.is_file():
                raise CheckpointError(f"checkpoint {self.where} has no {path.name}")
            try:
                self._files[key] = safe_open(str(path), framework="pt")
                self._keys[key] = set(self._files[key].keys())
            except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
                raise CheckpointError(f"cannot read {path}: {e}") from None
        return self._files[key]

    def metadata(self, layer: int, what: str) -> dict:
        if (layer, what) not in self._meta:
            self._meta[layer, what] = json.loads(self.file(layer, 0).metadata()[what])
        return self._meta[layer, what]

    def read(self, name: str, key: str, rank: int = 0, size: int = 1) -> torch.Tensor:
        """Slice `rank` of `size` of the global tensor `key` (the weight or a moment of `name`)."""
        layer = layer_of(name, self.L)
        self.file(layer, 0)
        if key not in self._keys[layer, 0]:
            raise CheckpointError(f"checkpoint {self.where} has no tensor {key} in {layer_file(layer, 0)}")
        dim = self.metadata(layer, "partition_dim").get(name)
        if dim is None:
            return self.file(layer, 0).get_tensor(key)
        n_old = self.file(layer, 0).get_slice(key).get_shape()[dim]
        n_new = n_old * self.tensor // size
        lo, hi = rank * n_new, (rank + 1) * n_new
        parts = []
        for r in range(self.tensor):  # the old shards overlapping [lo, hi)
            a, b = max(lo, r * n_old), min(hi, (r + 1) * n_old)
            if a < b:
                sl = self.file(layer, r).get_slice(key)
                idx = [slice(None)] * len(sl.get_shape())
                idx[dim] = slice(a - r * n_old, b - r * n_old)
                parts.append(sl[tuple(idx)])
        return torch.cat(parts, dim)


def load(engine, cfg: Config, grid: D.Grid, ckpt_dir: Path, tag: str, meta: dict) -> None:
    """Restore weights, Adam moments, LR schedule, engine counters and (same layout) RNG into `engine`,
    whatever layout wrote the checkpoint. `meta` is the checkpoint's meta.json (checked with
    `check_loadable` before the model was built)."""
    where = ckpt_dir / tag
    L, pipelined = cfg.model.num_layers, grid.pipeline > 1
    shards = _Shards(where, meta)
    opt = OptimizerState(engine)
    opt.prepare(meta["optimizer_step"])
    for name, p in _local_params(engine.module, L, pipelined):
        dim = getattr(p, "partition_dim", None)
        rank, size = (grid.tp_rank, grid.tensor) if dim is not None else (0, 1)
        values = {"": shards.read(name, name, rank, size)}
        for k in MOMENTS:
            values[k] = shards.read(name, f"{k}/{name}", rank, size)
        if values[""].shape != p.shape:
            raise CheckpointError(f"{name} in {where} gives a shard of {tuple(values[''].shape)}, this rank "
                                  f"holds {tuple(p.shape)}")
        opt.set(p, values)
    from .pattention import Pattention

    for n, m in engine.module.named_modules():
        if isinstance(m, Pattention):
            gname = global_name(n, L, pipelined)
            m.set_extra_state(shards.metadata(layer_of(gname, L), "extra_state")[gname])
    if meta.get("scheduler"):
        sched = engine.lr_scheduler
        sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(sched.lr_lambdas)})
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr  # LambdaLR's load_state_dict leaves the optimizer's lr as it was
    for k, v in meta["engine"].items():
        setattr(engine, k, v)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if getattr(scaler, "dynamic", False):  # fp16's dynamic loss scale goes on where it was
        for k, v in (meta.get("loss_scaler") or {}).items():
            setattr(scaler, k, v)
    same = meta["layout"] == {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data,
                              "zero_stage": cfg.parallel.zero_stage}
    rng = where / f"rng-{grid.rank:05d}.safetensors"
    if same and rng.is_file():
        from safetensors.torch import load_file

        _set_rng_state(load_file(str(rng)))
    else:  # another layout: dropout streams cannot match anyway; a fresh, deterministic one per rank
        torch.manual_seed(cfg.train.seed + 1 + grid.dp_rank + 1000003 * meta["step"])


_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler_state(engine) -> dict:
    """fp16's dynamic loss scale (empty for a static scaler or none: nothing to carry)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    out = {}
    if not getattr(scaler, "dynamic", False):
        return out
    for k in _SCALER_FIELDS:
        v = getattr(scaler, k, None)
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, (int, float)):
            out[k] = v
    return out


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
        if (src / "meta.json").is_file():  # one step_* directory
            problem = verify(src)
            if problem:
                raise ConfigError(f"checkpoint.load={src} is damaged: {problem}")
            return src.parent, src.name
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
    tag = newest_good(path) if path.is_dir() else None
    if tag is None:
        raise CheckpointError(f"{path} is not a checkpoint: no step_*/ directory with meta.json and an intact "
                              "manifest.json (point at checkpoint.dir or one step_* inside it)")
    return path, tag


def global_state(path: str | Path, moments: bool = False) -> tuple[dict, dict, dict]:
    """A checkpoint of any layout as global tensors: (weights by TokenFormerModel name, incl. each
    Pattention's `._extra_state`; Adam moments {"exp_avg": {...}, "exp_avg_sq": {...}} if asked;
    meta.json plus `partition_dims`). Reads safetensors only: nothing is unpickled."""
    ckpt_dir, tag = resolve(path)
    where = ckpt_dir / tag
    problem = verify(where)
    if problem:
        raise CheckpointError(f"checkpoint {where} is damaged: {problem}")
    meta = read_meta(ckpt_dir, tag)
    _check_format(meta, where)
    shards = _Shards(where, meta)
    L = shards.L
    state, moms, dims = {}, {k: {} for k in MOMENTS}, {}
    for layer in range(L + 2):
        f = shards.file(layer, 0)
        dims.update(shards.metadata(layer, "partition_dim"))
        for key in f.keys():
            if "/" in key:
                continue
            state[key] = shards.read(key, key)
            if moments:
                for k in MOMENTS:
                    moms[k][key] = shards.read(key, f"{k}/{key}")
        for m, extra in shards.metadata(layer, "extra_state").items():
            state[m + "._extra_state"] = extra
    meta["partition_dims"] = dims  # which dim tensor parallelism splits, per parameter (None: replicated)
    return state, (moms if moments else {}), meta


def global_state_dict(path: str | Path) -> tuple[dict, dict]:
    """Full model weights by global name, from a checkpoint of any layout: (state_dict, meta)."""
    state, _, meta = global_state(path)
    return state, meta


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The trained model on one process (CPU or one GPU), whatever layout wrote the checkpoint.

    Returns (TokenFormerModel in eval mode, Config)."""
    from .model import TokenFormerModel

    state, meta = global_state_dict(path)
    cfg = config_from_dict(meta["config"])
    model = TokenFormerModel(cfg.model, meta["vocab_size"])
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), cfg
