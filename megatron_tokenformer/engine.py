"""The DeepSpeed engine: model (pipelined or not), AdamW, LR schedule, DeepSpeed's config, and the
train/eval step functions, chosen once per run (as Megatron's get_forward_backward_func)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed as D
from .config import Config, ConfigError
from .deepspeed_adapter import step_without_update
from .model import TokenFormerModel
from .pattention import resolve_impl
from .pipeline import build_pipeline


def lr_lambda(cfg: Config, start: int = 0, end: int | None = None, warmup: int | None = None):
    """Multiplier of train.lr after `k` optimizer steps of a schedule running from step `start` to
    `end` (train.steps; a growth stage ends at the next growth): linear warmup over `warmup` steps
    (None: train.warmup_steps; a growth's own warmup_steps), cosine to min_lr over train.decay_steps
    (None: the whole segment), then flat."""
    t = cfg.train
    end = t.steps if end is None else end
    warmup = t.warmup_steps if warmup is None else warmup
    decay, floor = t.decay_steps or max(1, end - start), t.min_lr / t.lr

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step >= decay:
            return floor
        progress = (step - warmup) / max(1, decay - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with weight decay on every parameter, in ONE param group: DeepSpeed's ZeRO computes the
    gradient norm per group with a collective, so every pipeline stage must hold the same groups
    (a stage without norms would otherwise hang the others). The only norm with parameters, the
    final one, has a zero-centred gain, so decay pulls it towards identity."""
    t = cfg.train
    # torch's fused AdamW on GPU; the foreach one elsewhere. No DeepSpeed op compile either way.
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                             weight_decay=t.weight_decay, fused=torch.cuda.is_available())


def _merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, nested mappings key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's config: what our sections set (config/validation.py DEEPSPEED_OWNED lists it; the
    `deepspeed:` section may not set those), with the `deepspeed:` section merged in."""
    t = cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload (offload_optimizer) steps our torch AdamW on the CPU partitions; DeepSpeed
        # otherwise insists on its own CPU Adam, a compiled op
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.sequence_parallel and cfg.parallel.pipeline > 1:
        # DeepSpeed's pipeline sends 1/tensor of an activation it takes to be the same on every tensor
        # rank and gathers it back; under sequence parallelism each rank's is its own shard: send it whole.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _merge(ds, cfg.deepspeed)


def unknown_deepspeed_keys(cfg: Config) -> list[str]:
    """Top-level keys of the `deepspeed:` section that this DeepSpeed does not read (it ignores
    them silently: usually a misspelling)."""
    from .deepspeed_adapter import known_config_keys

    known = known_config_keys()
    return [k for k in cfg.deepspeed if k not in known]


def check_precision(cfg: Config) -> None:
    """train.precision must be one the accelerator runs (DeepSpeed's CPU accelerator has fp16 only
    on CPUs with native fp16 support)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    ok = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}[cfg.train.precision]
    if not ok:
        raise ConfigError(f"train.precision={cfg.train.precision} is not supported on this device "
                          f"({acc.device_name()}); use train.precision=bf16 or fp32")


def speed_choices(cfg: Config) -> dict:
    """model.pattention_impl and train.compile as this run uses them (`auto` resolved for the
    device: the fastest measured there, docs/PERFORMANCE.md); explicit values stay."""
    compile_ = cfg.train.compile
    if compile_ == "auto":
        # only where it was measured: one tensor rank (compiling around the TP collectives was not)
        compile_ = torch.cuda.is_available() and cfg.parallel.pipeline == 1 and cfg.parallel.tensor == 1
    return {"pattention_impl": resolve_impl(cfg.model.pattention_impl), "compile": compile_}


def build_engine(cfg: Config, vocab: int, ps: D.ParallelState, schedule: tuple[int, int]):
    """The model (pipelined or not), AdamW and its LR schedule (running over the steps
    `schedule` = (start, end[, warmup]), lr_lambda's arguments) in a DeepSpeed engine; returns
    (engine, the pipeline partition as text, or None)."""
    import deepspeed

    partition_text = None
    if cfg.parallel.pipeline > 1:
        model, partition_text = build_pipeline(cfg, vocab, ps)
    else:
        model = TokenFormerModel(cfg.model, vocab, tp_group=ps.tp_group, seed=cfg.train.seed,
                                 sequence_parallel=cfg.parallel.sequence_parallel)
        if speed_choices(cfg)["compile"]:  # per block, in place: one graph for all blocks; parameter names unchanged
            for block in model.blocks:
                block.compile()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, *schedule))
    # A pipeline module brings its own grid (the same rank order) as DeepSpeed's mpu.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, ps.grid.world_size),
                                           mpu=None if cfg.parallel.pipeline > 1 else ps.mpu())
    return engine, partition_text


# ---- step functions ---------------------------------------------------------------------------
# Each takes the engine and this rank's micro-batches of one global batch (token ids, one longer
# than the context: inputs and shifted labels) and returns the mean loss as a float, with one
# device sync per call. The train step takes `skip_update` too: None, or a function of this rank's
# mean loss, called (by every rank) after the last backward and before the update, saying whether
# to skip the update (train.spike_factor; not pipelined: the pipeline engine updates inside
# train_batch).

def _pairs(micros: list[torch.Tensor]):
    return iter([(m[:, :-1], m[:, 1:]) for m in micros])


def _train_pipelined(engine, micros: list[torch.Tensor], skip_update=None) -> float:
    assert skip_update is None, "validation refuses train.spike_factor with pipelines"
    # 1F1B over the micro-batches; the loss comes back averaged, on every stage
    return engine.train_batch(_pairs(micros)).item()


def _train(engine, micros: list[torch.Tensor], skip_update=None) -> float:
    losses = []
    for i, m in enumerate(micros):
        out = engine(m[:, :-1], m[:, 1:])
        engine.backward(out)
        losses.append(out.detach())
        if skip_update is not None and i == len(micros) - 1:
            loss = torch.stack(losses).mean().item()  # the whole batch's gradients are reduced by now
            if skip_update(loss):
                step_without_update(engine)
                return loss
        engine.step()  # DeepSpeed steps the optimizer at the last micro-batch of the accumulation
    return torch.stack(losses).mean().item()


@torch.no_grad()
def _eval_pipelined(engine, micros: list[torch.Tensor]) -> float:
    return engine.eval_batch(_pairs(micros), num_micro_batches=len(micros)).item()


@torch.no_grad()
def _eval(engine, micros: list[torch.Tensor]) -> float:
    return torch.stack([engine(m[:, :-1], m[:, 1:]) for m in micros]).mean().item()


@dataclass(frozen=True)
class StepFunctions:
    train: Callable[..., float]
    eval: Callable[..., float]


def step_functions(cfg: Config) -> StepFunctions:
    """The train and eval steps for this run's layout."""
    if cfg.parallel.pipeline > 1:
        return StepFunctions(_train_pipelined, _eval_pipelined)
    return StepFunctions(_train, _eval)
