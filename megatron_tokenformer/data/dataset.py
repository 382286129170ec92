"""Reading a prepared token dataset: metadata checks, token stream, samples, batches.

The on-disk contract (written by ``prepare.py``): a directory holding
``metadata.json``, the tokenizer (``tokenizer.model`` sentencepiece or ``tokenizer.json``
Hugging Face ``tokenizers``), ``doc_index.npy`` and flat token shards
``tokens_NNNNN.bin`` (documents concatenated, each followed by the EOD id).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..fileio import sha256_file
from ..tokenizer import Tokenizer
from ..tokenizer import load_tokenizer as read_tokenizer

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.model"  # the name of datasets written before tokenizer_file was recorded
DOC_INDEX_FILE = "doc_index.npy"
DEFAULT_PATH = "data/shakespeare"  # where `python tools/prepare_data.py` puts the built-in corpus
PREPARE_HINT = "python tools/prepare_data.py"


class DataError(UserError, ValueError):
    """A dataset problem the user can fix (missing, corrupt, too small, bad input)."""


@dataclass
class DatasetMeta:
    path: str
    format_version: int
    vocab_size: int
    eod_id: int
    dtype: str
    num_tokens: int
    num_documents: int
    tokenizer_sha256: str
    shards: list[dict] = field(default_factory=list)
    source: str = ""
    tokenizer_file: str = TOKENIZER_FILE
    """tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face tokenizers)."""

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.path) / self.tokenizer_file

    def to_json(self) -> dict:
        # `path` is where the dataset lives now, not part of its content.
        return {k: v for k, v in self.__dict__.items() if k != "path"}


def prepare_command(path: str | Path) -> str:
    """The command that builds a dataset at ``path`` when no recipe is known."""
    if Path(path).resolve() == Path(DEFAULT_PATH).resolve():
        return PREPARE_HINT
    return f"{PREPARE_HINT} --input <your text files> --output {shlex.quote(str(path))}"


def _builds(recipe: str, path: str | Path) -> bool:
    """Whether ``recipe`` writes ``path``: data.path may be overridden while data.prepare is not."""
    try:
        argv = shlex.split(recipe)
    except ValueError:
        return True
    outputs = ([b for a, b in zip(argv, argv[1:]) if a == "--output"]
               + [a.removeprefix("--output=") for a in argv if a.startswith("--output=")])
    return all(Path(out).resolve() == Path(path).resolve() for out in outputs)


def load_meta(path: str | Path, verify: bool = True, recipe: str | None = None,
              key: str = "data.path") -> DatasetMeta:
    """Load and check ``metadata.json``; with ``verify`` also checksum shards and tokenizer.

    Size checks are always done (cheap, catch truncated copies); checksums cost one
    read of the data and catch silent corruption or a swapped tokenizer. ``recipe`` is the
    command that builds ``path`` (config key data.prepare); the errors name it unless it
    writes somewhere else. ``key`` is the config key that names ``path`` (a blend source's differs).
    """
    recipe_key = key.rsplit(".", 1)[0] + ".prepare"
    root = Path(path)
    meta_file = root / METADATA_FILE
    if recipe is not None and not _builds(recipe, path):
        recipe = None
    command = recipe or prepare_command(path)
    if not root.is_dir():
        how = (f"build it with `{recipe}` (config key {recipe_key}), or from your own text files with "
               f"`{prepare_command(path)}`" if recipe else f"build it with `{command}`")
        raise DataError(f"dataset directory '{root}' (config key {key}) does not exist; {how} "
                        f"(or point {key} at a prepared dataset)")
    if not meta_file.is_file():
        raise DataError(
            f"'{meta_file}' not found: '{root}' (config key {key}) is not a prepared dataset; "
            f"point {key} at a prepared dataset, or build one with `{command}` into a new or empty "
            f"directory")
    rerun = f"re-run `{command}` with --force"  # for a damaged dataset
    try:
        raw = json.loads(meta_file.read_text())
        meta = DatasetMeta(path=str(root), **raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"'{meta_file}' is unreadable ({e}); {rerun}") from e
    if meta.format_version != FORMAT_VERSION:
        raise DataError(f"'{meta_file}' has format_version {meta.format_version}, expected "
                        f"{FORMAT_VERSION}; {rerun}")

    itemsize = np.dtype(meta.dtype).itemsize
    tok_file = meta.tokenizer_path
    if not tok_file.is_file():
        raise DataError(f"tokenizer '{tok_file}' is missing; {rerun}")
    if sum(s["num_tokens"] for s in meta.shards) != meta.num_tokens:
        raise DataError(f"'{meta_file}' is inconsistent (shard token counts do not add up to "
                        f"num_tokens); {rerun}")
    for shard in meta.shards:
        f = root / shard["file"]
        if not f.is_file():
            raise DataError(f"shard '{f}' is missing; {rerun}")
        expected = shard["num_tokens"] * itemsize
        if f.stat().st_size != expected:
            raise DataError(f"shard '{f}' has {f.stat().st_size} bytes, expected {expected}; "
                            f"{rerun}")
    doc_file = root / DOC_INDEX_FILE
    if not doc_file.is_file() or np.load(doc_file, mmap_mode="r").shape != (meta.num_documents,):
        raise DataError(f"'{doc_file}' is missing or does not hold {meta.num_documents} entries; "
                        f"{rerun}")

    if verify:
        checks = [(root / s["file"], s["sha256"]) for s in meta.shards]
        checks.append((tok_file, meta.tokenizer_sha256))
        for f, expected_sha in checks:
            if sha256_file(f) != expected_sha:
                raise DataError(f"checksum mismatch for '{f}' (sha256 differs from metadata.json): "
                                f"the file was modified or corrupted; {rerun}")
    return meta


def load_tokenizer(meta: DatasetMeta) -> Tokenizer:
    """The dataset's tokenizer, whichever kind it is."""
    return read_tokenizer(meta.tokenizer_path)


class TokenStream:
    """All shards as one read-only global token sequence (memory-mapped, nothing loaded upfront)."""

    def __init__(self, meta: DatasetMeta):
        self.meta = meta
        root = Path(meta.path)
        self._shards = [np.memmap(root / s["file"], dtype=meta.dtype, mode="r", shape=(s["num_tokens"],))
                        for s in meta.shards]
        # starts[k] = global offset of shard k's first token; starts[-1] = total.
        self._starts = np.cumsum([0] + [s["num_tokens"] for s in meta.shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) as int64, possibly spanning several shards."""
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"token range [{start}, {end}) outside [0, {len(self)})")
        parts = []
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < end:
            lo = pos - self._starts[k]
            hi = min(end, self._starts[k + 1]) - self._starts[k]
            parts.append(self._shards[k][lo:hi])
            pos = int(self._starts[k]) + int(hi)
            k += 1
        if not parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)


class SampleSet:
    """Fixed-length samples (Megatron style): sample i = tokens [i*L, i*L + L + 1).

    Consecutive samples share one token so every token is a label exactly once.
    The validation split is the contiguous tail of the samples, so it is text the
    model never trains on (a random split would leak neighbouring context).
    """

    def __init__(self, meta: DatasetMeta, seq_length: int, split: str, valid_fraction: float):
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', not {split!r}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, not {seq_length}")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), not {valid_fraction}")
        self.stream = TokenStream(meta)
        self.seq_length = seq_length
        self.split = split
        total = (meta.num_tokens - 1) // seq_length
        num_valid = max(1, round(total * valid_fraction))
        num_train = total - num_valid
        if num_train < 1:
            raise DataError(
                f"dataset '{meta.path}' (config key data.path) has {meta.num_tokens} tokens: {total} "
                f"sample(s) of model.seq_length={seq_length}, {num_valid} held out for validation, none "
                f"left for training (needs at least {2 * seq_length + 1} tokens); use a bigger corpus or "
                f"a smaller model.seq_length")
        self.num_total = total
        self._offset = 0 if split == "train" else num_train
        self._len = num_train if split == "train" else num_valid

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} outside [0, {self._len}) of the {self.split} split")
        start = (self._offset + i) * self.seq_length
        return self.stream.read(start, start + self.seq_length + 1)

    def batch(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """Stack the given samples into a LongTensor of shape (len(indices), seq_length + 1)."""
        return torch.from_numpy(np.stack([self[int(i)] for i in indices]))


class TrainBatches:
    """Deterministic, resumable, data-parallel order over the training samples.

    The global order is an infinite sequence: epoch e is a permutation of the samples
    drawn from ``default_rng([seed, e])``, so any position can be recomputed from
    (seed, position) alone; resuming only needs ``consumed_samples``. Each rank reads
    just its own micro-batches.
    """

    def __init__(self, samples: SampleSet, seed: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0):
        if micro_batch_size < 1 or dp_size < 1 or global_batch_size < 1:
            raise ValueError("global_batch_size, micro_batch_size and dp_size must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be divisible by micro_batch_size "
                f"({micro_batch_size}) * data-parallel size ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, not {consumed_samples}")
        if len(samples) < 1:
            raise DataError("the training split is empty")
        self.samples = samples
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum_steps = global_batch_size // (micro_batch_size * dp_size)
        self._consumed = consumed_samples
        self._perms: dict[int, np.ndarray] = {}

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A batch spans at most two epochs (unless the split is tiny) and a permutation
            # can be large (8 bytes per sample): keep only the two most recent.
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        return self._perms[epoch]

    def sample_indices(self, positions: range) -> list[int]:
        """Map positions in the infinite global order to sample indices."""
        n = len(self.samples)
        return [int(self._perm(p // n)[p % n]) for p in positions]

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for the next global batch, each (micro_batch_size, seq_length+1)."""
        mbs, dp = self.micro_batch_size, self.dp_size
        out = []
        for m in range(self.grad_accum_steps):
            first = self._consumed + (m * dp + self.dp_rank) * mbs
            out.append(self.samples.batch(self.sample_indices(range(first, first + mbs))))
        self._consumed += self.global_batch_size
        return out

    def notes(self) -> list[str]:
        """Lines for the user about the last step's data (a blend's source epochs); none here."""
        return []

    def log_values(self) -> dict:
        """Values for the metrics row (a blend's realised shares); none here."""
        return {}


def valid_batches(samples: SampleSet, micro_batch_size: int, dp_rank: int, dp_size: int,
                  max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """In-order pass over the validation samples; rank r takes micro-batch k*dp_size + r.

    Every rank yields the same number of batches so collectives (loss all-reduce) stay
    in step: the incomplete tail is dropped, and when there are fewer samples than one
    micro-batch per rank they are reused (wrap-around) so each rank gets one batch.
    """
    if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
        raise ValueError(f"bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} / dp_size={dp_size}")
    n = len(samples)
    per_round = micro_batch_size * dp_size
    num = max(1, n // per_round)
    if max_batches is not None:
        num = min(num, max_batches)
    for k in range(num):
        first = (k * dp_size + dp_rank) * micro_batch_size
        yield samples.batch([(first + j) % n for j in range(micro_batch_size)])
