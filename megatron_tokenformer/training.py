"""The pretraining loop: build model, data and DeepSpeed engine, then train, evaluate, log, save."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import torch
import yaml

from . import checkpoint as C
from . import distributed as D
from .config import Config, ConfigError, padded_vocab_size, validate
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


def lr_lambda(cfg: Config):
    """Multiplier of train.lr after `step` optimizer steps: linear warmup, cosine to min_lr, then flat."""
    t = cfg.train
    warmup, decay, floor = t.warmup_steps, cfg.decay_steps, t.min_lr / t.lr

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


def build_engine(cfg: Config, vocab: int, ps: D.ParallelState, world: int):
    """The model (pipelined or not), AdamW and its LR schedule in a DeepSpeed engine; returns
    (engine, text describing the pipeline partition or None)."""
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # A pipeline module brings its own grid (the same rank order) as DeepSpeed's mpu.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world),
                                           mpu=None if cfg.parallel.pipeline > 1 else ps.mpu())
    return engine, partition_text


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
    if resume:
        C.check_loadable(resume_meta, cfg, cfg.model, resume[0] / resume[1], meta.tokenizer_sha256)
    # A resumed run keeps the checkpoint's vocab rows (the padding may differ at another tensor size).
    vocab = resume_meta["vocab_size"] if resume else padded_vocab_size(cfg, meta.vocab_size)

    pipelined = cfg.parallel.pipeline > 1
    engine, partition_text = build_engine(cfg, vocab, ps, world)
    # Dropout acts on activations replicated over the tensor group: same stream on its ranks,
    # a different one per data-parallel rank.
    torch.manual_seed(cfg.train.seed + 1 + grid.dp_rank)
    if resume:
        C.load(engine, cfg, grid, *resume, resume_meta)
    step = resume_meta["step"] if resume_meta else 0
    consumed = resume_meta["consumed_samples"] if resume_meta else 0

    run_info = _run_info(cfg, resume_meta)
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (cfg.run_dir / "run_info.json").write_text(json.dumps(run_info, indent=1))
    monitor = Monitor(cfg, grid.is_logger, run_info, step)
    with torch.device("meta"):  # the whole model's count, whatever this rank holds
        n_params = count_parameters(TokenFormerModel(cfg.model, vocab))
    flops_per_token = model_flops_per_token(cfg.model, vocab)
    monitor.message(
        f"TokenFormer: {n_params / 1e6:.2f}M parameters, vocab {vocab}, {world} rank(s) (tensor {grid.tensor} "
        f"x pipeline {grid.pipeline} x data {grid.data}), {cfg.grad_accum_steps(world)} micro-batches/step, "
        f"{len(train_set)} train samples; "
        + (f"resumed from {resume[0] / resume[1]} at step {step}" if resume else "fresh start"))
    if partition_text:
        monitor.message(partition_text)
    if step >= cfg.train.steps:
        monitor.message(f"the checkpoint is at step {step} and train.steps={cfg.train.steps}: nothing to train; "
                        "raise train.steps to continue")

    batches = TrainBatches(train_set, cfg.train.seed, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                           grid.dp_rank, grid.data, consumed_samples=consumed)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    last: dict = {}
    # tokens/s counts training time only: eval and checkpoint time is subtracted as `paused`.
    window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
    in_trouble = 0  # consecutive steps with a non-finite loss or gradients (DeepSpeed skips their update)
    while step < cfg.train.steps:
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
            path = C.save(engine, cfg, grid, step, batches.consumed_samples, run_info, vocab, meta.tokenizer_sha256)
            monitor.message(f"step {step}: saved {path}")
        paused += time.perf_counter() - t0
    monitor.close()
    return last


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
