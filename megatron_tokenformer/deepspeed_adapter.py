"""Every use of DeepSpeed internals, in one place. Checked against DeepSpeed 0.19.8.

The rest of the package talks to DeepSpeed through its public API (`deepspeed.initialize`, the
engine's train/eval/step methods, `deepspeed.utils.safe_*`). What that API does not offer, and
this module reaches for:
- `param._hp_mapping`: whether ZeRO-1/2 or the bf16 optimizer holds a parameter's fp32 master in
  its flat partitions (then the safe_* accessors read it); and, to save without gathering, the
  fragment this rank owns (`tensor_fragment`: `lp_fragment_address.start`/`.numel`, where it lies
  in the flattened parameter; `hp_fragment`, its fp32 master; `get_hp_fragment(key)`, its Adam
  moments), None where this rank's partition holds none of the parameter;
- `optimizer._lazy_init_hp_params_optimizer_state()`: after creating the Adam state that torch
  creates lazily, point each parameter's fragments at it;
- the dynamic loss scaler's fields (`cur_scale`, `cur_iter`, `last_overflow_iter`,
  `cur_hysteresis`), carried across a resume;
- the engine's step counters (`global_steps`, `global_samples`, `skipped_steps`);
- `optimizer.overflow`, which the engine reads after the optimizer's step to count the step as
  skipped and leave the LR schedule alone, and the wrapped torch optimizer as `optimizer.optimizer`
  (ZeRO-1/2, bf16), to skip an update (`step_without_update`);
- `PipelineModule._partition_layers`, `_set_bounds` and `_topo`, to cut the pipeline where our
  compute-balanced partition says;
- how `DeepSpeedConfig` reads its dict (`get`, `[]`, `in`, `keys()` on a shallow copy), to list
  the top-level keys it knows (`known_config_keys`).
- `deepspeed.ops.__compatible_ops__`, which DeepSpeed's torch backend reads before it builds its
  shared-memory all-reduce op (`quiet_start`: the op is for inference only; noise only, nothing
  breaks if it moves).
`check_internals()` fails loudly, naming what moved, if a DeepSpeed release changes any of them;
tests/test_deepspeed_adapter.py runs it against real engines.
"""
from __future__ import annotations

import torch

CHECKED_WITH = "0.19.8"
MOMENTS = ("exp_avg", "exp_avg_sq")
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class DeepSpeedChanged(RuntimeError):
    """A DeepSpeed internal this package relies on is gone or different."""


class MasterWeightsUnreadable(RuntimeError):
    """The optimizer keeps fp32 master weights where they cannot be read per parameter."""


class OptimizerState:
    """Each parameter's fp32 master weight and Adam moments, whichever optimizer DeepSpeed built:
    torch's AdamW itself (ZeRO-0 in fp32), or ZeRO-1/2 / bf16 flat partitions over data parallel,
    read and written through DeepSpeed's per-parameter accessors (collectives over data parallel:
    every rank of a data-parallel group calls them in the same order)."""

    def __init__(self, engine):
        self.opt = engine.optimizer
        self.base = getattr(self.opt, "optimizer", self.opt)  # the torch optimizer holding the state

    @property
    def have_state(self) -> bool:
        return any(self.base.state.values())  # torch creates it at the first step (or prepare() does)

    def step(self) -> int:
        for st in self.base.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def get(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """{"": master weight, "exp_avg": ..., "exp_avg_sq": ...} of the full parameter, fp32 on CPU."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(p, "_hp_mapping"):
            out = {"": safe_get_full_fp32_param(p)}
            for k in MOMENTS:
                out[k] = safe_get_full_optimizer_state(p, k) if self.have_state else torch.zeros_like(out[""])
        else:
            if p.dtype != torch.float32:  # never save a rounded copy as the master weights
                raise MasterWeightsUnreadable(
                    f"{type(self.opt).__name__} keeps the fp32 master weights where checkpoints cannot read them "
                    "per parameter; use parallel.zero_stage>=1")
            st = self.base.state.get(p, {})
            out = {"": p.detach().float(), **{k: st[k] if k in st else torch.zeros_like(p, dtype=torch.float32)
                                               for k in MOMENTS}}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def local(self, p: torch.nn.Parameter, dp_rank: int, dp_size: int,
              copy: bool = False) -> tuple[int, dict] | None:
        """This rank's part of `p`'s fp32 master weight and Adam moments, read without communication:
        (offset in the flattened parameter, {"": weight, "exp_avg": ..., "exp_avg_sq": ...} as flat
        fp32 ranges), or None if this rank holds no part. ZeRO-1/2 / bf16: the fragment of this rank's
        flat partition (its ZeRO partition, so the ranks' parts tile the parameter). torch's AdamW
        (every rank holds everything): range `dp_rank` of `dp_size` equal contiguous ranges. The
        ranges are views into the live state (write them before the next step), or with `copy`
        copies of it."""
        if hasattr(p, "_hp_mapping"):
            frag = p._hp_mapping
            if frag is None:
                return None
            out = {"": frag.hp_fragment}
            for k in MOMENTS:
                out[k] = frag.get_hp_fragment(k) if self.have_state else torch.zeros_like(frag.hp_fragment)
            offset = frag.lp_fragment_address.start
        else:
            if p.dtype != torch.float32:  # never save a rounded copy as the master weights
                raise MasterWeightsUnreadable(
                    f"{type(self.opt).__name__} keeps the fp32 master weights where checkpoints cannot read them "
                    "per parameter; use parallel.zero_stage>=1")
            n = p.numel()
            offset, end = n * dp_rank // dp_size, n * (dp_rank + 1) // dp_size
            if offset == end:
                return None
            st = self.base.state.get(p, {})
            out = {"": p.detach()}
            for k in MOMENTS:
                out[k] = st[k] if k in st else torch.zeros_like(p, dtype=torch.float32)
            out = {k: v.reshape(-1)[offset:end] for k, v in out.items()}
        return offset, {k: v.detach().reshape(-1).to("cpu", torch.float32, copy=copy) for k, v in out.items()}

    def live(self, p: torch.nn.Parameter) -> tuple[int, dict] | None:
        """This rank's fp32 master weight and Adam moments of `p` as live flat views on the device
        (writing them writes the optimizer's state): (offset in the flattened parameter, {"": weight,
        "exp_avg": ..., "exp_avg_sq": ...}), or None if this rank holds no part. ZeRO-1/2 / bf16: its
        fragment of the flat partition; torch's AdamW: the whole parameter. Needs the Adam state to
        exist (after a step or prepare())."""
        if hasattr(p, "_hp_mapping"):
            frag = p._hp_mapping
            if frag is None:
                return None
            return frag.lp_fragment_address.start, {"": frag.hp_fragment,
                                                    **{k: frag.get_hp_fragment(k) for k in MOMENTS}}
        st = self.base.state[p]
        return 0, {"": p.data.view(-1), **{k: st[k].view(-1) for k in MOMENTS}}

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


def step_without_update(engine) -> None:
    """`engine.step()` at the end of a global batch, with the update skipped the way DeepSpeed skips a
    step whose gradients overflowed: the gradients are cleared, the step counts (global_steps,
    global_samples, skipped_steps) and the LR schedule does not move. The torch optimizer's own step
    is made a no-op for the call, so the fp32 master weights, the Adam moments and Adam's step count
    stay exactly as they were (ZeRO then copies the unchanged masters back into the working weights);
    the optimizer's `overflow` flag, set after its step, tells the engine to count the step as
    skipped. Zeroing the gradients instead would not do: Adam still moves weights through its
    momentum, and its moments decay."""
    outer = engine.optimizer
    inner = getattr(outer, "optimizer", outer)  # the torch AdamW (ZeRO-0 fp32: the engine holds it bare)
    had_flag = hasattr(outer, "overflow")
    outer_step = outer.step

    def skipping_step(*args, **kwargs):
        if inner is not outer:  # ZeRO-1/2, bf16: their step clips, (not) updates, copies back, gathers
            inner.step = lambda *a, **k: None
            try:
                outer_step(*args, **kwargs)
            finally:
                del inner.step
        outer.overflow = True  # read by DeepSpeedEngine._take_model_step right after this call

    outer.step = skipping_step
    try:
        engine.step()
    finally:
        del outer.step
        if had_flag:
            outer.overflow = False  # as their next step() starts
        else:
            del outer.overflow


def loss_scaler_state(engine) -> dict:
    """fp16's dynamic loss scale (empty for a static scaler or none: nothing to carry)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    out = {}
    if not getattr(scaler, "dynamic", False):
        return out
    for k in LOSS_SCALER_FIELDS:
        v = getattr(scaler, k, None)
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, (int, float)):
            out[k] = v
    return out


def set_loss_scaler_state(engine, state: dict | None) -> None:
    """Continue fp16's dynamic loss scale where it was (only into a dynamic scaler)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if getattr(scaler, "dynamic", False):
        for k, v in (state or {}).items():
            setattr(scaler, k, v)


def engine_counters(engine) -> dict[str, int]:
    return {k: int(getattr(engine, k)) for k in ENGINE_COUNTERS}


def set_engine_counters(engine, counters: dict[str, int]) -> None:
    for k, v in counters.items():
        setattr(engine, k, v)


class _Recording(dict):
    """A dict noting every top-level key looked up (DeepSpeedConfig's copy.copy keeps the subclass
    and shares `seen`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = set()

    def __getitem__(self, k):
        self.seen.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.seen.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.seen.add(k)
        return super().__contains__(k)

    def keys(self):
        seen = self.seen

        class Keys(list):  # `key in d.keys()` is how several of DeepSpeed's readers ask
            def __contains__(self, k):
                seen.add(k)
                return list.__contains__(self, k)

        return Keys(super().keys())


_KNOWN_KEYS: set | None = None


def known_config_keys() -> set:
    """The top-level keys DeepSpeedConfig reads: it is built once from a minimal config, recording
    every key it asks for (DeepSpeed keeps no list; its constants mix top-level and nested keys)."""
    global _KNOWN_KEYS
    if _KNOWN_KEYS is None:
        from deepspeed.runtime.config import DeepSpeedConfig

        class OneRank:  # so the batch sizes below check out whatever the world size
            @staticmethod
            def get_data_parallel_world_size():
                return 1

        d = _Recording(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
        DeepSpeedConfig(d, mpu=OneRank())
        _KNOWN_KEYS = set(d.seen)
    return _KNOWN_KEYS


def pipeline_module_class(parts: list[int]):
    """A PipelineModule subclass that cuts its layers at `parts` (stage s owns layers parts[s] ..
    parts[s+1]-1) instead of by one of DeepSpeed's built-in methods."""
    from deepspeed.pipe import PipelineModule

    class FixedPartitionPipelineModule(PipelineModule):
        def _partition_layers(self, method="compute"):
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    return FixedPartitionPipelineModule


def quiet_start() -> None:
    """Before DeepSpeed's communication backend starts: two lines every rank printed on every launch
    that say nothing about the run.

    - On the CPU accelerator the backend builds its shared-memory all-reduce op (compiled on the first
      launch, 30-60 s) and prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
      successfully", cached or not. Only its inference all-reduce (AutoTP inference) uses the op, never
      training: marked incompatible, it is not built.
    - ZeRO gathers with `torch.distributed.all_gather_into_tensor`, which torch 2.13 deprecates with a
      FutureWarning on the first call, into the progress bar. The call is DeepSpeed's (ours use
      `all_gather_single`, mappings.py), so that warning alone is filtered.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # (probes the others, as DeepSpeed would)


def check_internals(engine=None) -> None:
    """Raise DeepSpeedChanged naming each internal above that this DeepSpeed lacks. With an
    engine built under ZeRO-1/2 or bf16, also check its parameters carry `_hp_mapping` and its
    optimizer the lazy-state hook."""
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    missing = [f"PipelineModule.{a}" for a in ("_partition_layers", "_set_bounds") if not hasattr(PipelineModule, a)]
    if not hasattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state"):
        missing.append("DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state")
    try:
        scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                   consecutive_hysteresis=False)
        missing += [f"DynamicLossScaler.{k}" for k in (*LOSS_SCALER_FIELDS, "dynamic") if not hasattr(scaler, k)]
    except TypeError as e:
        missing.append(f"DynamicLossScaler's constructor ({e})")
    if not {"zero_optimization", "bf16", "flops_profiler", "comms_logger"} <= known_config_keys():
        missing.append("DeepSpeedConfig's reads of its dict (known_config_keys sees too few keys)")
    from deepspeed.utils.tensor_fragment import fragment_address, tensor_fragment

    fields = getattr(tensor_fragment, "__dataclass_fields__", {})
    missing += [f"tensor_fragment.{k}" for k in ("lp_fragment_address", "hp_fragment") if k not in fields]
    if not hasattr(tensor_fragment, "get_hp_fragment"):
        missing.append("tensor_fragment.get_hp_fragment")
    missing += [f"fragment_address.{k}" for k in ("start", "numel")
                if k not in getattr(fragment_address, "__dataclass_fields__", {})]
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    if "self.optimizer.overflow" not in inspect.getsource(DeepSpeedEngine._take_model_step):
        missing.append("DeepSpeedEngine._take_model_step reading optimizer.overflow (step_without_update)")
    if engine is not None:
        missing += [f"DeepSpeedEngine.{k}" for k in ENGINE_COUNTERS if not hasattr(engine, k)]
        if type(engine.optimizer).__name__ in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
            if not hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
                missing.append(f"{type(engine.optimizer).__name__}._lazy_init_hp_params_optimizer_state")
            if not all(hasattr(p, "_hp_mapping") for p in engine.module.parameters()):
                missing.append("parameter._hp_mapping (set by ZeRO-1/2 and bf16)")
            frags = [p._hp_mapping for p in engine.module.parameters() if getattr(p, "_hp_mapping", None) is not None]
            if not frags or not all(isinstance(f, tensor_fragment) for f in frags):
                missing.append("parameter._hp_mapping as a tensor_fragment (this rank's part of the partition)")
    if missing:
        raise DeepSpeedChanged(
            f"DeepSpeed {deepspeed.__version__} lacks internals this package was checked against in {CHECKED_WITH}: "
            + ", ".join(missing) + "; see megatron_tokenformer/deepspeed_adapter.py")
