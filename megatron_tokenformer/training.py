"""The pretraining loop: build model, data and DeepSpeed engine, then train, evaluate, log, save."""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import shutil
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import torch
import yaml

from . import checkpoint as C
from . import distributed as D
from .config import TOKEN_KEYS, Config, ConfigError, ModelConfig, padded_vocab_size, validate
from .data import SampleSet, TrainBatches, load_meta, valid_batches
from .model import TokenFormerModel, count_parameters, model_flops_per_token
from .pipeline import build_pipeline
from .monitor import Monitor


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); the message says why and what to do."""


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def lr_lambda(cfg: Config, start: int = 0, end: int | None = None):
    """Multiplier of train.lr after `k` optimizer steps of a schedule running from step `start` to
    `end` (train.steps; a growth stage ends at the next growth): linear warmup, cosine to min_lr
    over train.decay_steps (None: the whole segment), then flat."""
    t = cfg.train
    end = t.steps if end is None else end
    warmup, decay, floor = t.warmup_steps, t.decay_steps or max(1, end - start), t.min_lr / t.lr

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


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    t = cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def _check_precision(cfg: Config) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    ok = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}[cfg.train.precision]
    if not ok:
        raise ConfigError(f"train.precision={cfg.train.precision} is not supported on this device "
                          f"({acc.device_name()}); use train.precision=bf16 or fp32")


def _run_info(cfg: Config, resume_meta: dict | None) -> dict:
    """Identity of the run: git revision and a W&B id that stays the same across resumes."""
    info_path = cfg.run_dir / "run_info.json"
    prev = json.loads(info_path.read_text()) if info_path.exists() else {}
    return {"git": git_revision(), "wandb_id": prev.get("wandb_id") or uuid.uuid4().hex[:12],
            "resumed_from_step": resume_meta["step"] if resume_meta else None}


def build_engine(cfg: Config, vocab: int, ps: D.ParallelState, world: int, schedule: tuple[int, int]):
    """The model (pipelined or not), AdamW and its LR schedule (running over the steps
    `schedule` = (start, end)) in a DeepSpeed engine; returns (engine, the pipeline partition
    as text, or None)."""
    import deepspeed

    partition_text = None
    if cfg.parallel.pipeline > 1:
        model, partition_text = build_pipeline(cfg, vocab, ps)
    else:
        model = TokenFormerModel(cfg.model, vocab, tp_group=ps.tp_group, seed=cfg.train.seed)
        if cfg.train.compile:  # per block, in place: one graph for all blocks; parameter names unchanged
            for block in model.blocks:
                block.compile()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, *schedule))
    # A pipeline module brings its own grid (the same rank order) as DeepSpeed's mpu.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world),
                                           mpu=None if cfg.parallel.pipeline > 1 else ps.mpu())
    return engine, partition_text


def _stage_of(cfg: Config, ckpt_model: dict) -> int:
    """Which model stage (start, or after growth i) a checkpoint's model is; 0 if none matches
    (check_loadable then says which fields differ)."""
    for i, m in enumerate(cfg.model_stages()):
        if all(getattr(m, k) == ckpt_model[k] for k in TOKEN_KEYS):
            return i
    return 0


def pretrain(cfg: Config) -> dict:
    """Train as the config says; returns the last logged metrics (on every rank)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's pipeline engine backpropagates through a broadcast of the tied embedding; harmless.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    rank, world = D.init_distributed()
    validate(cfg, world)
    _check_precision(cfg)
    grid = D.Grid(rank, world, cfg.parallel.tensor, cfg.parallel.pipeline)
    ps = D.ParallelState.build(grid)
    dev = D.device()

    meta = load_meta(cfg.data.path, verify=cfg.data.verify_checksums)
    train_set = SampleSet(meta, cfg.model.seq_length, "train", cfg.data.valid_fraction)
    valid_set = SampleSet(meta, cfg.model.seq_length, "valid", cfg.data.valid_fraction)
    # The checkpoint to resume (rank 0 verifies the manifests), checked before anything is built.
    resume = D.broadcast_object(C.find_resume(cfg) if rank == 0 else None)
    resume_meta = D.broadcast_object(C.read_meta(*resume) if rank == 0 and resume else None)
    stage = _stage_of(cfg, resume_meta["config"]["model"]) if resume else 0  # model size (growth stage)
    run = dataclasses.replace(cfg, model=cfg.model_stages()[stage])           # the config at that size
    if resume:
        C.check_loadable(resume_meta, cfg, run.model, resume[0] / resume[1], meta.tokenizer_sha256)
    # A resumed run keeps the checkpoint's vocab rows (the padding may differ at another tensor size).
    vocab = resume_meta["vocab_size"] if resume else padded_vocab_size(cfg, meta.vocab_size)
    # The LR schedule starts at 0, or where the model last grew; lineage lists the growths so far.
    schedule_start = resume_meta.get("schedule_start", 0) if resume else 0
    lineage = resume_meta.get("lineage", []) if resume else []

    pipelined = cfg.parallel.pipeline > 1
    engine, partition_text = build_engine(run, vocab, ps, world, (schedule_start, cfg.segment_end(stage)))
    # Dropout acts on activations replicated over the tensor group: same stream on its ranks,
    # a different one per data-parallel rank.
    torch.manual_seed(cfg.train.seed + 1 + grid.dp_rank)
    if resume:
        C.load(engine, run, grid, *resume, resume_meta)
    step = resume_meta["step"] if resume_meta else 0
    consumed = resume_meta["consumed_samples"] if resume_meta else 0

    run_info = _run_info(cfg, resume_meta) | {"lineage": lineage}
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (cfg.run_dir / "run_info.json").write_text(json.dumps(run_info, indent=1))
    monitor = Monitor(cfg, grid.is_logger, run_info, step)
    n_params, flops_per_token = _size(run, vocab)
    monitor.message(
        f"TokenFormer: {n_params / 1e6:.2f}M parameters, vocab {vocab}, {world} rank(s) (tensor {grid.tensor} "
        f"x pipeline {grid.pipeline} x data {grid.data}), {cfg.grad_accum_steps(world)} micro-batches/step, "
        f"{len(train_set)} train samples; "
        + (f"resumed from {resume[0] / resume[1]} at step {step}" if resume else "fresh start"))
    if lineage:
        monitor.message("grown from: " + "; ".join(f"{g['parent_name']} ({g['parent_run']}) at step {g['step']}, "
                                                   f"{g['params_before']} -> {g['params_after']} parameters"
                                                   for g in lineage))
    if partition_text:
        monitor.message(partition_text)
    if step >= cfg.train.steps:
        monitor.message(f"the checkpoint is at step {step} and train.steps={cfg.train.steps}: nothing to train; "
                        "raise train.steps to continue")

    batches = TrainBatches(train_set, cfg.train.seed, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                           grid.dp_rank, grid.data, consumed_samples=consumed)

    def save() -> Path:
        return C.save(engine, run, grid, step, batches.consumed_samples, run_info, vocab, meta.tokenizer_sha256,
                      extra_meta={"schedule_start": schedule_start, "lineage": lineage})

    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    last: dict = {}
    # tokens/s counts training time only: eval, checkpoint and growth time is subtracted as `paused`.
    window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
    in_trouble = 0  # consecutive steps with a non-finite loss or gradients (DeepSpeed skips their update)
    saved_at = step if resume else None
    while step < cfg.train.steps:
        if stage < len(cfg.growth) and step >= cfg.growth[stage].at_step:
            t0 = time.perf_counter()
            if saved_at != step:
                save()
            # Grow in the global view (rank 0 writes the grown checkpoint), then every rank rebuilds
            # its engine at the new size and loads it like any checkpoint: the same route as
            # tools/expand_params.py followed by a resume.
            grown_tag = C.tag_for(step) + "_grown"
            entry = D.broadcast_object(
                _expand(cfg.checkpoint_dir, C.tag_for(step), grown_tag, cfg.model_stages()[stage + 1])
                if rank == 0 else None)
            if isinstance(entry, str):
                raise TrainingError(entry)
            del engine
            gc.collect()
            stage, schedule_start, lineage = stage + 1, step, [*lineage, entry]
            run = dataclasses.replace(cfg, model=cfg.model_stages()[stage])
            engine, _ = build_engine(run, vocab, ps, world, (schedule_start, cfg.segment_end(stage)))
            C.load(engine, run, grid, cfg.checkpoint_dir, grown_tag,
                   D.broadcast_object(C.read_meta(cfg.checkpoint_dir, grown_tag) if rank == 0 else None))
            n_params, flops_per_token = _size(run, vocab)
            monitor.event(step, "growth", {**entry["tokens_after"], "params": n_params,
                                           "params_before": entry["params_before"]}, lineage)
            monitor.message(f"step {step}: grew to {n_params / 1e6:.2f}M parameters "
                            f"({', '.join(f'{k}={v}' for k, v in entry['tokens_after'].items())})")
            paused += time.perf_counter() - t0
        engine.train()
        lr = engine.get_lr()[0]
        skipped_before = engine.skipped_steps
        micros = [m.to(dev) for m in batches.next_step()]
        if pipelined:  # 1F1B over the micro-batches; the loss comes back averaged on every stage
            loss = engine.train_batch(iter([(m[:, :-1], m[:, 1:]) for m in micros])).item()
        else:
            losses = []
            for m in micros:
                out = engine(m[:, :-1], m[:, 1:])
                engine.backward(out)
                engine.step()
                losses.append(out.detach())
            loss = torch.stack(losses).mean().item()  # one device sync per step, not per micro-batch
        step += 1
        (mean_loss,) = D.all_reduce_mean([loss], dev, ps.dp_group)
        window_loss, window_steps = window_loss + mean_loss, window_steps + 1
        monitor.advance()
        if engine.skipped_steps > skipped_before or not math.isfinite(mean_loss):
            in_trouble += 1
            monitor.message(f"step {step}: non-finite loss or gradients, update skipped ({in_trouble} in a row)")
        else:
            in_trouble = 0
        metrics = {}
        if step % cfg.log.interval == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start - paused
            grad_norm = engine.get_global_grad_norm()
            metrics.update(loss=mean_loss, loss_avg=window_loss / window_steps, lr=lr,
                           grad_norm=float(grad_norm) if grad_norm is not None else None,
                           tokens_per_sec=tokens_per_step * window_steps / elapsed,
                           tflops=flops_per_token * tokens_per_step * window_steps / elapsed / 1e12,
                           samples=batches.consumed_samples, skipped_steps=int(engine.skipped_steps))
            window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
        t0 = time.perf_counter()
        if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == cfg.train.steps):
            metrics.update(evaluate(engine, cfg, valid_set, ps, dev))
        if metrics:
            monitor.log(step, metrics)
            last = {"step": step, **metrics}
        if cfg.train.max_skipped_steps and in_trouble >= cfg.train.max_skipped_steps:
            monitor.close()
            latest = cfg.checkpoint_dir / "latest"
            good = latest.read_text().strip() if latest.is_file() else None
            raise TrainingError(
                f"{in_trouble} consecutive steps (up to step {step}) had a non-finite loss or gradients; "
                f"stopped. The newest checkpoint, {good or 'none'}, was saved before the trouble: resume "
                "from it with a lower train.lr, a tighter train.grad_clip or train.precision=fp32, or "
                "raise train.max_skipped_steps")
        due = (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.train.steps
        if due and not in_trouble:  # never save a state from inside a run of non-finite steps
            monitor.message(f"step {step}: saved {save()}")
            saved_at = step
        paused += time.perf_counter() - t0
    monitor.close()
    return last


def _size(run: Config, vocab: int) -> tuple[int, int]:
    """(parameters of the whole model, whatever this rank holds; training FLOPs per token)."""
    with torch.device("meta"):
        n_params = count_parameters(TokenFormerModel(run.model, vocab))
    return n_params, model_flops_per_token(run.model, vocab)


def _expand(ckpt_dir: Path, tag: str, grown_tag: str, model: ModelConfig) -> dict | str:
    """Rank 0: grow checkpoint `tag` into `grown_tag` (exactly: zero keys, value init, tau kept).
    Returns the lineage entry, or the error text (broadcast, so every rank stops alike)."""
    from .growth import GrowthError, GrowthOptions, expand_checkpoint

    stale = ckpt_dir / grown_tag  # a damaged one from an earlier attempt (an intact one would have been resumed)
    shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(stale.with_name(stale.name + C.PARTIAL), ignore_errors=True)
    try:
        _, entry = expand_checkpoint(ckpt_dir / tag, ckpt_dir, {k: getattr(model, k) for k in TOKEN_KEYS},
                                     GrowthOptions(), tag=grown_tag)
    except (GrowthError, C.CheckpointError, OSError) as e:
        return f"growth at {ckpt_dir / tag} failed: {e}"
    return entry


@torch.no_grad()
def evaluate(engine, cfg: Config, valid_set: SampleSet, ps: D.ParallelState, dev: torch.device) -> dict:
    engine.eval()
    g = ps.grid
    micros = [m.to(dev) for m in valid_batches(valid_set, cfg.train.micro_batch_size, g.dp_rank, g.data,
                                                cfg.eval.steps)]
    if g.pipeline > 1:
        loss = engine.eval_batch(iter([(m[:, :-1], m[:, 1:]) for m in micros]),
                                 num_micro_batches=len(micros)).item()
    else:
        loss = sum(engine(m[:, :-1], m[:, 1:]).item() for m in micros) / len(micros)
    (loss,) = D.all_reduce_mean([loss], dev, ps.dp_group)
    engine.train()
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}
