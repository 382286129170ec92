"""The config's typed sections: every field with its type, default and docstring."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from ..errors import UserError


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
    pattention_impl: Literal["auto", "fused", "compiled", "reference"] = "auto"
    """fused: hand-written backward keeping only the scores; compiled: the same with torch.compile'd
    elementwise kernels; reference: autograd through the formulas; auto: the fastest measured on
    the device (compiled on CUDA, fused elsewhere; docs/PERFORMANCE.md)."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size: ranks that share every Pattention's parameter tokens."""
    pipeline: int = 1
    """Pipeline-parallel size: stages the blocks are cut into."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (0-2) for the optimizer state (1) and gradients (2) over data-parallel ranks.
    bf16/fp16 need >= 1 (checkpoints read the fp32 master weights per parameter from it)."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (needs tensor > 1 and seq_length divisible by it): the residual
    stream, norms and dropout run on 1/tensor of the sequence, so activation memory per rank falls by
    about the tensor size, for the same communication volume. A runtime choice: checkpoints are the same."""


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
    """Stop after this many consecutive skipped steps (a non-finite loss or gradients, or a loss spike:
    train.spike_factor) (0: never stop)."""
    spike_factor: Optional[float] = None
    """Skip the update of a step whose loss (the global batch's mean, as logged) exceeds this many
    times the running mean of recent losses, and log it (a `spike_loss` row in metrics.jsonl, a
    console line); train.max_skipped_steps of them in a row stop the run. The running mean m over the
    last accepted steps (steps whose update was applied; skipped ones never enter it), counted by c:
    m <- m + (loss - m) / min(c, train.spike_window) after each, so the exact mean of the first
    spike_window losses, then an exponential average with weight 1/spike_window. No step is judged
    before c reaches spike_window. A skipped step is skipped as a non-finite one is: the step counts,
    its data is consumed, parameters, Adam moments and the LR schedule stay as they were (fp16's loss
    scale counts it as a step without overflow). m and c are in every checkpoint, so resume is exact.
    None: off. Not with parallel.pipeline>1 (the pipeline engine steps inside its batch)."""
    spike_window: int = 100
    """Steps of the loss's running mean for train.spike_factor: its warm-up (no step is judged
    before this many accepted steps) and the inverse weight of each new loss after it."""
    exit_after_minutes: Optional[float] = None
    """Stop cleanly (finish the step, save a checkpoint, exit 0) after this many minutes of wall
    clock, before a scheduler's time limit. None: no limit. SIGTERM and SIGUSR1 stop the same way."""
    compile: Union[bool, Literal["auto"]] = "auto"
    """torch.compile each block (fuses Pattention's elementwise passes; not with parallel.pipeline>1).
    auto: on CUDA without tensor or pipeline parallelism (the fastest measured there), off on CPU, where
    compiling costs more start-up time than it saves in a short run."""


@dataclass
class BlendSource:
    path: str = ""
    """A dataset (like data.path); every source must use the same tokenizer."""
    weight: float = 1.0
    """This source's share of the training samples (the weights are normalised to sum to 1)."""
    prepare: Optional[str] = None
    """The command that builds this path (the error names it when the data is missing)."""


@dataclass
class DataConfig:
    path: str = "data/shakespeare"
    """The token dataset: a directory written by tools/prepare_data.py (Megatron .bin/.idx pairs, its
    tokenizer, metadata.json), or any Megatron indexed dataset (GPT-NeoX, Megatron-LM, datatrove, Pythia's
    Pile): one prefix (PREFIX.bin + PREFIX.idx, or Pythia's PREFIX-000NN-of-000MM.bin pieces) or a directory
    whose prefixes are read in name order as one dataset. Not read when data.blend is given."""
    tokenizer: Optional[str] = None
    """The tokenizer file (a Hugging Face tokenizer.json or a sentencepiece .model) of a Megatron dataset
    that carries none, e.g. GPT-NeoX-20B's tokenizer.json for Pythia's Pile. Directories from
    tools/prepare_data.py carry their own: leave it unset for them."""
    prepare: Optional[str] = None
    """The command that builds data.path (the error names it when the data is missing)."""
    order: Literal["shuffled", "stored"] = "shuffled"
    """shuffled: samples are windows of model.seq_length + 1 tokens over the concatenated token stream
    (Megatron style), each epoch in its own pseudo-random order of (train.seed, epoch). stored: each
    stored sequence, which must hold exactly model.seq_length + 1 tokens, is one sample, read in stored
    order, so the step logged as N trains on rows (N-1)*B ... N*B-1 for global batch B: Pythia's order,
    step for step (its preshuffled Pile). Without data.valid_path the last data.valid_fraction of the rows
    are held out for validation, and training wraps to row 0 after the rows before them."""
    valid_path: Optional[str] = None
    """A separate validation dataset (like data.path; Megatron's --valid-data-path), read in order as a
    token stream of model.seq_length + 1 windows whatever data.order says. Then every row of data.path
    (or of the data.blend sources) trains and data.valid_fraction is not used. None: validation is the
    tail of the training data."""
    valid_fraction: float = 0.02
    """Fraction of the samples (the tail of the corpus) held out for validation (without data.valid_path)."""
    verify_checksums: bool = False
    """Checksum every file against metadata.json at start-up: one full read of the corpus on every rank, at
    every start (minutes at the Pile's size). Off: start-up checks headers and sizes only; check the
    contents on demand with `tools/inspect_data.py PATH --verify` (which can split the work)."""
    blend: list[BlendSource] = field(default_factory=list)
    """Train on several prepared datasets mixed by weight, a list of `{path, weight, prepare}` (empty: data.path
    alone). Sources are interleaved greedily (Megatron's BlendedDataset: each sample comes from the source
    whose share lags its weight most), so any 1000 consecutive samples match the weights within 1%; a source
    that runs out starts a new epoch (its own shuffle). Validation interleaves each source's held-out tail
    with the same weights."""


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
    async_save: bool = False
    """Write checkpoints in the background: the save copies this rank's part (fp32 weights, Adam
    moments, RNG) to host memory, training goes on while a thread writes the files, and the
    checkpoint becomes visible (renamed from step_N.partial) only once every rank's files are
    complete. The next save, a growth, a stop and the end of the run wait for it first, and the
    run's last checkpoint is written directly. Needs host memory for one copy of this rank's part."""


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
    lock: bool = True
    """Hold a lock on the run directory, so a second launch into it stops with a message instead of
    corrupting it (set false only on a filesystem without file locks)."""
    step_timers: bool = True
    """Log step_ms and its parts (step_ms/data, /forward_backward, /optimizer, /other). On GPU each
    part boundary synchronises the device (a cost stated in docs/PERFORMANCE.md); false: no timers."""
    peak_tflops: Optional[float] = None
    """The device's peak TFLOP/s at train.precision, for `mfu` on a device not in observe.PEAK_TFLOPS
    (None: the table's value for the GPU; no mfu on a CPU or an unknown GPU)."""
    zero_grads: bool = False
    """Log zero_grads, the number of gradient elements exactly zero at each logged step (one extra
    pass over the gradients)."""
    token_stats_interval: int = 0
    """Every this many steps (and at each growth) log how each Pattention layer uses its parameter
    tokens, on one validation micro-batch (tokens/... keys, README "Monitoring"); 0: never."""
    alert_skipped_steps: int = 3
    """With W&B on, send a W&B alert when this many consecutive steps were skipped (0: never)."""


# The zero-shot tasks eval.tasks may name (evaluation/offline.py holds their files' splits and counts).
EVAL_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


@dataclass
class EvalConfig:
    interval: int = 50
    """Validation every this many steps (and at the end); 0 disables."""
    steps: int = 4
    """Validation batches of train.global_batch_size samples each (Megatron's eval_iters): every
    evaluation takes the validation set's first eval.steps x train.global_batch_size samples, in
    order (all of its whole batches if it has fewer), at any layout, and logs their mean token loss."""
    tasks: list[str] = field(default_factory=list)
    """Zero-shot tasks to run on the live model, e.g. [piqa, hellaswag] (any of lambada_openai,
    hellaswag, piqa, arc_easy, arc_challenge, winogrande; docs/EVAL.md). Their files must be prepared
    first (python tools/prepare_eval_data.py). Empty: none."""
    tasks_interval: int = 0
    """Run eval.tasks every this many steps and at the end of the run; 0: only at the end."""
    tasks_limit: Optional[int] = None
    """Score only the first N documents of each task (None: all of them)."""
    tasks_data: Optional[str] = None
    """Directory of the prepared task files; None: $MEGATRON_TOKENFORMER_EVAL_DATA, else data/eval."""


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
    key_init: Literal["zero", "normal"] = "zero"
    """New keys: zero (exact) or normal(model.init_std), the reference code's (changes the function)."""
    tau: Literal["keep", "sqrt-n"] = "keep"
    """keep each layer's tau (exact) or sqrt-n: recompute it for the new token count, the reference
    code's (changes the function)."""
    reset_optimizer: bool = False
    """Zero all Adam moments and the step count at this growth (the reference code) instead of
    carrying the old tokens' moments."""
    warmup_steps: Optional[int] = None
    """LR warmup of the schedule that starts at this growth (0: none, straight into the decay).
    None: train.warmup_steps."""
    freeze_old_steps: int = 0
    """For the first this many steps after this growth the tokens that existed before it stay fixed,
    weights and Adam moments bit for bit; only the new tokens (and the embedding, final norm) train.
    The window must end by the next growth. Layouts: any tensor and data size, ZeRO 0-2, no
    pipeline parallelism or ZeRO-Offload."""


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
    ffn_tokens}` (and per-growth options: key_init, tau, reset_optimizer, warmup_steps,
    freeze_old_steps); `model` holds the starting size."""
    deepspeed: dict = field(default_factory=dict)
    """DeepSpeed settings this config does not model, nested as in a DeepSpeed JSON config (e.g.
    `zero_optimization: {overlap_comm: true}`), merged into the engine's config (written to
    <log.dir>/deepspeed_config.json). Keys the sections above set (batch sizes, clipping, precision,
    ZeRO stage, optimizer) are refused here: set them there."""

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
