"""Typed run configuration: YAML file + `section.key=value` overrides, validated before any work.

Every field has a docstring (the string literal under it); `describe()` prints them. The same
config object travels into the run directory, every checkpoint and the W&B run, so the
sections already carry what tensor/pipeline parallelism and growth need.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration: the message names the key and what would be valid."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Number of TokenFormer blocks."""
    hidden_size: int = 128
    """Model width d (the size of every token vector)."""
    num_heads: int = 4
    """Attention heads; hidden_size must divide by it (and by parallel.tensor)."""
    qkv_tokens: int = 128
    """Key-value parameter tokens of each of the Q, K and V Pattention layers."""
    proj_tokens: int = 128
    """Key-value parameter tokens of the attention output Pattention."""
    ffn_tokens: int = 512
    """Key-value parameter tokens of the FFN Pattention (the block's only nonlinearity)."""
    seq_length: int = 128
    """Tokens per training sample (context length)."""
    vocab_size: Optional[int] = None
    """Embedding rows. None: the dataset's tokenizer vocab, padded up to vocab_multiple."""
    vocab_multiple: int = 128
    """Pad the vocab to a multiple of this (times parallel.tensor), for fast matmuls and TP."""
    norm: Literal["l2_norm_gelu", "gelu_l2_norm", "softmax"] = "l2_norm_gelu"
    """Pattention score normalisation theta (DESIGN.md section 1)."""
    rotary_pct: float = 0.25
    """Fraction of each head's dims that get rotary position embedding."""
    rotary_base: float = 10000.0
    """Rotary embedding base."""
    dropout: float = 0.0
    """Dropout on the attention and FFN outputs before the residual add."""
    norm_eps: float = 1e-5
    """Epsilon of the LayerNorms."""
    init_std: float = 0.02
    """Std of the embedding and key-token init; value tokens use 2/(L*sqrt(d))."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations."""
    pattention_impl: Literal["fused", "compiled", "reference"] = "fused"
    """fused: hand-written backward keeping only the scores; compiled: the same with torch.compile'd
    elementwise kernels (GPUs); reference: autograd through the formulas."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size: ranks that share every Pattention's parameter tokens."""
    pipeline: int = 1
    """Pipeline-parallel size: stages the blocks are cut into."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (0-2) for the optimizer state (1) and gradients (2) over data-parallel ranks.
    bf16/fp16 need >= 1 (checkpoints read the fp32 master weights per parameter from it)."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    steps: int = 200
    """Optimizer steps to train for (a resumed run continues up to this step)."""
    decay_steps: Optional[int] = None
    """Length of the LR schedule in steps (warmup + cosine). None: up to train.steps, or in a
    growing run up to the next growth stage (each stage, and each run resumed from a grown
    checkpoint, starts its own schedule)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay (and after it)."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to train.lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on every parameter (the final norm's gain is zero-centred)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 uses dynamic loss scaling, bf16 keeps fp32 master weights."""
    seed: int = 1234
    """Seed of the model init, the data order and dropout."""
    max_skipped_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradients (0: never stop)."""
    compile: bool = False
    """torch.compile the model (fuses Pattention's elementwise passes; not with parallel.pipeline>1)."""


@dataclass
class DataConfig:
    path: str = "data/shakespeare"
    """Directory written by tools/prepare_data.py (shards, tokenizer.model, metadata.json)."""
    prepare: Optional[str] = None
    """The command that builds data.path (the error names it when the data is missing)."""
    valid_fraction: float = 0.02
    """Fraction of the samples (the tail of the corpus) held out for validation."""
    verify_checksums: bool = True
    """Check shard and tokenizer sha256 against metadata.json at start-up."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint directory; a run finding one here resumes from the latest. None: <log.dir>/checkpoints."""
    interval: int = 100
    """Save every this many steps (and always at the end); 0: only at the end."""
    keep_last: int = 2
    """Keep this many newest checkpoints (0 keeps all)."""
    load: Optional[str] = None
    """Start from this checkpoint directory when checkpoint.dir holds none (e.g. a grown model)."""


@dataclass
class LogConfig:
    run_name: str = "tiny"
    """Name of the run (W&B run name, default run directory)."""
    dir: Optional[str] = None
    """Run directory (metrics.jsonl, config.yml, checkpoints). None: runs/<run_name>."""
    interval: int = 10
    """Log training metrics every this many steps."""
    wandb_project: Optional[str] = None
    """W&B project; None disables W&B whatever wandb_mode says."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode: online needs WANDB_API_KEY; offline writes under <log.dir>/wandb."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class EvalConfig:
    interval: int = 50
    """Validation every this many steps (and at the end); 0 disables."""
    steps: int = 4
    """Validation micro-batches per data-parallel rank."""


@dataclass
class GrowthStage:
    at_step: int = 0
    """After this many optimizer steps the model grows in place: checkpoint, append key-value tokens
    (new keys zero, new values from the init, tau kept: the function is unchanged), rebuild the
    engine, continue with a fresh LR schedule (warmup + decay up to the next growth or train.steps)."""
    qkv_tokens: Optional[int] = None
    """model.qkv_tokens from this step on (None: unchanged)."""
    proj_tokens: Optional[int] = None
    """model.proj_tokens from this step on (None: unchanged)."""
    ffn_tokens: Optional[int] = None
    """model.ffn_tokens from this step on (None: unchanged)."""


TOKEN_KEYS = ("qkv_tokens", "proj_tokens", "ffn_tokens")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging and monitoring."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    growth: list[GrowthStage] = field(default_factory=list)
    """Incremental scaling in one launch: a list of stages `{at_step, qkv_tokens, proj_tokens,
    ffn_tokens}`; `model` holds the starting size."""

    # ---- derived values -------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.log.dir or f"runs/{self.log.run_name}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def model_stages(self) -> list[ModelConfig]:
        """The model at the start and after each growth stage."""
        out = [self.model]
        for g in self.growth:
            out.append(dataclasses.replace(out[-1], **{k: getattr(g, k) for k in TOKEN_KEYS
                                                      if getattr(g, k) is not None}))
        return out

    def segment_end(self, stage: int) -> int:
        """The step where model stage `stage` ends: the next growth, or train.steps."""
        return self.growth[stage].at_step if stage < len(self.growth) else self.train.steps

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline)

    def grad_accum_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- loading ---------------------------------------------------------------------------------

def _field_docs(cls) -> dict[str, str]:
    """Docstrings under the fields, read from the source (the single place they are written)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def describe() -> str:
    """Every config key with its type, default and docstring (for --help)."""
    lines = []
    for sec in fields(Config):
        cls = GrowthStage if sec.name == "growth" else sec.default_factory
        docs = _field_docs(cls)
        lines.append(f"{sec.name}:" + ("  # a list of stages, each with:" if sec.name == "growth" else ""))
        for f in fields(cls):
            doc = " ".join(docs.get(f.name, "").split())
            name = f"growth[].{f.name}" if sec.name == "growth" else f"{sec.name}.{f.name}"
            lines.append(f"  {name} = {f.default!r}  # {doc}")
    return "\n".join(lines)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _growth(value: Any, origin: str) -> list[GrowthStage]:
    """The `growth` list: each item a mapping of GrowthStage keys."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"growth ({origin}) must be a list of stages like "
                          "[{at_step: 100, qkv_tokens: 256, proj_tokens: 256, ffn_tokens: 1024}]")
    hints, stages = get_type_hints(GrowthStage), []
    for i, item in enumerate(value):
        stage = GrowthStage()
        for key, v in item.items():
            if key not in hints:
                raise ConfigError(f"unknown key '{key}' in growth[{i}] ({origin}); keys are: {', '.join(hints)}")
            setattr(stage, key, _coerce(v, hints[key], f"growth[{i}].{key}"))
        stages.append(stage)
    return stages


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}' ({origin}); sections are: {', '.join(sections)}")
    sub = getattr(cfg, section)
    hints = get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(
            f"unknown config key '{section}.{key}' ({origin}); keys of '{section}' are: {', '.join(hints)}")
    setattr(sub, key, _coerce(value, hints[key], f"{section}.{key}"))


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.steps=20")
    key, raw = text.split("=", 1)
    section, name = key.split(".", 1)
    # YAML parsing gives ints/floats/bools/null the same meaning as in the config file.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return section.strip(), name.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (may be None: defaults), then apply `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (pass --config configs/tiny.yml or another file)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
        for section, values in data.items():
            if section == "growth":
                cfg.growth = _growth(values, str(path))
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"section '{section}' in {path} must be a mapping of key: value")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for text in overrides:
        if text.startswith("growth="):  # the whole list, in YAML flow style
            cfg.growth = _growth(yaml.safe_load(text.split("=", 1)[1]), "command line")
            continue
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        if section == "growth":
            cfg.growth = _growth(values, "stored config")
            continue
        for key, value in values.items():
            _apply(cfg, section, key, value, "stored config")
    return cfg


def _valid_heads(m: ModelConfig, tensor: int) -> list[int]:
    """Head counts (up to 128) that every check below accepts: they divide the width and the
    tensor size divides them, and give an even number of rotary dims per head."""
    return [h for h in range(1, min(m.hidden_size, 128) + 1)
            if m.hidden_size % h == 0 and h % tensor == 0 and int(m.hidden_size // h * m.rotary_pct) % 2 == 0]


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Refuse impossible settings before any work. With world_size, also check the layout."""
    m, p, t = cfg.model, cfg.parallel, cfg.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for key in ("num_layers", "hidden_size", "num_heads", *TOKEN_KEYS, "seq_length", "vocab_multiple"):
        need(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be a positive integer")
    need(m.hidden_size % m.num_heads == 0,
         f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
         f"pick num_heads among {_valid_heads(m, cfg.parallel.tensor)}")
    head_dim = m.hidden_size // m.num_heads
    rot = int(head_dim * m.rotary_pct)
    need(0.0 <= m.rotary_pct <= 1.0, f"model.rotary_pct={m.rotary_pct} must be within [0, 1]")
    need(rot % 2 == 0, f"model.rotary_pct={m.rotary_pct} gives {rot} rotary dims of head_dim={head_dim}; "
                       "it must be even: change model.rotary_pct or model.num_heads")
    need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be within [0, 1)")
    if m.vocab_size is not None:
        need(m.vocab_size >= 2, f"model.vocab_size={m.vocab_size} must be at least 2")
    for key in ("tensor", "pipeline"):
        need(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be >= 1")
    need(p.zero_stage in (0, 1, 2),
         f"parallel.zero_stage={p.zero_stage} must be 0, 1 or 2 (ZeRO-3 is not supported: tensor parallelism "
         "already shards the parameter tokens, and checkpoints are written per parameter from stages 0-2)")
    for key in TOKEN_KEYS:
        need(getattr(m, key) % p.tensor == 0,
             f"model.{key}={getattr(m, key)} is not divisible by parallel.tensor={p.tensor}")
    need(m.num_heads % p.tensor == 0,
         f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={p.tensor}")
    need(m.num_layers >= p.pipeline,
         f"model.num_layers={m.num_layers} is fewer than parallel.pipeline={p.pipeline} stages")
    need(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    need(t.global_batch_size % t.micro_batch_size == 0,
         f"train.global_batch_size={t.global_batch_size} is not divisible by "
         f"train.micro_batch_size={t.micro_batch_size}")
    need(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    need(t.decay_steps is None or t.decay_steps >= 1, f"train.decay_steps={t.decay_steps} must be >= 1 or null")
    need(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    need(t.lr > 0 and 0 <= t.min_lr <= t.lr,
         f"train.lr={t.lr} and train.min_lr={t.min_lr} must satisfy 0 <= min_lr <= lr, lr > 0")
    need(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    need(0 < cfg.data.valid_fraction < 1, f"data.valid_fraction={cfg.data.valid_fraction} must be within (0, 1)")
    need(cfg.log.interval >= 1, f"log.interval={cfg.log.interval} must be >= 1")
    need(cfg.eval.interval >= 0 and cfg.eval.steps >= 1,
         "eval.interval must be >= 0 (0 disables) and eval.steps >= 1")
    need(cfg.checkpoint.interval >= 0 and cfg.checkpoint.keep_last >= 0,
         "checkpoint.interval and checkpoint.keep_last must be >= 0")
    prev_step, stages = 0, cfg.model_stages()
    for i, g in enumerate(cfg.growth):
        need(prev_step < g.at_step < t.steps,
             f"growth[{i}].at_step={g.at_step} must lie after the previous stage ({prev_step}) and before "
             f"train.steps={t.steps}")
        prev_step = g.at_step
        for key in TOKEN_KEYS:
            old, new = getattr(stages[i], key), getattr(stages[i + 1], key)
            need(new >= old, f"growth[{i}].{key}={new} would shrink the model ({old} before); growth only "
                             "appends tokens")
            need(new % p.tensor == 0, f"growth[{i}].{key}={new} is not divisible by parallel.tensor={p.tensor}")
        need(stages[i + 1] != stages[i], f"growth[{i}] changes no token count; give qkv_tokens, proj_tokens "
                                         "or ffn_tokens")
    if world_size is not None:
        mp = p.tensor * p.pipeline
        need(world_size % mp == 0,
             f"world size {world_size} does not factor into parallel.tensor={p.tensor} x "
             f"parallel.pipeline={p.pipeline} x data; launch a multiple of {mp} processes")
        dp = world_size // mp
        need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
             f"{t.micro_batch_size} x data-parallel size {dp}; valid global batch sizes are multiples of "
             f"{t.micro_batch_size * dp}")
    need(t.precision == "fp32" or p.zero_stage >= 1,
         f"train.precision={t.precision} needs parallel.zero_stage>=1: checkpoints read and reshard the fp32 master "
         "weights and Adam moments per parameter, which DeepSpeed offers from ZeRO-1 on (ZeRO-1 on one "
         "data-parallel rank costs nothing)")
    if p.pipeline > 1:
        need(not t.compile, "train.compile=true is not supported with parallel.pipeline>1; set train.compile=false")
        need(p.zero_stage <= 1,
             f"parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline}: ZeRO-2/3 partition "
             "gradients, which the pipeline engine accumulates across micro-batches itself, so DeepSpeed "
             "refuses them; set parallel.zero_stage=1 (optimizer state still sharded over data parallel)")


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
