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

Within a source, its k-th draw is sample perm_e[k % n] of its training split, where epoch
e = k // n has its own permutation from default_rng([seed, source index, e]): a source that
runs out starts a new epoch in a new order, and the others are not affected.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import DataError, DatasetMeta, SampleSet, TrainBatches, load_meta

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
        self._source_perms: dict[tuple[int, int], np.ndarray] = {}
        self._notes: list[str] = []

    def _source_perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._source_perms:
            # Keep two epochs per source: a batch usually spans at most two of a source's epochs (an
            # evicted one is recomputed, the same, if a tiny source needs it again).
            older = [k for k in self._source_perms if k[0] == source]
            if len(older) >= 2:
                self._source_perms.pop(min(older))
            n = len(self.blend.sets[source])
            self._source_perms[key] = np.random.default_rng([self.seed, source, epoch]).permutation(n)
        return self._source_perms[key]

    def sample_indices(self, positions: range) -> list[tuple[int, int]]:
        src, draw = self.blend.order.locate(np.arange(positions.start, positions.stop))
        sizes = [len(s) for s in self.blend.sets]
        return [(int(i), int(self._source_perm(i, d // sizes[i])[d % sizes[i]])) for i, d in zip(src, draw)]

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

    def next_step(self) -> list[torch.Tensor]:
        c = self.consumed_samples
        self._notes = [f"data: source {self.blend.paths[i]} starts epoch {e} at sample {p}"
                       for i, e, p in self.epoch_starts(c, c + self.global_batch_size)]
        return super().next_step()

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
    config's data section: data.path alone, or the data.blend sources."""
    d = data_cfg
    if not d.blend:
        meta = load_meta(d.path, verify=d.verify_checksums, recipe=d.prepare)
        return (meta, SampleSet(meta, seq_length, "train", d.valid_fraction),
                SampleSet(meta, seq_length, "valid", d.valid_fraction))
    metas = [load_meta(s.path, verify=d.verify_checksums, recipe=s.prepare, key=f"data.blend[{i}].path")
             for i, s in enumerate(d.blend)]
    for i, m in enumerate(metas[1:], 1):
        if m.tokenizer_sha256 != metas[0].tokenizer_sha256:
            raise DataError(
                f"data.blend[{i}].path={d.blend[i].path} and data.blend[0].path={d.blend[0].path} were prepared "
                f"with different tokenizers (tokenizer.model sha256 {m.tokenizer_sha256[:12]} vs "
                f"{metas[0].tokenizer_sha256[:12]}); a model reads one vocabulary: prepare {d.blend[i].path} again "
                f"with `--tokenizer {Path(d.blend[0].path) / 'tokenizer.model'} --force`")
    paths, weights = [s.path for s in d.blend], [s.weight for s in d.blend]
    train = BlendedSamples([SampleSet(m, seq_length, "train", d.valid_fraction) for m in metas], paths, weights)
    valid = BlendedSamples([SampleSet(m, seq_length, "valid", d.valid_fraction) for m in metas], paths, weights,
                           train.order)
    return metas[0], train, BlendedValid(valid)


def train_batches(samples: SampleSet | BlendedSamples, *args, **kwargs) -> TrainBatches:
    """The TrainBatches that fits ``samples`` (same arguments as TrainBatches)."""
    return (BlendedBatches if isinstance(samples, BlendedSamples) else TrainBatches)(samples, *args, **kwargs)
