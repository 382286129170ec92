"""The checkpoint format: file names, layer files, meta.json, and reading any tensor shard."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import atomic_write_text, umask_mode
from ..model import layer_index

# 3: each layer file comes in data-parallel pieces (`layer_LLL-tpTT-dpDD`), each tensor a flat range of
# the tensor shard at an offset, so every data-parallel rank writes its own part. 2: one file per
# layer and tensor shard holding whole shards (still read).
FORMAT_VERSION = 3
READS = (2, 3)
# Model fields that fix parameter shapes: a resume must match them (growth goes through expand_params).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "qkv_tokens", "proj_tokens", "ffn_tokens", "norm")
MOMENTS = ("exp_avg", "exp_avg_sq")
PARTIAL = ".partial"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, written or used here; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def layer_file(layer: int, tp_rank: int, dp_rank: int | None = None) -> str:
    """Format 3 names a data-parallel piece (dp_rank); format 2 had one file per layer and tensor shard."""
    piece = "" if dp_rank is None else f"-dp{dp_rank:02d}"
    return f"layer_{layer:03d}-tp{tp_rank:02d}{piece}.safetensors"


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
    if meta.get("format_version") not in READS:
        raise CheckpointError(f"checkpoint {where} has format version {meta.get('format_version')}; this version "
                              f"reads {' and '.join(map(str, READS))}. Train into a new checkpoint.dir (or "
                              "log.dir), or resume it with the release that wrote it")


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


def write_piece(directory: Path, layer: int, tp_rank: int, dp_rank: int, tensors: dict, offsets: dict,
                shapes: dict, dims: dict, taus: dict) -> Path:
    """One data-parallel piece of a layer file: tensors by key (weights by global name, moments as
    `<moment>/<name>`), each a flat range of the parameter's tensor shard starting at offsets[name].
    Every piece's metadata lists all the layer's parameters (shape of the tensor shard, partition
    dim) and each Pattention's extra state (tau), so any one piece describes the layer."""
    path = directory / layer_file(layer, tp_rank, dp_rank)
    save_safetensors(tensors, path, {"partition_dim": json.dumps(dims), "shape": json.dumps(shapes),
                                     "offset": json.dumps(offsets), "extra_state": json.dumps(taus)})
    return path


class ShardReader:
    """Reads any slice of a parameter's global tensor from the pieces that wrote it (format 3: flat
    ranges by offset, assembled per tensor shard; format 2: whole tensor shards)."""

    def __init__(self, where: Path, meta: dict):
        self.where, self.tensor, self.L = where, meta["layout"]["tensor"], meta["config"]["model"]["num_layers"]
        self.version = meta["format_version"]
        self._files: dict = {}
        self._keys: dict = {}
        self._meta: dict = {}
        self._pieces: dict = {}

    def pieces(self, layer: int, tp: int) -> list:
        """The data-parallel pieces of (layer, tp): their dp ranks (format 2: [None], the one file)."""
        if self.version == 2:
            return [None]
        if (layer, tp) not in self._pieces:
            prefix = f"layer_{layer:03d}-tp{tp:02d}-dp"
            found = sorted(int(p.name[len(prefix):-len(".safetensors")])
                           for p in self.where.glob(prefix + "*.safetensors"))
            if not found:
                raise CheckpointError(f"checkpoint {self.where} has no {layer_file(layer, tp, 0)}")
            self._pieces[layer, tp] = found
        return self._pieces[layer, tp]

    def file(self, layer: int, tp: int, dp: int | None = None):
        from safetensors import safe_open

        key = (layer, tp, dp)
        if key not in self._files:
            path = self.where / layer_file(layer, tp, dp)
            if not path.is_file():
                raise CheckpointError(f"checkpoint {self.where} has no {path.name}")
            try:
                self._files[key] = safe_open(str(path), framework="pt")
                self._keys[key] = set(self._files[key].keys())
            except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
                raise CheckpointError(f"cannot read {path}: {e}") from None
        return self._files[key]

    def _piece_meta(self, layer: int, tp: int, dp, what: str) -> dict:
        if (layer, tp, dp, what) not in self._meta:
            self._meta[layer, tp, dp, what] = json.loads(self.file(layer, tp, dp).metadata()[what])
        return self._meta[layer, tp, dp, what]

    def metadata(self, layer: int, what: str) -> dict:
        """Layer-wide metadata (partition_dim, extra_state; format 3 also shape), from its first piece."""
        return self._piece_meta(layer, 0, self.pieces(layer, 0)[0], what)

    def names(self, layer: int) -> list[str]:
        """The global names of the layer's parameters."""
        return list(self.metadata(layer, "partition_dim"))

    def _shard(self, layer: int, tp: int, name: str, key: str):
        """Tensor shard `tp` of `key`, to index: format 2 a lazy safetensors slice (reads only what is
        indexed), format 3 the shard assembled from its pieces."""
        if self.version == 2:
            self.file(layer, tp)
            if key not in self._keys[layer, tp, None]:
                raise CheckpointError(f"checkpoint {self.where} has no tensor {key} in {layer_file(layer, tp)}")
            return self.file(layer, tp).get_slice(key)
        shape = self._piece_meta(layer, tp, self.pieces(layer, tp)[0], "shape").get(name)
        if shape is None:
            raise CheckpointError(f"checkpoint {self.where} has no parameter {name} in {layer_file(layer, tp, 0)}")
        flat, covered = torch.empty(math.prod(shape)), 0
        for dp in self.pieces(layer, tp):
            f = self.file(layer, tp, dp)
            if key in self._keys[layer, tp, dp]:
                part = f.get_tensor(key)
                start = self._piece_meta(layer, tp, dp, "offset")[name]
                flat[start:start + part.numel()] = part
                covered += part.numel()
        if covered != flat.numel():  # pieces never overlap: a shortfall is a missing piece or tensor
            raise CheckpointError(f"checkpoint {self.where}: the pieces of layer {layer}, tensor shard {tp} hold "
                                  f"{covered} of the {flat.numel()} values of {key}")
        return flat.view(shape)

    def read(self, name: str, key: str, rank: int = 0, size: int = 1) -> torch.Tensor:
        """Slice `rank` of `size` of the global tensor `key` (the weight or a moment of `name`)."""
        layer = layer_of(name, self.L)
        dim = self.metadata(layer, "partition_dim").get(name)
        if dim is None:  # replicated: every tensor shard holds all of it
            shard = self._shard(layer, 0, name, key)
            return self.file(layer, 0).get_tensor(key) if self.version == 2 else shard
        shape = (self._shard(layer, 0, name, key).get_shape() if self.version == 2
                 else self.metadata(layer, "shape")[name])
        n_old = shape[dim]
        n_new = n_old * self.tensor // size
        lo, hi = rank * n_new, (rank + 1) * n_new
        parts = []
        for r in range(self.tensor):  # the old shards overlapping [lo, hi)
            a, b = max(lo, r * n_old), min(hi, (r + 1) * n_old)
            if a < b:
                idx = [slice(None)] * len(shape)
                idx[dim] = slice(a - r * n_old, b - r * n_old)
                parts.append(self._shard(layer, r, name, key)[tuple(idx)])
        return torch.cat(parts, dim)
