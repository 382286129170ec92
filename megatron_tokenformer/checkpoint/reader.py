"""Offline reads: a checkpoint of any layout as global tensors, or as one model on one process."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import config_from_dict
from ..tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from .files import MOMENTS, CheckpointError, ShardReader, check_format, read_meta
from .integrity import resolve


def resolved_dir(path: str | Path) -> Path:
    """The step directory a checkpoint path (a run's checkpoint.dir or one step_*) stands for."""
    ckpt_dir, tag = resolve(path)
    return ckpt_dir / tag


def checkpoint_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a checkpoint carries (saved with it from the training data)."""
    where = resolved_dir(path)
    found = find_tokenizer(where)
    if found is None:
        raise CheckpointError(
            f"checkpoint {where} carries no tokenizer (it was written before checkpoints kept theirs, or "
            f"converted without --tokenizer); copy the tokenizer the model was trained with into {where} "
            "as tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face tokenizers)")
    return load_tokenizer(found)


def global_state(path: str | Path, moments: bool = False) -> tuple[dict, dict, dict]:
    """A checkpoint of any layout as global tensors: (weights by TokenFormerModel name, incl. each
    Pattention's `._extra_state`; Adam moments {"exp_avg": {...}, "exp_avg_sq": {...}} if asked;
    meta.json plus `partition_dims`). Reads safetensors only: nothing is unpickled."""
    ckpt_dir, tag = resolve(path)
    where = ckpt_dir / tag
    meta = read_meta(ckpt_dir, tag)
    check_format(meta, where)
    shards = ShardReader(where, meta)
    state, moms, dims = {}, {k: {} for k in MOMENTS}, {}
    for layer in range(shards.L + 2):
        dims.update(shards.metadata(layer, "partition_dim"))
        for key in shards.names(layer):
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
    from ..model import TokenFormerModel

    state, meta = global_state_dict(path)
    cfg = config_from_dict(meta["config"])
    model = TokenFormerModel(cfg.model, meta["vocab_size"])
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), cfg
