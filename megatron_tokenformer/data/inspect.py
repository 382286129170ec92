"""What a dataset holds and what a run trained on (``tools/inspect_data.py``: Pythia's batch_viewer, and more).

Everything here goes through the trainer's own code (``load_data``, ``train_batches``, ``TokenStream``),
so what it shows is what the training loop reads: the global batch of the step logged as N is positions
(N-1)·B … N·B-1 of the order, and ``TrainBatches.read`` with one rank and one micro-batch of B is exactly
that batch, in order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .blend import BlendedSamples, load_data, train_batches
from .dataset import METADATA_FILE, DataError, DatasetMeta, TokenStream, load_tokenizer


@dataclass
class StepBatch:
    step: int
    first: int
    """The position of the batch's first sample in the training order: (step - 1) * global batch."""
    tokens: np.ndarray
    """(global batch, seq_length + 1) int64: every sample, in the global batch's order."""
    labels: list[str]
    """What each sample is: the stored row, or the window of the token stream, and of which dataset."""
    tokenizer: Tokenizer


def step_batch(cfg, step: int) -> StepBatch:
    """The global batch the step logged as ``step`` trains on (config ``cfg``, loaded as the launcher does)."""
    if step < 1:
        raise DataError(f"--step {step}: steps are counted from 1 (the first step is logged as step 1)")
    meta, train, _ = load_data(cfg.data, cfg.model.seq_length)
    size = cfg.train.global_batch_size
    batches = train_batches(train, cfg.train.seed, size, size, 0, 1)
    first = (step - 1) * size
    (tokens,) = batches.read(first)  # one rank, one micro-batch of the whole global batch
    picks = batches.sample_indices(range(first, first + size))
    if isinstance(train, BlendedSamples):
        labels = [f"data.blend[{i}]: " + _what(train.sets[i], k, train.paths[i]) for i, k in picks]
    else:
        labels = [_what(train, k, meta.path) for k in picks]
    return StepBatch(step, first, tokens.numpy(), labels, load_tokenizer(meta))


def _what(samples, k: int, path: str) -> str:
    # The training split starts at sample 0 of its dataset (validation is the tail), so k is the
    # dataset's own row or window number.
    if samples.stored:
        return f"row {k} of {path}"
    length = samples.seq_length
    return f"sample {k} of {path} (tokens [{k * length}, {k * length + length + 1}) of its token stream)"


def parse_range(text: str, total: int) -> range:
    """``A:B`` (B exclusive; either may be left out, negatives count from the end) within [0, total)."""
    try:
        a, b = (int(x) if x.strip() else None for x in text.split(":"))
    except ValueError:
        raise DataError(f"--documents {text!r} is not a range A:B (e.g. 0:10)") from None
    start, stop, _ = slice(a, b).indices(total)
    if start >= stop:
        raise DataError(f"--documents {text} selects none of the dataset's {total} stored sequences (0:{total})")
    return range(start, stop)


def documents(meta: DatasetMeta, rows: range) -> list[np.ndarray]:
    """Stored sequences ``rows`` (documents, for datasets from prepare_data.py), each as int64 ids."""
    stream = TokenStream(meta)
    return [stream.sequence(i) for i in rows]


def render(tok: Tokenizer, ids) -> str:
    """Ids as text, document boundaries shown: the pieces between end-of-document ids are decoded
    one by one and joined with the end-of-document token's text (a sentencepiece ``</s>`` decodes
    to nothing, so it is written as ``<|eod|>``)."""
    ids = [int(i) for i in ids]
    marker = tok.decode([tok.eod_id]) or "<|eod|>"
    pieces, start = [], 0
    for j, t in enumerate(ids):
        if t == tok.eod_id:
            pieces.append(tok.decode(ids[start:j]))
            start = j + 1
    pieces.append(tok.decode(ids[start:]))
    return marker.join(pieces)


def summary(meta: DatasetMeta) -> list[str]:
    """Lines describing a dataset: no token is read (the sizes come from the indices)."""
    stream = TokenStream(meta)
    tok = load_tokenizer(meta)
    lines = [f"dataset: {meta.path}", f"source: {meta.source or '(not recorded)'}"]
    for p in stream.parts:
        sizes = sum(f.stat().st_size for f in p.files)
        shown = p.files[0] if len(p.files) == 1 else f"{p.files[0]} ... {p.files[-1].name} ({len(p.files)} pieces)"
        lines.append(f"file: {shown}: {p.num_tokens} tokens in {p.index.num_sequences} sequences, {sizes} bytes, "
                     f"index {p.index.path}")
    lines += [f"tokens: {len(stream)}", f"sequences: {stream.num_sequences}", f"dtype: {meta.dtype}",
              f"tokenizer: {meta.tokenizer_path} ({tok.kind}, {meta.vocab_size} ids, end of document {meta.eod_id}, "
              f"sha256 {meta.tokenizer_sha256[:12]})"]
    if meta.max_token_id is not None:
        lines.append(f"max token id: {meta.max_token_id}")
    if meta.files:
        lines.append(f"checksums: {len(meta.files)} files recorded in {METADATA_FILE} "
                     f"(check them with --verify)")
    else:
        lines.append("checksums: none recorded (a Megatron dataset from elsewhere)")
    stats = _stats(meta)
    for key, value in stats.items():
        lines.append(f"stats.{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return lines


def _stats(meta: DatasetMeta) -> dict:
    """The ``stats`` prepare_data.py records in metadata.json (none for a foreign dataset)."""
    f = Path(meta.path) / METADATA_FILE
    if not f.is_file():
        return {}
    stats = json.loads(f.read_text()).get("stats") or {}
    return stats if isinstance(stats, dict) else {"value": stats}


def parse_part(text: str | None) -> tuple[int, int]:
    """``K/N`` (K from 1 to N) as (part index from 0, parts)."""
    if text is None:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DataError(f"--part {text!r} is not K/N (e.g. 1/4: the first of 4 parts)") from None
    if not 1 <= k <= n:
        raise DataError(f"--part {text}: K must be within 1 ... N")
    return k - 1, n
