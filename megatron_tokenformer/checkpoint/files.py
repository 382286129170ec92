"""The checkpoint format: file names, layer files, meta.json, and reading any tensor shard."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import atomic_write_text, umask_mode
from ..model import layer_index

FORMAT_VERSION = 2
# Model fields that fix parameter shapes: a resume must match them (growth goes through expand_params).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "qkv_tokens", "proj_tokens", "ffn_tokens", "norm")
MOMENTS = ("exp_avg", "exp_avg_sq")
PARTIAL = ".partial"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, written or used here; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:03d}-tp{tp_rank:02d}.safetensors"


def layer_of(name: str, num_layers: int) -> int:
    """The layer file index of a global parameter (or module) name."""
    try:
        return layer_index(name, num_layers)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / "meta.json").read_text())


def write_meta(directory: Path, meta: dict) -> None:
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=1))


def check_format(meta: dict, where: Path) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where} has format version {meta.get('format_version')}; this version "
                              f"reads {FORMAT_VERSION}. Train into a new checkpoint.dir (or log.dir), or resume it "
                              "with the release that wrote it")


def save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors' writer, with a full disk reported as OSError and the file given the ordinary
    mode (it creates files 0600)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    except SafetensorError as e:  # a full disk or a file-size limit, reported by the Rust writer
        raise OSError(str(e)) from None
    path.chmod(umask_mode())


def write_layer(directory: Path, layer: int, tp_rank: int, tensors: dict, dims: dict, taus: dict) -> None:
    """One layer file: tensors by key (weights by global name, moments as `<moment>/<name>`), and in
    its metadata each parameter's partition dim and each Pattention's extra state (tau)."""
    save_safetensors(tensors, directory / layer_file(layer, tp_rank),
                     {"partition_dim": json.dumps(dims), "extra_state": json.dumps(taus)})


class ShardReader:
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
