"""Growth on global tensors: a checkpoint in, a grown checkpoint out (tools/expand_params.py).

Growth happens on global tensors (DESIGN.md section 2), then the result is written in the usual
checkpoint format and resharded on load like any checkpoint:
    K' = [K_0; K_0new; K_1; K_1new; ...]   new tokens spread evenly over the T tensor shards of
    V' = [V_0; V_0new; V_1; V_1new; ...]   the source, so every shard grows by the same amount
With new keys zero, a new token's score is 0, gelu(0) = 0 adds nothing to the row norm, and with
tau (a stored per-layer constant) kept, the function is unchanged. New values from the value init
make them trainable: their keys get gradients at the first step (then their values, once the keys
are non-zero); zero values with zero keys would leave them dead. For the softmax variant no finite
key gives a token zero weight, so growth there is not exact (the tool says so).
Adam moments of the old tokens are carried, zero for the new ones, and the step count kept.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..checkpoint.files import FORMAT_VERSION, PARTIAL, layer_of, tag_for, write_meta, write_piece
from ..checkpoint.integrity import commit, staging
from ..checkpoint.reader import global_state, resolved_dir
from ..config import TOKEN_KEYS, ModelConfig, config_from_dict
from ..errors import UserError
from ..pattention import default_tau
from ..tokenizer import find_tokenizer, store_tokenizer

KEY_INITS, VALUE_INITS, TAUS = ("zero", "normal"), ("normal", "zero"), ("keep", "sqrt-n")
FIELD = {"qkv": "qkv_tokens", "proj": "proj_tokens", "ffn": "ffn_tokens"}  # Pattention module -> config key


class GrowthError(UserError, ValueError):
    """A growth that cannot be done; the message names the option to change."""


@dataclasses.dataclass
class GrowthOptions:
    key_init: str = "zero"
    """New keys: zero (exact) or normal(model.init_std) (the reference code; changes the function)."""
    value_init: str = "normal"
    """New values: the model's value init (exact, trainable) or zero (dead with zero keys)."""
    tau: str = "keep"
    """keep (exact) or sqrt-n: the reference scale for the new token count (changes the function)."""
    reset_optimizer: bool = False
    """Zero all Adam moments and the step count (the reference behaviour) instead of carrying them."""
    seed: int | None = None
    """Seed of the new tokens' init (None: train.seed + step of the source)."""
    freeze_old_steps: int = 0
    """Keep the old tokens (weights and Adam moments) fixed for this many steps of the grown run:
    recorded as meta.json's `freeze_old` (growth/freeze.py), which the run started from it obeys."""

    def warnings(self, norm: str = "l2_norm_gelu") -> list[str]:
        out = []
        if norm == "softmax":
            out.append("model.norm=softmax: appended tokens (score 0, weight exp(0)) take a share of every "
                       "row's softmax mass, so the grown model's output differs; growth is exact only for "
                       "the l2_norm_gelu and gelu_l2_norm variants")
        if self.key_init != "zero":
            out.append("key_init=normal changes the model's function: the grown model's output differs")
        if self.tau != "keep":
            out.append("tau=sqrt-n rescales the old scores: the grown model's output differs")
        if self.key_init == "zero" and self.value_init == "zero":
            out.append("zero keys and zero values leave the new tokens without gradient: they never train")
        return out


def _pattention_modules(state: dict) -> list[str]:
    return sorted(k.removesuffix(".key_tokens") for k in state if k.endswith(".key_tokens"))


def grow(state: dict, moments: dict, model: ModelConfig, new_model: ModelConfig, shards: int,
         opts: GrowthOptions, seed: int) -> tuple[dict, dict]:
    """Global weights (with `._extra_state` taus) and Adam moments of `model` -> those of `new_model`,
    the new tokens spread over `shards` tensor shards."""
    for key in TOKEN_KEYS:
        old, new = getattr(model, key), getattr(new_model, key)
        if new < old:
            raise GrowthError(f"{key}: {old} -> {new} would shrink the model; growth only appends tokens")
        if new % shards:
            raise GrowthError(f"{key}={new} does not split over the source's {shards} tensor shards; choose a "
                              f"multiple of {shards}")
    state, moments = dict(state), {k: dict(v) for k, v in moments.items()}
    value_std = 2.0 / (model.num_layers * math.sqrt(model.hidden_size))  # the model's value init
    gen = torch.Generator().manual_seed(seed)
    for module in _pattention_modules(state):
        n_new = getattr(new_model, FIELD[module.rsplit(".", 1)[1]])
        k_name, v_name = module + ".key_tokens", module + ".value_tokens"
        K, V = state[k_name], state[v_name]
        dim = K.dim() - 2
        add = (n_new - K.shape[dim]) // shards
        if add == 0:
            continue

        def fresh(like: torch.Tensor, how: str, std: float) -> torch.Tensor:
            shape = list(like.shape)
            shape[dim] = add * shards
            t = torch.zeros(shape, dtype=like.dtype)
            return t.normal_(std=std, generator=gen) if how == "normal" else t

        def spread(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            pieces = [p for pair in zip(old.chunk(shards, dim), new.chunk(shards, dim)) for p in pair]
            return torch.cat(pieces, dim)

        state[k_name] = spread(K, fresh(K, opts.key_init, model.init_std))
        state[v_name] = spread(V, fresh(V, opts.value_init, value_std))
        for m in moments.values():
            for name in (k_name, v_name):
                m[name] = spread(m[name], fresh(m[name], "zero", 0.0))
        if opts.tau == "sqrt-n":
            state[module + "._extra_state"] = {"tau": default_tau(model.norm, n_new)}
    if opts.reset_optimizer:
        moments = {k: {n: torch.zeros_like(t) for n, t in m.items()} for k, m in moments.items()}
    return state, moments


def count_params(state: dict) -> int:
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))


def write(state: dict, moments: dict, meta: dict, dims: dict, dst: Path, tokenizer: Path | None = None) -> None:
    """Write global tensors as a checkpoint in `dst` (a step_* directory) at meta's tensor size,
    atomically: into dst.partial, manifest, rename. `tokenizer`: a file the checkpoint carries."""
    T, L = meta["layout"]["tensor"], meta["config"]["model"]["num_layers"]
    tmp = staging(dst)
    by_layer: dict[int, list[str]] = {}
    for name, t in state.items():
        if isinstance(t, torch.Tensor):
            by_layer.setdefault(layer_of(name, L), []).append(name)
    for layer, names in sorted(by_layer.items()):
        taus = {k.removesuffix("._extra_state"): v for k, v in state.items()
                if k.endswith("._extra_state") and layer_of(k, L) == layer}
        layer_dims = {n: dims.get(n) for n in names}
        for tp in range(T):  # one data-parallel piece per tensor shard: each tensor whole, at offset 0
            tensors, shapes = {}, {}
            for name in names:
                for prefix, src in (("", state), *((f"{k}/", m) for k, m in moments.items())):
                    t, d = src[name], layer_dims[name]
                    shard = t.chunk(T, d)[tp] if d is not None else t
                    shapes[name] = list(shard.shape)
                    tensors[prefix + name] = shard.contiguous().reshape(-1)
            write_piece(tmp, layer, tp, 0, tensors, dict.fromkeys(names, 0), shapes, layer_dims, taus)
    if tokenizer is not None:
        meta = {**meta, "tokenizer": store_tokenizer(tokenizer, tmp)}
    write_meta(tmp, meta)
    commit(tmp, dst)


def expand_checkpoint(src: str | Path, dst: str | Path, counts: dict[str, int], opts: GrowthOptions,
                      tag: str | None = None) -> tuple[Path, dict]:
    """Grow the checkpoint at `src` (a checkpoint dir or one step_* in it) to the token `counts`
    ({qkv_tokens: N, ...}; missing keys unchanged) and write it as `dst`/<tag> (default: the source's
    step tag). Returns (the new step directory, its lineage entry). The source is only read."""
    if opts.freeze_old_steps < 0:
        raise GrowthError(f"--freeze-old-steps={opts.freeze_old_steps} must be >= 0")
    state, moments, meta = global_state(src, moments=True)
    old_cfg = config_from_dict(meta["config"])
    model = old_cfg.model
    new_model = dataclasses.replace(model, **{k: v for k, v in counts.items() if v is not None})
    if new_model == model:
        raise GrowthError("the new token counts equal the source's; give larger --qkv-tokens, --proj-tokens, "
                          "--ffn-tokens or --scale")
    T = meta["layout"]["tensor"]
    seed = opts.seed if opts.seed is not None else old_cfg.train.seed + meta["step"]
    new_state, new_moments = grow(state, moments, model, new_model, T, opts, seed)
    dst = Path(dst) / (tag or tag_for(meta["step"]))
    if dst.exists() or dst.with_name(dst.name + PARTIAL).exists():
        raise GrowthError(f"{dst} already exists; choose a new --save directory (nothing was written)")
    entry = {"parent_run": meta["run_info"].get("wandb_id"), "parent_name": old_cfg.log.run_name,
             "source": str(Path(src).resolve()), "step": meta["step"],
             "tokens_before": {k: getattr(model, k) for k in TOKEN_KEYS},
             "tokens_after": {k: getattr(new_model, k) for k in TOKEN_KEYS},
             "params_before": count_params(state), "params_after": count_params(new_state),
             "shards": T,  # the new tokens' places in the global order (observe.stage_labels reads it)
             "options": dataclasses.asdict(opts) | {"seed": seed}}
    new_meta = dict(meta)
    new_meta["config"] = {**meta["config"], "model": dataclasses.asdict(new_model)}
    new_meta["layout"] = {**meta["layout"], "pipeline": 1, "data": 1}  # files hold no pipeline/data split
    new_meta.update(format_version=FORMAT_VERSION, scheduler=None, schedule_start=meta["step"],  # a 2 is written as 3
                    lineage=[*meta.get("lineage", []), entry],
                    optimizer_step=0 if opts.reset_optimizer else meta["optimizer_step"])
    dims = meta["partition_dims"]
    new_meta.pop("partition_dims")
    # the window counts from the source's step; a record carried from the source would be stale
    new_meta["freeze_old"] = ({"until_step": meta["step"] + opts.freeze_old_steps, "shards": T,
                               "tokens": {k: getattr(model, k) for k in TOKEN_KEYS}}
                              if opts.freeze_old_steps else None)
    write(new_state, new_moments, new_meta, dims, dst, tokenizer=find_tokenizer(resolved_dir(src)))
    return dst, entry
