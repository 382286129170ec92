"""Blended training data: several prepared datasets mixed by weight in one resumable order.

Megatron's BlendedDataset semantics: the sample at position s of the blend comes from the
source whose realised share lags its weight most, i.e. argmax_i (w_i * (s + 1) - c_i) with
c_i the samples source i gave so far (ties to the lower index). Megatron writes
max(s, 1) where we write s + 1, the count after this draw; both keep every c_i within a
sample or two of w_i * s, so any window of consecutive samples has the weights' shares.

A position must be recomputable from (seed, position) alone, because a checkpoint stores
only consumed_samples. Running the greedy up to a position costs time linear in it, so the
greedy is run once over a block of BLOCK positions and the block repeats: position p lies in
block p // BLOCK at offset p % BLOCK. Each block holds round-ish(w_i * BLOCK) samples of
source i, so the long-run shares differ from the weights by less than 1 / BLOCK.

Within a source, its k-th draw is sample ``sample_order(k)`` of its training split (dataset.py): in
shuffled order epoch e = k // n has its own permutation, keyed by (seed, source index, e), so a source
that runs out starts a new epoch in a new order and the others are not affected; in stored order a
source repeats its stored order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.schema import BlendSource
from .dataset import DataError, DatasetMeta, SampleSet, TrainBatches, load_meta, sample_order

BLOCK = 1 << 16  # the greedy's period: 0.1 s to compute, shares exact to 1.5e-5


def greedy_sources(weights: list[float], size: int) -> np.ndarray:
    """The source of each of the first ``size`` positions of the blend (Megatron's greedy)."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    counts = [0] * len(w)
    out = np.empty(size, dtype=np.int64)
    sources = range(len(w))
    for s in range(size):  # plain Python: three times faster than a numpy argmax per step
        i = max(sources, key=lambda j: w[j] * (s + 1) - counts[j])
        out[s] = i
        counts[i] += 1
    return out


class BlendOrder:
    """Positions of the blend -> (source, its draw number), for any position, from the weights alone."""

    def __init__(self, weights: list[float], block: int = BLOCK):
        self.block = block
        self.source = greedy_sources(weights, block)
        n = len(weights)
        self.per_block = np.bincount(self.source, minlength=n)
        self.where = [np.flatnonzero(self.source == i) for i in range(n)]  # source i's offsets in a block
        self.rank = np.empty(block, dtype=np.int64)  # the draw number of each offset within its block
        for offsets in self.where:
            self.rank[offsets] = np.arange(len(offsets))

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw) of each position: it is that source's draw-th sample (from 0)."""
        q, r = np.divmod(np.asarray(positions, dtype=np.int64), self.block)
        src = self.source[r]
        return src, q * self.per_block[src] + self.rank[r]

    def counts(self, end: int) -> np.ndarray:
        """How many of the positions [0, end) each source gave."""
        q, r = divmod(end, self.block)
        return q * self.per_block + np.bincount(self.source[:r], minlength=len(self.per_block))

    def position(self, source: int, draw: int) -> int:
        """The position of ``source``'s draw-th sample (the inverse of locate)."""
        q, j = divmod(draw, int(self.per_block[source]))
        return q * self.block + int(self.where[source][j])


class BlendedSamples:
    """One split (train or valid) of every source, read by (source, sample index) pairs."""

    def __init__(self, sets: list[SampleSet], paths: list[str], weights: list[float],
                 order: BlendOrder | None = None):
        self.sets, self.paths, self.weights = sets, paths, weights
        self.names = share_names(paths)
        self.order = order or BlendOrder(weights)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)

    def batch(self, pairs) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.sets[i][k] for i, k in pairs]))


class BlendedValid:
    """The validation samples: each source's held-out tail in order, interleaved with the training
    weights, so the validation loss estimates the loss on the training mixture. It ends where the first
    source would run out (relative to its weight), so no sample is seen twice in a pass."""

    def __init__(self, blend: BlendedSamples):
        self.blend = blend
        total = sum(blend.weights)
        self._len = max(1, min(int(len(s) * total / w) for s, w in zip(blend.sets, blend.weights) if w > 0))

    def __len__(self) -> int:
        return self._len

    def batch(self, indices) -> torch.Tensor:
        src, draw = self.blend.order.locate(indices)
        return self.blend.batch((i, d % len(self.blend.sets[i])) for i, d in zip(src, draw))


class BlendedBatches(TrainBatches):
    """TrainBatches over a blend: the position -> sample map is the blend's, the rest is the same."""

    def __init__(self, samples: BlendedSamples, seed: int, *args, **kwargs):
        super().__init__(samples, seed, *args, **kwargs)
        self.blend = samples
        self._notes: list[str] = []

    def sample_indices(self, positions: range) -> list[tuple[int, int]]:
        src, draw = self.blend.order.locate(np.arange(positions.start, positions.stop))
        out = np.empty_like(draw)
        for i in np.unique(src):  # source i's draws in its own order (a new shuffle each of its epochs)
            at = src == i
            s = self.blend.sets[i]
            out[at] = sample_order(draw[at], len(s), s.stored, [self.seed, int(i)])
        return list(zip(src.tolist(), out.tolist()))

    def epoch_starts(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(source, epoch counted from 1, position) of every source epoch from the 2nd on that starts
        within positions [start, end)."""
        order, out = self.blend.order, []
        first, last = order.counts(start), order.counts(end)
        for i, s in enumerate(self.blend.sets):
            n = len(s)
            for e in range(max(1, -(-int(first[i]) // n)), -(-int(last[i]) // n)):
                out.append((i, e + 1, order.position(i, e * n)))
        return sorted(out, key=lambda x: x[2])

    def _began(self, first: int) -> None:
        self._notes = [f"data: source {self.blend.paths[i]} starts epoch {e} at sample {p}"
                       for i, e, p in self.epoch_starts(first, first + self.global_batch_size)]

    def notes(self) -> list[str]:
        return self._notes

    def log_values(self) -> dict:
        """The realised share of each source over all samples consumed so far."""
        c = self.consumed_samples
        counts = self.blend.order.counts(c)
        return {f"data_share/{name}": float(k) / max(c, 1) for name, k in zip(self.blend.names, counts)}


def share_names(paths: list[str]) -> list[str]:
    """Short names for the logs: each path's last part, or the whole path where those clash."""
    last = [Path(p).name or p for p in paths]
    return [n if last.count(n) == 1 else p for n, p in zip(last, paths)]


def load_data(data_cfg, seq_length: int) -> tuple[DatasetMeta, SampleSet | BlendedSamples, SampleSet | BlendedValid]:
    """(metadata of the first source: tokenizer and vocab, training samples, validation samples) from the
    config's data section: data.path alone, or the data.blend sources; validation from data.valid_path
    when given (read in order as a token stream, whatever data.order says), else from each source's tail."""
    d = data_cfg
    sources = d.blend or [BlendSource(d.path, 1.0, d.prepare)]
    keys = [f"data.blend[{i}].path" for i in range(len(d.blend))] or ["data.path"]
    metas = [load_meta(s.path, verify=d.verify_checksums, recipe=s.prepare, key=k, tokenizer=d.tokenizer)
             for s, k in zip(sources, keys)]
    for i, m in enumerate(metas[1:], 1):
        if m.tokenizer_sha256 != metas[0].tokenizer_sha256:
            raise DataError(
                f"data.blend[{i}].path={d.blend[i].path} and data.blend[0].path={d.blend[0].path} were prepared "
                f"with different tokenizers ({m.tokenizer_path.name} sha256 {m.tokenizer_sha256[:12]} vs "
                f"{metas[0].tokenizer_sha256[:12]}); a model reads one vocabulary: prepare {d.blend[i].path} again "
                f"with `--tokenizer {metas[0].tokenizer_path} --force`")
    split = "all" if d.valid_path else "train"
    train = [SampleSet(m, seq_length, split, d.valid_fraction, d.order) for m in metas]
    if d.valid_path:
        vmeta = load_meta(d.valid_path, verify=d.verify_checksums, recipe=d.prepare, key="data.valid_path",
                          tokenizer=d.tokenizer)
        if vmeta.tokenizer_sha256 != metas[0].tokenizer_sha256:
            raise DataError(f"data.valid_path={d.valid_path} was prepared with another tokenizer than "
                            f"{keys[0]}={sources[0].path} ({vmeta.tokenizer_path} vs {metas[0].tokenizer_path}); "
                            f"prepare it again with `--tokenizer {metas[0].tokenizer_path}`")
        valid = SampleSet(vmeta, seq_length, "all", 0.0)
    if not d.blend:
        return metas[0], train[0], (valid if d.valid_path else
                                    SampleSet(metas[0], seq_length, "valid", d.valid_fraction, d.order))
    paths, weights = [s.path for s in d.blend], [s.weight for s in d.blend]
    blend = BlendedSamples(train, paths, weights)
    if d.valid_path:
        return metas[0], blend, valid
    held = BlendedSamples([SampleSet(m, seq_length, "valid", d.valid_fraction, d.order) for m in metas], paths,
                          weights, blend.order)
    return metas[0], blend, BlendedValid(held)


def train_batches(samples: SampleSet | BlendedSamples, *args, **kwargs) -> TrainBatches:
    """The TrainBatches that fits ``samples`` (same arguments as TrainBatches)."""
    return (BlendedBatches if isinstance(samples, BlendedSamples) else TrainBatches)(samples, *args, **kwargs)
