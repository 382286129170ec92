"""The released TokenFormer checkpoints (Haiyang-W/TokenFormer, a GPT-NeoX fork) in and out.

A released `pytorch_model.bin` is a plain state dict of the official sequential model: index 0 the
word embedding, 1 a reshape, 2..L+1 the blocks, L+2 a reshape, L+3 the final norm, L+4 the tied
head (no tensors of its own). Its names against ours (`TokenFormerModel`):

    sequential.0.word_embeddings.weight                        (vocab, d)  embed.weight
    sequential.{i+2}.attention.{query,key,value}.key_param_tokens  (n, d)  blocks.i.qkv.key_tokens[0, 1, 2]
    sequential.{i+2}.attention.{query,key,value}.value_param_tokens        blocks.i.qkv.value_tokens[0, 1, 2]
    sequential.{i+2}.attention.proj.{key,value}_param_tokens   (n, d)      blocks.i.proj.{key,value}_tokens
    sequential.{i+2}.mlp.{key,value}_param_tokens              (n, d)      blocks.i.ffn.{key,value}_tokens
    sequential.{L+3}.norm.weight, .bias                        (d,)        final_norm.weight (= w - 1), .bias

The block norms have no parameters and the rotary table is not saved. The official code computes
each Pattention's scale from its token count (sqrt(n), n for softmax); we store it per layer as
tau, so a model whose tau is not that (grown with tau kept) has no official form and is refused.
Our final norm holds g where the official weight is 1 + g. That weight is written in float64:
1 + g in float32 would round away g's low bits, and the round trip ours -> official -> ours would
not be exact (torch's load_state_dict casts it to the model's dtype on the official side).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from .checkpoint.files import FORMAT_VERSION, layer_of, tag_for, write_meta, write_piece
from .checkpoint.integrity import commit, staging
from .checkpoint.reader import global_state
from .config import Config, ModelConfig, config_from_dict
from .errors import UserError
from .fileio import fsync_path, sha256_file
from .model import TokenFormerModel
from .pattention import default_tau

EMBED = "sequential.0.word_embeddings.weight"
QKV = ("query", "key", "value")
KINDS = ("key", "value")
_BLOCK = re.compile(r"sequential\.(\d+)\.(attention|mlp)\.")
# How close a stored tau must be to the official sqrt(n) (n for softmax): a JSON round trip keeps
# floats exact, but a tau computed another way may differ in its last bits, harmlessly.
TAU_RTOL = 1e-9


class OfficialFormatError(UserError, ValueError):
    """A file that is not an official TokenFormer state dict for the given config, or a model the
    official code cannot express; the message names the tensor, key or setting and the fix."""


def official_keys(num_layers: int) -> list[str]:
    """Every key of the official state dict of a model with `num_layers` blocks, in file order."""
    keys = [EMBED]
    for i in range(num_layers):
        p = f"sequential.{i + 2}."
        for kind in KINDS:
            keys += [p + f"attention.{x}.{kind}_param_tokens" for x in QKV]
            keys += [p + f"attention.proj.{kind}_param_tokens", p + f"mlp.{kind}_param_tokens"]
    return keys + [f"sequential.{num_layers + 3}.norm.weight", f"sequential.{num_layers + 3}.norm.bias"]


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file, unpickling nothing but tensors
    (`weights_only`): a pickle that would run code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise OfficialFormatError(f"{path} is not a file; give the released pytorch_model.bin (--load)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors reports any malformed file its own way
            raise OfficialFormatError(f"{path} is not a safetensors file: {str(e)[:200]}") from None
    else:
        not_torch = OfficialFormatError(f"{path} is not a torch state dict file: it does not unpickle as tensors (a "
                                        "failed download saves an error page; fetch pytorch_model.bin again)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            code = re.search(r"GLOBAL (\S+)", str(e))
            if code:  # the pickle names a function or class to call: loading it would run code
                raise OfficialFormatError(
                    f"{path} is a pickle that carries code (it calls {code.group(1)}); refused, nothing in it was "
                    "run. Load it only if you trust it, and save its state dict of tensors (torch.save("
                    "model.state_dict()) or safetensors) to convert that") from None
            raise not_torch from None
        except Exception:  # noqa: BLE001 - torch.load fails on foreign bytes with many error types
            raise not_torch from None
    if not isinstance(state, dict):
        raise OfficialFormatError(f"{path} holds a {type(state).__name__}, not a state dict (a mapping of "
                                  "parameter names to tensors)")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise OfficialFormatError(f"{path} is not a plain state dict: {odd[0]!r} holds a "
                                  f"{type(state[odd[0]]).__name__}, not a tensor (a training checkpoint? give the "
                                  "model's state dict of tensors)")
    return state


def _names(keys: list[str], most: int = 4) -> str:
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def check_official(state: dict, model: ModelConfig, where: str = "the file") -> int:
    """Check an official state dict against the model config: block count, key set and every
    tensor's shape. Returns the vocab size (embedding rows). Each mismatch names the tensor, its
    shape and the config key to set."""
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    L = model.num_layers
    if len(blocks) != L:
        span = f" (sequential.{blocks[0]} to sequential.{blocks[-1]})" if blocks else ""
        raise OfficialFormatError(f"{where} holds {len(blocks)} TokenFormer blocks{span}, the config "
                                  f"model.num_layers={L}; set model.num_layers={len(blocks)} or use the config "
                                  "the model was trained with")
    want = official_keys(L)
    missing = [k for k in want if k not in state]
    extra = sorted(set(state) - set(want))
    if missing or extra:
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])
        raise OfficialFormatError(f"{where} is not an official TokenFormer state dict of {L} blocks: "
                                  + "; ".join(parts))
    emb = state[EMBED]
    if emb.dim() != 2:
        raise OfficialFormatError(f"{EMBED} has shape {tuple(emb.shape)}, not (vocab, hidden)")
    vocab = emb.shape[0]
    d = model.hidden_size
    rows = {"vocab_size": model.vocab_size if model.vocab_size is not None else vocab,
            "qkv_tokens": model.qkv_tokens, "proj_tokens": model.proj_tokens, "ffn_tokens": model.ffn_tokens}
    expect = [(EMBED, "vocab_size")]
    for i in range(L):
        p = f"sequential.{i + 2}."
        for kind in KINDS:
            expect += [(p + f"attention.{x}.{kind}_param_tokens", "qkv_tokens") for x in QKV]
            expect += [(p + f"attention.proj.{kind}_param_tokens", "proj_tokens"),
                       (p + f"mlp.{kind}_param_tokens", "ffn_tokens")]
    for key, row_key in expect:
        shape, n = tuple(state[key].shape), rows[row_key]
        if shape == (n, d):
            continue
        # name the config key of the dimension that differs: the token (or vocab) count, else the width
        cfg_key, value, found = ((f"model.{row_key}", n, shape[0]) if len(shape) == 2 and shape[0] != n
                                 else ("model.hidden_size", d, shape[-1]))
        raise OfficialFormatError(f"{key} has shape {shape}, the config gives {(n, d)} ({cfg_key}={value}); set "
                                  f"{cfg_key}={found} or use the config the model was trained with")
    for key in official_keys(L)[-2:]:
        if tuple(state[key].shape) != (d,):
            raise OfficialFormatError(f"{key} has shape {tuple(state[key].shape)}, the config gives ({d},) "
                                      f"(model.hidden_size={d}); set model.hidden_size={state[key].shape[-1]} or "
                                      "use the config the model was trained with")
    return vocab


def from_official(state: dict, model: ModelConfig) -> dict:
    """Our global state dict (TokenFormerModel names, fp32, each Pattention's `._extra_state` tau)
    from a checked official state dict."""
    L = model.num_layers

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float32).contiguous()

    out = {"embed.weight": f32(state[EMBED])}
    for i in range(L):
        p, b = f"sequential.{i + 2}.", f"blocks.{i}."
        for kind in KINDS:
            out[b + f"qkv.{kind}_tokens"] = torch.stack([f32(state[p + f"attention.{x}.{kind}_param_tokens"])
                                                        for x in QKV])
            out[b + f"proj.{kind}_tokens"] = f32(state[p + f"attention.proj.{kind}_param_tokens"])
            out[b + f"ffn.{kind}_tokens"] = f32(state[p + f"mlp.{kind}_param_tokens"])
        for m, n in (("qkv", model.qkv_tokens), ("proj", model.proj_tokens), ("ffn", model.ffn_tokens)):
            out[b + f"{m}._extra_state"] = {"tau": default_tau(model.norm, n)}
    w, bias = official_keys(L)[-2:]
    # w - 1 in float64 is exact for a float32 w; only its rounding back to float32 can lose bits.
    out["final_norm.weight"] = f32(state[w].double() - 1.0)
    out["final_norm.bias"] = f32(state[bias])
    return out


def to_official(state: dict, model: ModelConfig) -> dict:
    """The official state dict of our global state dict (with taus). Refuses a model whose tau is
    not the one the official code computes from its token count."""
    L = model.num_layers
    for name, extra in state.items():
        if name.endswith("._extra_state"):
            module = name.removesuffix("._extra_state")
            n = state[module + ".key_tokens"].shape[-2]
            tau, official = float(extra["tau"]), default_tau(model.norm, n)
            if not math.isclose(tau, official, rel_tol=TAU_RTOL):
                raise OfficialFormatError(
                    f"{module} has tau={tau:.6g} for its {n} tokens, but the official code always uses "
                    f"{'n' if model.norm == 'softmax' else 'sqrt(n)'}={official:.6g} (the model was grown with "
                    "its tau kept, which the official format cannot express); grow with `tools/expand_params.py "
                    "--tau sqrt-n` for an exportable model, or keep it in our format")
    out = {EMBED: state["embed.weight"].clone()}
    for i in range(L):
        p, b = f"sequential.{i + 2}.", f"blocks.{i}."
        for kind in KINDS:
            for j, x in enumerate(QKV):  # clone: a saved view would carry the whole stacked storage
                out[p + f"attention.{x}.{kind}_param_tokens"] = state[b + f"qkv.{kind}_tokens"][j].clone()
        for kind in KINDS:
            out[p + f"attention.proj.{kind}_param_tokens"] = state[b + f"proj.{kind}_tokens"].clone()
        for kind in KINDS:
            out[p + f"mlp.{kind}_param_tokens"] = state[b + f"ffn.{kind}_tokens"].clone()
    w, bias = official_keys(L)[-2:]
    out[w] = state["final_norm.weight"].double() + 1.0  # float64: exact for g down to ~1e-9 (module docstring)
    out[bias] = state["final_norm.bias"].clone()
    return {k: out[k] for k in official_keys(L)}  # in the official file's order


def write_checkpoint(state: dict, cfg: Config, vocab_size: int, save: str | Path, extra_meta: dict | None = None,
                     tokenizer: str | Path | None = None) -> Path:
    """Write our global weights (with taus) as a checkpoint at step 0 holding weights only (no Adam
    moments: meta.json says `"moments": false`), in `save`/step_00000000, atomically. With
    `tokenizer`, the file is stored in the step directory and recorded in meta.json."""
    from .tokenizer import store_tokenizer

    # Names and partition dims come from the model itself; they do not depend on the sizes, so a
    # miniature of it gives them without allocating (or, on the meta device, importing torch._dynamo).
    m = cfg.model
    model = TokenFormerModel(dataclasses.replace(m, hidden_size=8 * m.num_heads, qkv_tokens=1, proj_tokens=1,
                                                 ffn_tokens=1, rotary_pct=0.0), 1)
    dims = {n: getattr(p, "partition_dim", None) for n, p in model.named_parameters()}
    differ = sorted(set(state) ^ set(model.state_dict()))
    if differ:  # a mapping out of step with model.py
        raise RuntimeError(f"the converted names differ from the model's: {_names(differ)}")
    L = cfg.model.num_layers
    run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    meta = {"format_version": FORMAT_VERSION, "step": 0, "consumed_samples": 0, "optimizer_step": 0,
            "moments": False, "vocab_size": vocab_size, "scheduler": None,
            "engine": {"global_steps": 0, "global_samples": 0, "skipped_steps": 0}, "loss_scaler": {},
            "world_size": 1, "layout": {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": cfg.parallel.zero_stage},
            "config": run_cfg.to_dict(), "run_info": {}, "schedule_start": 0, "lineage": [], **(extra_meta or {})}
    dst = Path(save) / tag_for(0)
    tmp = staging(dst)
    try:
        by_layer: dict[int, list[str]] = {}
        for name in dims:
            by_layer.setdefault(layer_of(name, L), []).append(name)
        for layer, params in sorted(by_layer.items()):
            taus = {k.removesuffix("._extra_state"): v for k, v in state.items()
                    if k.endswith("._extra_state") and layer_of(k, L) == layer}
            write_piece(tmp, layer, 0, 0, {n: state[n].reshape(-1) for n in params}, dict.fromkeys(params, 0),
                        {n: list(state[n].shape) for n in params}, {n: dims[n] for n in params}, taus)
        if tokenizer is not None:
            meta["tokenizer"] = store_tokenizer(tokenizer, tmp)
            meta["tokenizer_sha256"] = meta["tokenizer"]["sha256"]  # what a run checks its data against
        write_meta(tmp, meta)
        commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    return dst


def _empty_target(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OfficialFormatError(f"{path} already holds something; choose a new {what} (nothing was written)")


def import_official(src: str | Path, cfg: Config, save: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Convert a released official state dict at `src` (checked against `cfg`) into a step-0
    checkpoint of ours in `save` (which must be empty or new). Returns the step directory."""
    from .tokenizer import load_tokenizer

    save = Path(save)
    _empty_target(save, "--save directory")
    if tokenizer is not None:
        load_tokenizer(tokenizer)  # a file that does not parse stops here, before anything is written
    raw = load_state_file(src)
    vocab = check_official(raw, cfg.model, str(src))
    state = from_official(raw, cfg.model)
    del raw
    source = {"format": "official", "file": str(Path(src).resolve()), "sha256": sha256_file(src)}
    created = not save.exists()
    try:
        return write_checkpoint(state, cfg, vocab, save, {"source": source}, tokenizer)
    except BaseException:
        if created:
            shutil.rmtree(save, ignore_errors=True)
        raise


def export_official(load: str | Path, dst: str | Path) -> tuple[Path, dict]:
    """Write the checkpoint at `load` (any layout) as an official state dict file `dst` (torch, or
    safetensors by suffix), atomically. Returns (dst, the checkpoint's meta)."""
    dst = Path(dst)
    if dst.exists():
        raise OfficialFormatError(f"{dst} already exists; choose a new --save file (nothing was written)")
    state, _, meta = global_state(load)
    official = to_official(state, config_from_dict(meta["config"]).model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(official, str(tmp))
        else:
            torch.save(official, tmp)
        fsync_path(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst, meta
