"""Refuse impossible settings before any work, naming the key and what would be valid."""
from __future__ import annotations

import math

from .schema import EVAL_TASKS, TOKEN_KEYS, Config, ConfigError, ModelConfig


def _valid_heads(m: ModelConfig, tensor: int) -> list[int]:
    """Head counts (up to 128) that every check below accepts: they divide the width and the
    tensor size divides them, and give an even number of rotary dims per head."""
    return [h for h in range(1, min(m.hidden_size, 128) + 1)
            if m.hidden_size % h == 0 and h % tensor == 0 and int(m.hidden_size // h * m.rotary_pct) % 2 == 0]


# The keys of DeepSpeed's config that engine.deepspeed_config sets (dotted paths), and what sets them.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x data-parallel size)",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "bf16.enabled": "train.precision",
    "bfloat16.enabled": "train.precision",  # DeepSpeed's older name for bf16
    "fp16.enabled": "train.precision",
    "fp16.loss_scale": "train.precision (fp16 always scales dynamically)",
    "fp16.initial_scale_power": "train.precision (fp16 starts at 2**16)",
    "amp.enabled": "train.precision",
    "pipeline.pipe_partitioned": "parallel.sequence_parallel (off with it, on without)",
    "pipeline.grad_partitioned": "parallel.sequence_parallel (off with it, on without)",
    "torch_autocast.enabled": "train.precision",
    "optimizer": "train.lr, train.beta1, train.beta2, train.adam_eps and train.weight_decay (torch's AdamW)",
    "scheduler": "train.lr, train.min_lr, train.warmup_steps and train.decay_steps",
    # always true: the optimizer is torch's AdamW, which ZeRO (and ZeRO-Offload) must accept
    "zero_allow_untested_optimizer": "the package (the optimizer is always torch's AdamW)",
    "zero_force_ds_cpu_optimizer": "the package (the optimizer is always torch's AdamW)",
}
# Set by engine.deepspeed_config as defaults only; deepspeed: may change them (they only print).
DEEPSPEED_DEFAULTS = ("steps_per_print", "wall_clock_breakdown")


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted path: value} of a nested mapping (an empty mapping sets nothing)."""
    out = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_deepspeed(cfg: Config) -> None:
    """Refuse deepspeed: keys our sections own, and combinations that break our checkpoints."""
    ds = _leaves(cfg.deepspeed)
    for path in ds:
        for owned, owner in DEEPSPEED_OWNED.items():
            if path == owned or owned.startswith(path + ".") or path.startswith(owned + "."):
                fix = "remove it" if owner.startswith("the package") else "set that instead"
                raise ConfigError(f"deepspeed.{path} is set by {owner}; {fix}")
    if str(ds.get("zero_optimization.offload_param.device", "none")) != "none":
        raise ConfigError("deepspeed.zero_optimization.offload_param offloads parameters, which DeepSpeed does only "
                          "under ZeRO-3, and parallel.zero_stage=3 is not supported; remove it (offload_optimizer "
                          "works with ZeRO-1/2)")
    off = str(ds.get("zero_optimization.offload_optimizer.device", "none"))
    if off != "none":
        if off != "cpu":
            raise ConfigError(f"deepspeed.zero_optimization.offload_optimizer.device={off}: ZeRO-1/2 offload the "
                              "optimizer to CPU memory only (nvme is ZeRO-3's); set it to cpu")
        if cfg.parallel.zero_stage == 0:
            raise ConfigError("deepspeed.zero_optimization.offload_optimizer needs parallel.zero_stage=1 or 2 "
                              "(ZeRO-0 has no partitioned optimizer to offload)")
    for path in ("bf16.bf16_master_weights_and_grads", "bf16.bf16_optimizer_states",
                 "fp16.fp16_master_weights_and_grads"):
        if ds.get(path):
            raise ConfigError(f"deepspeed.{path}=true keeps master weights or Adam moments in 16 bits, but "
                              "checkpoints store and reshard them in fp32; remove it")


def freeze_layout_problem(cfg: Config) -> str | None:
    """Why freezing the old tokens (freeze_old_steps) cannot run at this layout, or None. Tested at
    tensor and data parallelism under ZeRO 0-2; not with pipeline stages or ZeRO-Offload."""
    if cfg.parallel.pipeline > 1:
        return f"not supported with parallel.pipeline={cfg.parallel.pipeline}; use parallel.pipeline=1"
    if str(_leaves(cfg.deepspeed).get("zero_optimization.offload_optimizer.device", "none")) != "none":
        return "not supported with deepspeed.zero_optimization.offload_optimizer; remove it"
    return None


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Refuse impossible settings before any work. With world_size, also check the layout.
    The checks run in this order, so the first error reported is the same whatever else is wrong."""
    _check_model(cfg)
    _check_parallel(cfg)
    _check_train(cfg)
    _check_data_log_eval(cfg, world_size)
    _check_growth(cfg)
    _check_deepspeed(cfg)
    _check_sequence_parallel(cfg)
    if world_size is not None:
        _check_world(cfg, world_size)
    _check_precision_and_pipeline(cfg)


def _check_model(cfg: Config) -> None:
    """The model's sizes: positive, heads dividing the width, an even number of rotary dims."""
    m = cfg.model
    for key in ("num_layers", "hidden_size", "num_heads", *TOKEN_KEYS, "seq_length", "vocab_multiple"):
        _need(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be a positive integer")
    _need(m.hidden_size % m.num_heads == 0,
          f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
          f"pick num_heads among {_valid_heads(m, cfg.parallel.tensor)}")
    head_dim = m.hidden_size // m.num_heads
    rot = int(head_dim * m.rotary_pct)
    _need(0.0 <= m.rotary_pct <= 1.0, f"model.rotary_pct={m.rotary_pct} must be within [0, 1]")
    _need(rot % 2 == 0, f"model.rotary_pct={m.rotary_pct} gives {rot} rotary dims of head_dim={head_dim}; "
                        "it must be even: change model.rotary_pct or model.num_heads")
    _need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be within [0, 1)")
    if m.vocab_size is not None:
        _need(m.vocab_size >= 2, f"model.vocab_size={m.vocab_size} must be at least 2")


def _check_parallel(cfg: Config) -> None:
    """Parallel sizes, and the model's sizes they must divide."""
    m, p = cfg.model, cfg.parallel
    for key in ("tensor", "pipeline"):
        _need(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be >= 1")
    _need(p.zero_stage in (0, 1, 2),
          f"parallel.zero_stage={p.zero_stage} must be 0, 1 or 2 (ZeRO-3 is not supported: tensor parallelism "
          "already shards the parameter tokens, and checkpoints are written per parameter from stages 0-2)")
    for key in TOKEN_KEYS:
        _need(getattr(m, key) % p.tensor == 0,
              f"model.{key}={getattr(m, key)} is not divisible by parallel.tensor={p.tensor}")
    _need(m.num_heads % p.tensor == 0,
          f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={p.tensor}")
    _need(m.num_layers >= p.pipeline,
          f"model.num_layers={m.num_layers} is fewer than parallel.pipeline={p.pipeline} stages")


def _check_train(cfg: Config) -> None:
    """Batch sizes, step counts, the learning-rate schedule and the spike/clip settings."""
    t = cfg.train
    _need(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    _need(t.global_batch_size % t.micro_batch_size == 0,
          f"train.global_batch_size={t.global_batch_size} is not divisible by "
          f"train.micro_batch_size={t.micro_batch_size}")
    _need(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _need(t.decay_steps is None or t.decay_steps >= 1, f"train.decay_steps={t.decay_steps} must be >= 1 or null")
    _need(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _need(t.lr > 0 and 0 <= t.min_lr <= t.lr,
          f"train.lr={t.lr} and train.min_lr={t.min_lr} must satisfy 0 <= min_lr <= lr, lr > 0")
    _need(t.exit_after_minutes is None or t.exit_after_minutes > 0,
          f"train.exit_after_minutes={t.exit_after_minutes} must be > 0 or null")
    _need(t.spike_factor is None or (math.isfinite(t.spike_factor) and t.spike_factor > 1),
          f"train.spike_factor={t.spike_factor} must be a number > 1 (a loss above that multiple of its running "
          "mean is a spike; 2 or 3 are usual) or null (off)")
    _need(t.spike_window >= 1, f"train.spike_window={t.spike_window} must be >= 1")
    _need(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")


def _check_data_log_eval(cfg: Config, world_size: int | None) -> None:
    """The data, log, eval and checkpoint sections."""
    _need(0 < cfg.data.valid_fraction < 1, f"data.valid_fraction={cfg.data.valid_fraction} must be within (0, 1)")
    _validate_blend(cfg, _need)
    _need(cfg.log.interval >= 1, f"log.interval={cfg.log.interval} must be >= 1")
    _need(cfg.log.token_stats_interval >= 0 and cfg.log.alert_skipped_steps >= 0
          and (cfg.log.peak_tflops is None or cfg.log.peak_tflops > 0),
          "log.token_stats_interval and log.alert_skipped_steps must be >= 0 (0: off), log.peak_tflops > 0")
    _need(cfg.eval.interval >= 0 and cfg.eval.steps >= 1,
          "eval.interval must be >= 0 (0 disables) and eval.steps >= 1")
    _validate_tasks(cfg, _need, world_size)
    _need(cfg.checkpoint.interval >= 0 and cfg.checkpoint.keep_last >= 0,
          "checkpoint.interval and checkpoint.keep_last must be >= 0")


def _check_growth(cfg: Config) -> None:
    """Growth stages: in step order inside the run, each appending tokens the tensor size divides."""
    p, t = cfg.parallel, cfg.train
    prev_step, stages = 0, cfg.model_stages()
    for i, g in enumerate(cfg.growth):
        _need(prev_step < g.at_step < t.steps,
              f"growth[{i}].at_step={g.at_step} must lie after the previous stage ({prev_step}) and before "
              f"train.steps={t.steps}")
        prev_step = g.at_step
        for key in TOKEN_KEYS:
            old, new = getattr(stages[i], key), getattr(stages[i + 1], key)
            _need(new >= old, f"growth[{i}].{key}={new} would shrink the model ({old} before); growth only "
                              "appends tokens")
            _need(new % p.tensor == 0, f"growth[{i}].{key}={new} is not divisible by parallel.tensor={p.tensor}")
        _need(stages[i + 1] != stages[i], f"growth[{i}] changes no token count; give qkv_tokens, proj_tokens "
                                          "or ffn_tokens")
        _need(g.warmup_steps is None or g.warmup_steps >= 0,
              f"growth[{i}].warmup_steps={g.warmup_steps} must be >= 0 or null (train.warmup_steps)")
        end = cfg.segment_end(i + 1)
        _need(0 <= g.freeze_old_steps <= end - g.at_step,
              f"growth[{i}].freeze_old_steps={g.freeze_old_steps} must be >= 0 and end by the next growth or "
              f"train.steps (at most {end - g.at_step})")
        if g.freeze_old_steps:
            _need(freeze_layout_problem(cfg) is None, f"growth[{i}].freeze_old_steps: {freeze_layout_problem(cfg)}")


def _check_world(cfg: Config, world_size: int) -> None:
    """The launched processes: a multiple of tensor x pipeline, and a global batch that splits over data."""
    p, t = cfg.parallel, cfg.train
    mp = p.tensor * p.pipeline
    _need(world_size % mp == 0,
          f"world size {world_size} does not factor into parallel.tensor={p.tensor} x "
          f"parallel.pipeline={p.pipeline} x data; launch a multiple of {mp} processes")
    dp = world_size // mp
    _need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
          f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
          f"{t.micro_batch_size} x data-parallel size {dp}; valid global batch sizes are multiples of "
          f"{t.micro_batch_size * dp}")


def _check_precision_and_pipeline(cfg: Config) -> None:
    """Combinations DeepSpeed or our checkpoints cannot run: 16-bit without ZeRO, and what the
    pipeline engine refuses."""
    p, t = cfg.parallel, cfg.train
    _need(t.precision == "fp32" or p.zero_stage >= 1,
          f"train.precision={t.precision} needs parallel.zero_stage>=1: checkpoints read and reshard the fp32 master "
          "weights and Adam moments per parameter, which DeepSpeed offers from ZeRO-1 on (ZeRO-1 on one "
          "data-parallel rank costs nothing)")
    if p.pipeline > 1:
        _need(t.spike_factor is None,
              f"train.spike_factor={t.spike_factor} is not supported with parallel.pipeline={p.pipeline}: DeepSpeed's "
              "pipeline engine applies the update inside its batch, before the loss can be judged; set "
              "train.spike_factor=null (non-finite steps are still skipped)")
        _need(t.compile is not True,
              "train.compile=true is not supported with parallel.pipeline>1; set train.compile=false")
        _need(p.zero_stage <= 1,
              f"parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline}: ZeRO-2/3 partition "
              "gradients, which the pipeline engine accumulates across micro-batches itself, so DeepSpeed "
              "refuses them; set parallel.zero_stage=1 (optimizer state still sharded over data parallel)")


def _check_sequence_parallel(cfg: Config) -> None:
    """Sequence parallelism shards the sequence over the tensor ranks: it needs several, and a
    sequence length they divide."""
    p, m = cfg.parallel, cfg.model
    if not p.sequence_parallel:
        return
    if p.tensor < 2:
        raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tensor > 1 (it splits the sequence "
                          f"over the tensor ranks; got parallel.tensor={p.tensor}); set "
                          "parallel.sequence_parallel=false or raise parallel.tensor")
    if m.seq_length % p.tensor:
        raise ConfigError(f"parallel.sequence_parallel=true: model.seq_length={m.seq_length} is not divisible by "
                          f"parallel.tensor={p.tensor}; pick a multiple of {p.tensor} or set "
                          "parallel.sequence_parallel=false")


def _validate_tasks(cfg: Config, need, world_size: int | None) -> None:
    e = cfg.eval
    unknown = [t for t in e.tasks if t not in EVAL_TASKS]
    need(not unknown, f"eval.tasks: unknown task {', '.join(map(str, unknown))}; known: {', '.join(EVAL_TASKS)}")
    need(len(set(e.tasks)) == len(e.tasks), f"eval.tasks={e.tasks} names a task twice")
    need(e.tasks_interval >= 0, f"eval.tasks_interval={e.tasks_interval} must be >= 0 (0: only at the end)")
    need(e.tasks_limit is None or e.tasks_limit >= 1, f"eval.tasks_limit={e.tasks_limit} must be >= 1 or null")
    if world_size is not None and e.tasks and e.tasks_limit is not None:
        # the documents are split over all ranks, and lm-eval's evaluator fails on a rank that gets none
        need(e.tasks_limit >= world_size, f"eval.tasks_limit={e.tasks_limit} is smaller than the {world_size} "
                                          f"ranks the documents are split over; raise it to at least {world_size}")


def _validate_blend(cfg: Config, need) -> None:
    blend = cfg.data.blend
    for i, src in enumerate(blend):
        need(bool(src.path), f"data.blend[{i}] has no path; give each source as {{path: data/NAME, weight: W}}")
        need(math.isfinite(src.weight) and src.weight >= 0,
             f"data.blend[{i}].weight={src.weight} must be a number >= 0")
        first = next(j for j, other in enumerate(blend) if other.path == src.path)
        need(first == i, f"data.blend[{i}].path={src.path} repeats data.blend[{first}].path; give each dataset once "
                         "(with the weights added up)")
    if blend:
        need(sum(s.weight for s in blend) > 0, "the data.blend weights sum to 0; give at least one source a "
                                               "positive weight")


def padded_vocab_size(cfg: Config, tokenizer_vocab: int) -> int:
    """Embedding rows: the configured size, or the tokenizer's padded up to vocab_multiple x tensor."""
    m = cfg.model
    if m.vocab_size is not None:
        if tokenizer_vocab > m.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size={m.vocab_size}; raise "
                f"model.vocab_size to at least {tokenizer_vocab} or leave it unset (null)")
        multiple = cfg.parallel.tensor
        if m.vocab_size % multiple:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tensor={multiple}")
        return m.vocab_size
    multiple = m.vocab_multiple * cfg.parallel.tensor
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)
